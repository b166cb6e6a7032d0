"""Account rows in Redis, for practices that run several broker processes.

One hash per therapist, one string per login-name key pointing at the id, one set of ids, all
under the ``{accounts}`` hash tag so every script touches one cluster slot. These keys have no
expiry: accounts are durable, so the Redis that holds them must persist its data (the compose
file and manifests run a separate persistent Redis for them; ``warn_if_not_persistent`` says so
in the log when it does not). Every change that two processes could race is one Lua script.

Values are text in Redis: sealed blobs go in as base64, integers as decimal, ``None`` as a
missing field. What identifies a person was sealed by ``AccountStore`` before it got here.
"""

from __future__ import annotations

import base64
import builtins
import json
import logging
from typing import Any, cast

import redis.asyncio as aioredis

from broker.accounts.rows import COLUMNS, DEFAULTS, Row, check_columns

log = logging.getLogger("broker.accounts")

PREFIX = "{accounts}:"
_IDS = PREFIX + "ids"
_KEY_CHECK = PREFIX + "key_check"
_BALANCE = PREFIX + "balance"

# KEYS: row, name index, id set. ARGV: id, username_key, then field/value pairs.
_INSERT = """
if redis.call('SET', KEYS[2], ARGV[1], 'NX') == false then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('SADD', KEYS[3], ARGV[1])
return 1
"""

# KEYS: row. ARGV[1]: JSON {set: {f: v}, unset: [f], eq: {f: v}, absent: [f], below: n|null}.
_UPDATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local a = cjson.decode(ARGV[1])
for f, v in pairs(a.eq) do
  if redis.call('HGET', KEYS[1], f) ~= v then return 0 end
end
for _, f in ipairs(a.absent) do
  if redis.call('HEXISTS', KEYS[1], f) == 1 then return 0 end
end
if a.below ~= cjson.null then
  local step = redis.call('HGET', KEYS[1], 'totp_last_step')
  if step and tonumber(step) >= a.below then return 0 end
end
for f, v in pairs(a.set) do redis.call('HSET', KEYS[1], f, v) end
for _, f in ipairs(a.unset) do redis.call('HDEL', KEYS[1], f) end
return 1
"""

# KEYS: row. ARGV: lockout_after.
_COUNT_FAILURE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local n = redis.call('HINCRBY', KEYS[1], 'failures', 1)
if n >= tonumber(ARGV[1]) then redis.call('HSET', KEYS[1], 'locked', '1') end
return n
"""


def _row_key(therapist_id: str) -> str:
    return f"{PREFIX}t:{therapist_id}"


def _name_key(username_key: str) -> str:
    return f"{PREFIX}name:{username_key}"


def _to_text(column: str, value: Any) -> str:
    kind = COLUMNS[column]
    if kind == "bytes":
        return base64.b64encode(value).decode("ascii")
    if kind == "int":
        return str(int(value))
    return str(value)


def _from_redis(raw: dict[bytes, bytes]) -> Row:
    row: Row = dict.fromkeys(COLUMNS)
    for name_b, value_b in raw.items():
        name = name_b.decode()
        if name not in COLUMNS:
            continue
        kind = COLUMNS[name]
        text = value_b.decode()
        row[name] = base64.b64decode(text) if kind == "bytes" else int(text) if kind == "int" else text
    return row


class RedisAccountRows:
    """``AccountRows`` on a Redis client (bytes responses, as ``store_redis.redis_client`` makes)."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.redis = client
        self._insert = client.register_script(_INSERT)
        self._update = client.register_script(_UPDATE)
        self._count_failure = client.register_script(_COUNT_FAILURE)

    async def key_check(self, sealed: bytes) -> bytes:
        await self.redis.set(_KEY_CHECK, sealed, nx=True)
        return cast(bytes, await self.redis.get(_KEY_CHECK))

    async def by_id(self, therapist_id: str) -> Row | None:
        raw = cast("dict[bytes, bytes]", await self.redis.hgetall(_row_key(therapist_id)))
        return _from_redis(raw) if raw else None

    async def by_key(self, username_key: str) -> Row | None:
        found = cast("bytes | None", await self.redis.get(_name_key(username_key)))
        return await self.by_id(found.decode()) if found is not None else None

    async def all(self) -> builtins.list[Row]:
        ids = sorted(i.decode() for i in cast("set[bytes]", await self.redis.smembers(_IDS)))
        rows = [row for i in ids if (row := await self.by_id(i)) is not None]
        return sorted(rows, key=lambda r: (r["created_at"], r["id"]))

    async def insert(self, row: Row) -> bool:
        full = {**DEFAULTS, **row}
        check_columns(full)
        pairs: builtins.list[str] = []
        for name, value in full.items():
            if value is not None:
                pairs += [name, _to_text(name, value)]
        keys = [_row_key(full["id"]), _name_key(full["username_key"]), _IDS]
        return bool(await self._insert(keys=keys, args=[full["id"], full["username_key"], *pairs]))

    async def update(
        self,
        therapist_id: str,
        changes: Row,
        *,
        expect: Row | None = None,
        step_below: int | None = None,
    ) -> bool:
        expect = expect or {}
        check_columns(changes)
        check_columns(expect)
        plan = {
            "set": {k: _to_text(k, v) for k, v in changes.items() if v is not None},
            "unset": [k for k, v in changes.items() if v is None],
            "eq": {k: _to_text(k, v) for k, v in expect.items() if v is not None},
            "absent": [k for k, v in expect.items() if v is None],
            "below": step_below,
        }
        # cjson turns an empty table into {} and an empty list into {} too; both iterate as empty.
        return bool(await self._update(keys=[_row_key(therapist_id)], args=[json.dumps(plan)]))

    async def count_failure(self, therapist_id: str, lockout_after: int) -> None:
        await self._count_failure(keys=[_row_key(therapist_id)], args=[lockout_after])

    async def balance(self) -> None:
        await self.redis.set(_BALANCE, b"1")

    async def close(self) -> None:
        await self.redis.aclose(close_connection_pool=True)


async def warn_if_not_persistent(client: aioredis.Redis) -> bool:
    """Log a warning when the accounts' Redis keeps nothing across a restart; True when it persists."""
    try:
        settings = {
            **await client.config_get("appendonly"),
            **await client.config_get("save"),
        }
        text = {_text(k): _text(v) for k, v in settings.items()}
        persistent = text.get("appendonly") == "yes" or bool(text.get("save", "").strip())
    except aioredis.RedisError:
        try:  # CONFIG is often renamed away in production; INFO still tells about AOF
            persistent = bool(int((await client.info("persistence")).get("aof_enabled", 0)))
        except aioredis.RedisError:
            return True  # cannot tell: say nothing rather than guess
    if not persistent:
        log.warning("event=accounts_redis_not_persistent")
    return persistent


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
