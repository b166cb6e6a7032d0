"""Login throttling in this process's memory: the embedded default, for a practice that runs one broker.

Bounded: idle entries are forgotten and the least recently used are evicted past ``max_entries``;
the durable failure count in the account record is what keeps a real account locked past an
eviction or a restart.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from broker.accounts.throttle import (
    BASE_DELAY,
    FORGET_AFTER,
    FREE_FAILURES,
    LOCKOUT_AFTER,
    MAX_DELAY,
    MAX_ENTRIES,
    Decision,
    Schedule,
    check_lockout,
)


@dataclass
class _Entry:
    failures: int = 0
    last_failure: float = 0.0
    locked: bool = False
    #: ``last_failure`` as it was before the latest reservation, restored if that one is given back.
    before_last: float = 0.0


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
