"""Login throttling shared by every broker process on one Redis.

Same rules and schedule as ``LoginThrottle`` (throttle.py); the counters live in Redis hashes
(``failures``, ``last`` failure time, ``locked``) under opaque keys (HMACs of login names and
addresses, never either in clear). A failure is one Lua call, so processes counting at the same
time never lose a count. Idle counters expire on their own after ``forget_after``; a locked
account's counter does not expire (an administrator unlocks it).

Times are wall-clock seconds (``time.time``), since processes on different machines share them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import redis.asyncio as aioredis

from .throttle import (
    BASE_DELAY,
    FORGET_AFTER,
    FREE_FAILURES,
    LOCKOUT_AFTER,
    MAX_DELAY,
    Decision,
    Schedule,
    check_lockout,
)

PREFIX = "throttle:"

# KEYS: the counters to bump (account and/or address). ARGV: now, lockout_after, forget_after_ms,
# then for each key "1" when it is an account (which can lock) or "0".
_FAIL = """
for i, key in ipairs(KEYS) do
  local n = redis.call('HINCRBY', key, 'failures', 1)
  redis.call('HSET', key, 'last', ARGV[1])
  if ARGV[3 + i] == '1' and n >= tonumber(ARGV[2]) then
    redis.call('HSET', key, 'locked', '1')
    redis.call('PERSIST', key)
  elseif redis.call('HGET', key, 'locked') ~= '1' then
    redis.call('PEXPIRE', key, ARGV[3])
  end
end
return 1
"""

# KEYS: an account's counter. Cleared unless locked.
_SUCCEED = """
if redis.call('HGET', KEYS[1], 'locked') ~= '1' then redis.call('DEL', KEYS[1]) end
return 1
"""


class RedisLoginThrottle:
    """``Throttle`` over Redis; see the module docstring. Uses, but does not own, ``client``."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        clock: Callable[[], float] = time.time,
        free_failures: int = FREE_FAILURES,
        base_delay: float = BASE_DELAY,
        max_delay: float = MAX_DELAY,
        lockout_after: int = LOCKOUT_AFTER,
        forget_after: float = FORGET_AFTER,
    ) -> None:
        self.lockout_after = check_lockout(lockout_after)
        self.redis = client
        self._clock = clock
        self._schedule = Schedule(free_failures, base_delay, max_delay)
        self._forget_after = forget_after
        self._fail = client.register_script(_FAIL)
        self._succeed = client.register_script(_SUCCEED)

    async def check(self, account: str | None, address: str | None) -> Decision:
        now = self._clock()
        waits = [0.0]
        if account is not None:
            failures, last, locked = await self._read(_account_key(account), now)
            if locked:
                return Decision(allowed=False, retry_after=0.0, locked=True)
            waits.append(self._schedule.remaining(failures, last, now))
        if address is not None:
            failures, last, _ = await self._read(_address_key(address), now)
            waits.append(self._schedule.remaining(failures, last, now))
        wait = max(waits)
        return Decision(allowed=wait <= 0.0, retry_after=max(wait, 0.0))

    async def record_failure(self, account: str | None, address: str | None) -> Decision:
        keys, kinds = [], []
        if account is not None:
            keys.append(_account_key(account))
            kinds.append("1")
        if address is not None:
            keys.append(_address_key(address))
            kinds.append("0")
        if keys:
            forget_ms = max(1, int(self._forget_after * 1000))
            await self._fail(keys=keys, args=[repr(self._clock()), self.lockout_after, forget_ms, *kinds])
        return await self.check(account, address)

    async def record_success(self, account: str) -> None:
        await self._succeed(keys=[_account_key(account)])

    async def unlock(self, account: str) -> None:
        await self.redis.delete(_account_key(account))

    async def is_locked(self, account: str) -> bool:
        return (await self._read(_account_key(account), self._clock()))[2]

    async def failures(self, account: str) -> int:
        return (await self._read(_account_key(account), self._clock()))[0]

    async def _read(self, key: str, now: float) -> tuple[int, float, bool]:
        failures, last, locked = await self.redis.hmget(key, ["failures", "last", "locked"])
        state = (int(failures or 0), float(last or 0.0), locked == b"1")
        if not state[2] and state[0] and now - state[1] > self._forget_after:
            return (0, 0.0, False)  # idle for longer than we remember (Redis expiry is in real time)
        return state


def _account_key(account: str) -> str:
    return f"{PREFIX}a:{account}"


def _address_key(address: str) -> str:
    return f"{PREFIX}ip:{address}"
