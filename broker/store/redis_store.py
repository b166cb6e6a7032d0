"""The Redis store: session state shared by every broker process, encrypted at rest.

Same interface as ``broker.store.base.MemoryStore``, so the hub never knows which it
runs on. What it adds:

- Every value is sealed with AES-256-GCM before it leaves the process, bound to
  its key name (associated data), so a Redis dump reveals nothing readable and a
  value copied to another key no longer opens.
- Every failure to reach Redis (refused, reset, timed out, still loading, a
  replica that cannot take writes) becomes ``StoreUnavailable`` within TIMEOUT_S
  (half a second): short socket timeouts and no retry loops, so a join during an outage
  is answered ``unavailable`` at once instead of hanging.
- Only the TTLs Redis keeps on every key expire data; no keyspace notifications
  are used as timers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar, cast

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.maint_notifications import MaintNotificationsConfig

from broker.store.base import Mutation, StoreUnavailable

# Re-exported for the modules that still import them from here (redis_bus).
from broker.store.sealing import Sealer, StoreCorrupt

if TYPE_CHECKING:
    from broker.store.redis_bus import RedisBus

T = TypeVar("T")
P = ParamSpec("P")

log = logging.getLogger("broker.store_redis")

#: Connect, read and write timeout for every Redis call, and the wait for a free pooled connection.
#: Under a second, so a join to a hung Redis (stopped, not dead) is answered ``unavailable`` within
#: one (measured: about 1.0 s with 1.0 here); a Redis that answers at all answers in milliseconds.
TIMEOUT_S = 0.5
#: Pooled connections per process; a burst beyond this waits up to TIMEOUT_S for one.
MAX_CONNECTIONS = 64
#: Optimistic update attempts when another process changed the key between WATCH and EXEC.
UPDATE_ATTEMPTS = 16

#: How redis-py words a WATCH conflict (it raises WatchError for lost connections too).
_WATCHED_KEY_CHANGED = "Watched variable changed"
#: Error replies that mean "not now" rather than "wrong command".
_TRANSIENT_REPLIES = ("LOADING", "READONLY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "NOREPLICAS")


class CommandRefused(StoreUnavailable):
    """Redis answered a pipelined command (bus_redis) with an error reply."""

    def __init__(self, reply: str) -> None:
        super().__init__("error reply")
        word = reply.split(" ", 1)[0]
        #: The reply's first word (WRONGTYPE, NOSCRIPT, ...): Redis's error code, nothing else of it.
        self.code = word if word.isalpha() and word.isupper() and len(word) <= 32 else "ERR"


def _value_aad(key: str) -> bytes:
    return b"value\x00" + key.encode()


def log_aad(key: str) -> bytes:
    return b"log\x00" + key.encode()


# ---------------------------------------------------------------- errors


def is_unavailable(exc: BaseException) -> bool:
    """Whether an exception means Redis cannot be reached (now), as opposed to a bug."""
    if isinstance(exc, (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError, asyncio.TimeoutError)):
        return True
    if isinstance(exc, redis_errors.ResponseError):
        return str(exc).startswith(_TRANSIENT_REPLIES)
    return False


@contextlib.contextmanager
def unavailable_on_redis_errors() -> Iterator[None]:
    """Turn every way of failing to reach Redis into StoreUnavailable (without the details)."""
    try:
        yield
    except StoreUnavailable:
        raise
    except Exception as exc:
        if is_unavailable(exc):
            raise StoreUnavailable(type(exc).__name__) from None
        raise


# ---------------------------------------------------------------- scripts

# Capped log in ONE list key: each entry is "<seq>:<sealed value>". The next
# sequence number follows the newest entry, which LTRIM never drops, so no
# separate counter key is needed and deleting the log key deletes everything.

#: Lua setting ``first`` to the seq the next entry of the log KEYS[1] gets.
NEXT_SEQ_LUA = """
local last = redis.call('LINDEX', KEYS[1], -1)
local first = 1
if last then
  first = tonumber(string.match(last, '^(%d+):')) + 1
