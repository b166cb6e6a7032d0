"""Login throttling shared by every broker process on one Redis.

Same rules and schedule as ``LoginThrottle`` (throttle.py); the counters live in Redis hashes
(``failures``, ``last`` failure time, ``prev`` = the ``last`` a reservation replaced, ``locked``)
under opaque keys (HMACs of login names and addresses, never either in clear). A failure, and a
reservation (the check and the count together), is one Lua call, so processes counting at the
same time never lose a count and never let more attempts through than the schedule allows. Idle
counters expire on their own after ``forget_after``; a locked account's counter does not expire
(an administrator unlocks it).

Times are wall-clock seconds (``time.time``), since processes on different machines share them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import redis.asyncio as aioredis

from broker.accounts.throttle import (
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

# KEYS: the counters of one attempt (account and/or address). ARGV: now, free, base, ceiling,
# forget_after (s), forget_after_ms. The schedule is Schedule's (throttle.delay_for), in Lua.
# Returns {"locked"}, {"wait", seconds} or {"ok"}; numbers travel as strings (Redis would
# truncate a Lua number to an integer).
_RESERVE = """
local now = tonumber(ARGV[1])
local free, base, ceiling = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local forget = tonumber(ARGV[5])
local wait = 0
local seen = {}
for i, key in ipairs(KEYS) do
  local v = redis.call('HMGET', key, 'failures', 'last', 'locked')
  if v[3] == '1' then return {'locked'} end
  local n, last = tonumber(v[1]) or 0, v[2] or '0'
  if n > 0 and now - tonumber(last) > forget then n, last = 0, '0' end
  seen[i] = {n, last}
  if n > free then
    local delay = math.min(ceiling, base * 2 ^ math.min(n - free - 1, 64))
    wait = math.max(wait, tonumber(last) + delay - now)
  end
end
if wait > 0 then return {'wait', tostring(wait)} end
for i, key in ipairs(KEYS) do
  redis.call('HSET', key, 'failures', seen[i][1] + 1, 'last', ARGV[1], 'prev', seen[i][2])
  redis.call('PEXPIRE', key, ARGV[6])
end
return {'ok'}
"""

# KEYS: counters to give one reserved count back to. ARGV[1]: the reservation's time as stored;
# ARGV[1 + i]: "clear" to drop key i altogether (an account's success) or "refund".
_SETTLE = """
for i, key in ipairs(KEYS) do
  if redis.call('HGET', key, 'locked') ~= '1' then
    local n = tonumber(redis.call('HGET', key, 'failures') or '0')
    if ARGV[1 + i] == 'clear' or n <= 1 then
      redis.call('DEL', key)
    else
      redis.call('HINCRBY', key, 'failures', -1)
      if redis.call('HGET', key, 'last') == ARGV[1] then
        redis.call('HSET', key, 'last', redis.call('HGET', key, 'prev') or '0')
      end
    end
  end
end
return 1
"""

# KEYS: an account's counter. ARGV: lockout_after. A reserved attempt failed: lock at the threshold.
_CONFIRM = """
local n = tonumber(redis.call('HGET', KEYS[1], 'failures') or '0')
if n >= tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'locked', '1')
  redis.call('PERSIST', KEYS[1])
end
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
        self._reserve = client.register_script(_RESERVE)
        self._settle = client.register_script(_SETTLE)
        self._confirm = client.register_script(_CONFIRM)

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

    async def reserve(self, account: str | None, address: str | None) -> Decision:
        """Check and count an attempt in one Lua call: when allowed it already counts as a failure."""
        keys = _keys(account, address)
        if not keys:
            return Decision(allowed=True, retry_after=0.0, reserved_at=self._clock())
        now = repr(self._clock())
        s = self._schedule
        forget_ms = max(1, int(self._forget_after * 1000))
        answer = await self._reserve(
            keys=keys, args=[now, s.free, repr(s.base), repr(s.ceiling), repr(self._forget_after), forget_ms]
        )
        verdict = answer[0].decode() if isinstance(answer[0], bytes) else str(answer[0])
        if verdict == "locked":
            return Decision(allowed=False, retry_after=0.0, locked=True)
        if verdict == "wait":
            return Decision(allowed=False, retry_after=float(answer[1]))
        return Decision(allowed=True, retry_after=0.0, reserved_at=float(now))

    async def confirm_failure(self, account: str) -> None:
        await self._confirm(keys=[_account_key(account)], args=[self.lockout_after])

    async def release(self, account: str | None, address: str | None, reserved_at: float) -> None:
        keys = _keys(account, address)
        if keys:
            await self._settle(keys=keys, args=[repr(reserved_at), *["refund"] * len(keys)])

    async def record_success(self, account: str, address: str | None = None, reserved_at: float | None = None) -> None:
        if address is None or reserved_at is None:
            await self._succeed(keys=[_account_key(account)])
            return
        keys = [_account_key(account), _address_key(address)]
        await self._settle(keys=keys, args=[repr(reserved_at), "clear", "refund"])

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


def _keys(account: str | None, address: str | None) -> list[str]:
    """The counters one attempt touches: the account's, then the address's."""
    keys = []
    if account is not None:
        keys.append(_account_key(account))
    if address is not None:
        keys.append(_address_key(address))
    return keys


def _account_key(account: str) -> str:
    return f"{PREFIX}a:{account}"


def _address_key(address: str) -> str:
    return f"{PREFIX}ip:{address}"
