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
keeps its counters in memory, bounded: idle entries are forgotten and the least recently used
are evicted past ``max_entries``. With several broker processes ``RedisLoginThrottle``
(throttle_redis.py) keeps the same counters in Redis, so an attacker gains nothing by spreading
attempts over processes. Either way the durable consecutive-failure count for real accounts is
kept by ``AccountStore`` with the same threshold, so eviction or a restart cannot unlock one.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
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


@dataclass
class _Entry:
    failures: int = 0
    last_failure: float = 0.0
    locked: bool = False
    #: ``last_failure`` as it was before the latest reservation, restored if that one is given back.
    before_last: float = 0.0


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


class _Table:
    """LRU-bounded map of key -> failure record with idle expiry."""

    def __init__(self, max_entries: int, forget_after: float) -> None:
        self._items: OrderedDict[str, _Entry] = OrderedDict()
        self._max = max_entries
        self._forget_after = forget_after

    def __len__(self) -> int:
        return len(self._items)

    def peek(self, key: str, now: float) -> _Entry | None:
        entry = self._items.get(key)
        if entry is not None and not entry.locked and now - entry.last_failure > self._forget_after:
            del self._items[key]
            return None
        return entry

    def touch(self, key: str, now: float) -> _Entry:
        entry = self.peek(key, now)
        if entry is None:
            entry = self._items[key] = _Entry()
        self._items.move_to_end(key)
        while len(self._items) > self._max:
            self._items.popitem(last=False)
        return entry

    def drop(self, key: str) -> None:
        self._items.pop(key, None)


class LoginThrottle:
    """Decides whether a login attempt may run now and records its outcome."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        free_failures: int = FREE_FAILURES,
        base_delay: float = BASE_DELAY,
        max_delay: float = MAX_DELAY,
        lockout_after: int = LOCKOUT_AFTER,
        max_entries: int = MAX_ENTRIES,
        forget_after: float = FORGET_AFTER,
    ) -> None:
        self.lockout_after = check_lockout(lockout_after)
        self._clock = clock
        self._schedule = Schedule(free_failures, base_delay, max_delay)
        self._accounts = _Table(max_entries, forget_after)
        self._addresses = _Table(max_entries, forget_after)

    async def check(self, account: str | None, address: str | None) -> Decision:
        return self.check_now(account, address)

    def check_now(self, account: str | None, address: str | None) -> Decision:
        """May an attempt for this account from this address run now?"""
        now = self._clock()
        acct = self._accounts.peek(account, now) if account is not None else None
        if acct is not None and acct.locked:
            return Decision(allowed=False, retry_after=0.0, locked=True)
        addr = self._addresses.peek(address, now) if address is not None else None
        wait = max(self._remaining(acct, now), self._remaining(addr, now))
        return Decision(allowed=wait <= 0.0, retry_after=max(wait, 0.0))

    async def record_failure(self, account: str | None, address: str | None) -> Decision:
        """Count a failed attempt; returns the decision for the next attempt."""
        now = self._clock()
        if account is not None:
            acct = self._accounts.touch(account, now)
            acct.failures += 1
            acct.last_failure = now
            if acct.failures >= self.lockout_after:
                acct.locked = True
        if address is not None:
            addr = self._addresses.touch(address, now)
            addr.failures += 1
            addr.last_failure = now
        return self.check_now(account, address)

    async def reserve(self, account: str | None, address: str | None) -> Decision:
        """Check and count an attempt in one step: when allowed it already counts as a failure."""
        decision = self.check_now(account, address)
        if not decision.allowed:
            return decision
        now = self._clock()
        for table, key in ((self._accounts, account), (self._addresses, address)):
            if key is not None:
                entry = table.touch(key, now)
                entry.failures += 1
                entry.before_last, entry.last_failure = entry.last_failure, now
        return Decision(allowed=True, retry_after=0.0, reserved_at=now)

    async def confirm_failure(self, account: str) -> None:
        """A reserved attempt failed: it stays counted, and locks the account at the threshold."""
        entry = self._accounts.peek(account, self._clock())
        if entry is not None and entry.failures >= self.lockout_after:
            entry.locked = True

    async def release(self, account: str | None, address: str | None, reserved_at: float) -> None:
        """A reserved attempt that neither failed nor succeeded: give both counts back."""
        if account is not None:
            self._refund(self._accounts, account, reserved_at)
        if address is not None:
            self._refund(self._addresses, address, reserved_at)

    async def record_success(self, account: str, address: str | None = None, reserved_at: float | None = None) -> None:
        """A successful login clears the account's counter; the address only gets back the count
        its reservation took (``reserved_at``), never more."""
        entry = self._accounts.peek(account, self._clock())
        if entry is not None and not entry.locked:
            self._accounts.drop(account)
        if address is not None and reserved_at is not None:
            self._refund(self._addresses, address, reserved_at)

    def _refund(self, table: _Table, key: str, reserved_at: float) -> None:
        entry = table.peek(key, self._clock())
        if entry is None or entry.locked:
            return
        entry.failures -= 1
        if entry.failures <= 0:
            table.drop(key)
        elif entry.last_failure == reserved_at:
            entry.last_failure = entry.before_last

    async def unlock(self, account: str) -> None:
        """Administrator reset: forget the account's failures and lockout."""
        self._accounts.drop(account)

    async def is_locked(self, account: str) -> bool:
        entry = self._accounts.peek(account, self._clock())
        return entry is not None and entry.locked

    async def failures(self, account: str) -> int:
        """Consecutive failures currently counted for an account."""
        entry = self._accounts.peek(account, self._clock())
        return entry.failures if entry is not None else 0

    def tracked(self) -> int:
        """Number of entries held (accounts plus addresses), for memory checks and metrics."""
        return len(self._accounts) + len(self._addresses)

    def _remaining(self, entry: _Entry | None, now: float) -> float:
        if entry is None:
            return 0.0
        return self._schedule.remaining(entry.failures, entry.last_failure, now)


def check_lockout(lockout_after: int) -> int:
    if not 1 <= lockout_after <= LOCKOUT_AFTER:
        raise ValueError(f"lockout_after must be between 1 and {LOCKOUT_AFTER}")
    return lockout_after