end
"""


def keep_entries_lua(unpacked: str) -> str:
    """Lua appending numbered entries (``unpacked``: the arguments of an ``unpack``) to the log
    KEYS[1], capped at ARGV[1] entries with a TTL of ARGV[2] ms."""
    return f"""
redis.call('RPUSH', KEYS[1], unpack({unpacked}))
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[1]), -1)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
"""


#: Appends the sealed values ARGV[3], ARGV[4], ... numbered on from the newest entry; returns the first's seq.
_APPEND = (
    NEXT_SEQ_LUA
    + """
local entries = {}
for i = 3, #ARGV do
  entries[i - 2] = string.format('%d:', first + i - 3) .. ARGV[i]
end
"""
    + keep_entries_lua("entries")
    + """
return first
"""
)

#: Empties a capped log but keeps its numbering: the newest entry is replaced by "<seq>:" alone, a
#: marker that carries the sequence number and no value (read_since skips it). The TTL is kept.
_CLEAR_LOG = """
local last = redis.call('LINDEX', KEYS[1], -1)
if not last then
  return 0
end
local seq = string.match(last, '^(%d+):')
local ttl = redis.call('PTTL', KEYS[1])
redis.call('DEL', KEYS[1])
redis.call('RPUSH', KEYS[1], seq .. ':')
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return 1
"""

#: Drops the entries numbered ARGV[1] or below from the head of a capped log; when that is all of
#: them, the newest becomes the "<seq>:" marker (as _CLEAR_LOG), so the numbering stays. LSET and
#: LPOP keep the TTL.
_TRIM_LOG = """
local through = tonumber(ARGV[1])
while true do
  local head = redis.call('LINDEX', KEYS[1], 0)
  if not head then
    return 0
  end
  local seq = string.match(head, '^(%d+):')
  if not seq or tonumber(seq) > through then
    return 0
  end
  if redis.call('LLEN', KEYS[1]) == 1 then
    redis.call('LSET', KEYS[1], 0, seq .. ':')
    return 1
  end
  redis.call('LPOP', KEYS[1])
end
"""

# Fixed-window counter: the window starts with the first event.
_INCR_WINDOW = """
local n = redis.call('INCR', KEYS[1])
if n == 1 or redis.call('PTTL', KEYS[1]) == -1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return n
"""


def ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def glob_escape(text: str) -> str:
    """``text`` as a literal inside a Redis MATCH pattern."""
    return "".join("\\" + c if c in "\\*?[]" else c for c in text)


class _KeyLocks:
    """One asyncio lock per key, so updates of one key inside a process queue instead of colliding."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        entry = self._locks.get(key)
        if entry is None:
            entry = self._locks[key] = (asyncio.Lock(), [0])
        lock, users = entry
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._locks[key]


# ---------------------------------------------------------------- the store

#: ``on_command(operation, seconds, failed)``: told of every store operation (broker/metrics).
CommandObserver = Callable[[str, float, bool], None]


def timed(
    operation: str,
) -> Callable[
    [Callable[Concatenate[RedisStore, P], Coroutine[Any, Any, T]]],
    Callable[Concatenate[RedisStore, P], Coroutine[Any, Any, T]],
]:
    """Tell the store's ``on_command`` (when set) how long the operation took, and whether Redis
    failed it (StoreUnavailable); nothing else of it."""

    def wrap(
        method: Callable[Concatenate[RedisStore, P], Coroutine[Any, Any, T]],
    ) -> Callable[Concatenate[RedisStore, P], Coroutine[Any, Any, T]]:
        async def run(store: RedisStore, /, *args: P.args, **kwargs: P.kwargs) -> T:
            observe = store.on_command
            if observe is None:
                return await method(store, *args, **kwargs)
            started = time.perf_counter()
            try:
                result = await method(store, *args, **kwargs)
            except StoreUnavailable:
                observe(operation, time.perf_counter() - started, True)
                raise
            observe(operation, time.perf_counter() - started, False)
            return result

        functools.update_wrapper(run, method)
        return run

    return wrap


