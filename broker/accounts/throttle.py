"""Login throttling: growing delays per account and per address, lockout per account.

Pure logic with an injectable clock so it can be tested without waiting. The first few failures
cost nothing (people mistype), then each failure doubles the wait up to a ceiling. An account is
locked after ``lockout_after`` consecutive failures until an administrator unlocks it; a
successful login clears the account's counter. Address counters are never cleared by a success
(an attacker with one valid account could otherwise reset them) and simply age out.

An attempt is *reserved* before the password is checked (``reserve``): the check and the count
are one step, so the attempt counts as a failure up front and concurrent guesses beyond what the
schedule allows are refused without a password check. Its outcome then settles it: a failure
stays counted (``confirm_failure`` applies the lockout), a success clears the account and gives
the address back its one count (``record_success``), and an attempt that was neither (a right
password still waiting for its second factor) gives both back (``release``).

Addresses are never held in clear: callers pass ``address_key(secret, ip)`` (client_address.py,
the one definition of a client address that every per-address limit shares). ``LoginThrottle``
(throttle_memory.py) keeps its counters in memory, bounded: idle entries are forgotten and the least recently used
are evicted past ``max_entries``. With several broker processes ``RedisLoginThrottle``
(throttle_redis.py) keeps the same counters in Redis, so an attacker gains nothing by spreading
attempts over processes. Either way the durable consecutive-failure count for real accounts is
kept by ``AccountStore`` with the same threshold, so eviction or a restart cannot unlock one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from broker.http.client_address import address_key as address_key  # re-exported: callers key addresses with it

FREE_FAILURES = 3
BASE_DELAY = 1.0
MAX_DELAY = 60.0
LOCKOUT_AFTER = 100
MAX_ENTRIES = 10_000
FORGET_AFTER = 24 * 3600.0


def delay_for(
    failures: int, *, free: int = FREE_FAILURES, base: float = BASE_DELAY, ceiling: float = MAX_DELAY
) -> float:
    """Seconds to wait after ``failures`` consecutive failures: 0 for the free ones, then doubling."""
    if failures <= free:
        return 0.0
    return min(ceiling, base * 2.0 ** min(failures - free - 1, 64))


@dataclass(frozen=True)
class Decision:
    """Whether an attempt may proceed now; ``retry_after`` is in seconds (0 when allowed).

    ``reserved_at`` is set when ``reserve`` counted the attempt: the time it was counted at, which
    ``record_success`` and ``release`` need to give the count back exactly.
    """

    allowed: bool
    retry_after: float
    locked: bool = False
    reserved_at: float | None = None


class Throttle(Protocol):
    """What the login handlers ask; ``LoginThrottle`` (one process) and ``RedisLoginThrottle``."""

    lockout_after: int

    async def check(self, account: str | None, address: str | None) -> Decision: ...

    async def record_failure(self, account: str | None, address: str | None) -> Decision: ...

    async def reserve(self, account: str | None, address: str | None) -> Decision: ...

    async def confirm_failure(self, account: str) -> None: ...

    async def release(self, account: str | None, address: str | None, reserved_at: float) -> None: ...

    async def record_success(
        self, account: str, address: str | None = None, reserved_at: float | None = None
    ) -> None: ...

    async def unlock(self, account: str) -> None: ...


@dataclass(frozen=True)
class Schedule:
    """The delay schedule both throttles share: free failures, then doubling to a ceiling."""

    free: int = FREE_FAILURES
    base: float = BASE_DELAY
    ceiling: float = MAX_DELAY

    def remaining(self, failures: int, last_failure: float, now: float) -> float:
        """Seconds still to wait after ``failures`` failures, the last at ``last_failure``."""
        if failures <= 0:
            return 0.0
        return last_failure + delay_for(failures, free=self.free, base=self.base, ceiling=self.ceiling) - now


def check_lockout(lockout_after: int) -> int:
    if not 1 <= lockout_after <= LOCKOUT_AFTER:
        raise ValueError(f"lockout_after must be between 1 and {LOCKOUT_AFTER}")
    return lockout_after