class RedisStore:
    """The Store interface over Redis; values sealed with ``Sealer``."""

    def __init__(self, client: aioredis.Redis, sealer: Sealer, *, also_ready: Callable[[], bool] | None = None) -> None:
        self.redis = client
        self._sealer = sealer
        self._also_ready = also_ready
        self._append = client.register_script(_APPEND)
        self._clear_log = client.register_script(_CLEAR_LOG)
        self._trim_log = client.register_script(_TRIM_LOG)
        self._incr_window = client.register_script(_INCR_WINDOW)
        self._locks = _KeyLocks()
        self._reads: RedisBus | None = None
        self.on_command: CommandObserver | None = None

    def read_through(self, bus: RedisBus) -> None:
        """Send ``get`` on the bus's pipelined connection (``RedisBus.call``) while the bus is open.

        A read then costs no pooled connection taken and given back, and no wake-up of its own:
        its reply arrives with the relays' (P4 in benchmarks/: every session's record is read
        again every quarter second while it relays).
        """
        self._reads = bus

    @timed("get")
    async def get(self, key: str) -> bytes | None:
        reads = self._reads
        if reads is not None and not reads.closed:
            try:
                raw = await reads.call(b"GET", key)
            except CommandRefused as refused:
                if refused.code != "WRONGTYPE":
                    raise
                return None  # a capped log, as below
        else:
            with unavailable_on_redis_errors():
                try:
                    raw = await self.redis.get(key)
                except redis_errors.ResponseError as exc:
                    if str(exc).startswith("WRONGTYPE"):
                        return None  # a capped log, which get() does not read (as in MemoryStore)
                    raise
        return None if raw is None else self._sealer.open(_value_aad(key), raw)

    @timed("put")
    async def put(self, key: str, value: bytes, ttl_s: float) -> None:
        sealed = self._sealer.seal(_value_aad(key), value)
        with unavailable_on_redis_errors():
            await self.redis.set(key, sealed, px=ms(ttl_s))

    @timed("update")
    async def update(self, key: str, mutate: Mutation[T], ttl_s: float) -> T:
        """WATCH, GET, mutate, MULTI/SET/EXEC; another process's write in between means try again.

        Updates of one key from this process wait for each other (a local lock),
        so only updates from other processes can collide.
        """
        async with self._locks.hold(key):
            for attempt in range(UPDATE_ATTEMPTS):
                done, result = await self._try_update(key, mutate, ttl_s)
                if done:
                    return result  # type: ignore[return-value]
                await asyncio.sleep(random.uniform(0, 0.002 * (attempt + 1)))
        log.warning("event=store_update_contention attempts=%d", UPDATE_ATTEMPTS)
        raise StoreUnavailable("contention")

    async def _try_update(self, key: str, mutate: Mutation[T], ttl_s: float) -> tuple[bool, T | None]:
        """One optimistic attempt: (True, result) when written, (False, None) when another write came first."""
        aad = _value_aad(key)
        pipe = self.redis.pipeline(transaction=True)
        try:
            with unavailable_on_redis_errors():
                await pipe.watch(key)
                raw = cast("bytes | None", await pipe.get(key))  # a bytes client (redis_client)
            current = None if raw is None else self._sealer.open(aad, raw)
            # If mutate raises, nothing was queued: the reset below UNWATCHes and nothing is written.
            new, result = mutate(current)
            pipe.multi()
            if new is None:
                pipe.unlink(key)
            else:
                pipe.set(key, self._sealer.seal(aad, new), px=ms(ttl_s))
            with unavailable_on_redis_errors():
                await pipe.execute()
            return True, result
        except redis_errors.WatchError as exc:
            if str(exc).startswith(_WATCHED_KEY_CHANGED):
                return False, None
            # redis-py reports a connection lost while watching as a WatchError too.
            raise StoreUnavailable("ConnectionError") from None
        finally:
            with contextlib.suppress(Exception):
                await pipe.reset()

    @timed("delete_prefix")
    async def delete_prefix(self, prefix: str) -> int:
        removed = 0
        with unavailable_on_redis_errors():
            batch: list[bytes] = []
            async for name in self.redis.scan_iter(match=glob_escape(prefix) + "*", count=500):
                batch.append(name)
                if len(batch) >= 500:
                    removed += int(await self.redis.unlink(*batch))
                    batch = []
            if batch:
                removed += int(await self.redis.unlink(*batch))
        return removed

    @timed("keys")
    async def keys(self, prefix: str) -> list[str]:
        with unavailable_on_redis_errors():
            names = [name async for name in self.redis.scan_iter(match=glob_escape(prefix) + "*", count=500)]
        return sorted({n.decode() for n in names})

    @timed("incr_window")
    async def incr_window(self, key: str, window_s: float) -> int:
        """Counters are plain integers in Redis (nothing about a person) and only read through here."""
        with unavailable_on_redis_errors():
            return int(await self._incr_window(keys=[key], args=[ms(window_s)]))

    @timed("append")
    async def append(self, key: str, value: bytes, maxlen: int, ttl_s: float) -> int:
        if maxlen < 1:
            raise ValueError("maxlen must be at least 1")
        sealed = self._sealer.seal(log_aad(key), value)
        with unavailable_on_redis_errors():
            return int(await self._append(keys=[key], args=[maxlen, ms(ttl_s), sealed]))

    @timed("read_since")
    async def read_since(self, key: str, seq: int) -> list[tuple[int, bytes]]:
        with unavailable_on_redis_errors():
            entries = cast("list[bytes]", await self.redis.lrange(key, 0, -1))
        aad = log_aad(key)
        out: list[tuple[int, bytes]] = []
        for entry in entries:
            number, sep, sealed = entry.partition(b":")
            if not sep or not number.isdigit():
                raise StoreCorrupt("a log entry has no sequence number")
            n = int(number)
            if n > seq and sealed:  # an empty value is clear_log's marker: a number, no entry
                out.append((n, self._sealer.open(aad, sealed)))
        return out

    @timed("trim_log")
    async def trim_log(self, key: str, through: int) -> None:
        with unavailable_on_redis_errors():
            await self._trim_log(keys=[key], args=[through])

    @timed("clear_log")
    async def clear_log(self, key: str) -> None:
        with unavailable_on_redis_errors():
            await self._clear_log(keys=[key], args=[])

    async def ping(self) -> bool:
        """True when Redis answers within TIMEOUT_S (and ``also_ready`` agrees); never raises."""
        try:
            answered = bool(await asyncio.wait_for(self.redis.ping(), TIMEOUT_S))
        except Exception:
            return False
        return answered and (self._also_ready is None or self._also_ready())

    async def close(self) -> None:
        await self.redis.aclose(close_connection_pool=True)


# ---------------------------------------------------------------- wiring


def redis_client(url: str) -> aioredis.Redis:
    """A client whose every call fails within about TIMEOUT_S when Redis is away."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=TIMEOUT_S,
        socket_timeout=TIMEOUT_S,
        socket_connect_timeout=TIMEOUT_S,
        socket_keepalive=True,
        # No hidden retry loop (a retried write could apply twice): a failure is reported
        # at once; pooled connections that died while idle are replaced when taken.
        retry=Retry(NoBackoff(), 0),
        # Off: with RESP3, redis-py 8 otherwise skips its check for pooled connections that
        # died while idle (a Redis restart), and the first call on each one would fail.
        maint_notifications_config=MaintNotificationsConfig(enabled=False),
    )
    return aioredis.Redis(connection_pool=pool)
