"""Login throttling with a hand-driven clock: delays, lockout, reset, memory bound, address keys."""

from __future__ import annotations

import pytest

from broker.throttle import LOCKOUT_AFTER, MAX_DELAY, LoginThrottle, address_key, delay_for

ACCOUNT = "a" * 64
ADDRESS = "b" * 64
SECRET = b"s" * 32


class Clock:
    """A clock that only moves when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def fail_until_allowed(throttle: LoginThrottle, clock: Clock, account: str | None, address: str | None) -> float:
    """Wait out any delay, then record one failure; returns the delay imposed afterwards."""
    decision = throttle.check(account, address)
    clock.advance(decision.retry_after)
    return throttle.record_failure(account, address).retry_after


def test_delay_schedule() -> None:
    assert [delay_for(n) for n in range(0, 4)] == [0.0, 0.0, 0.0, 0.0]
    assert [delay_for(n) for n in range(4, 10)] == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
    assert delay_for(10) == MAX_DELAY == 60.0
    assert delay_for(99) == 60.0


def test_first_three_failures_are_free_then_delay_doubles() -> None:
    clock = Clock()
    throttle = LoginThrottle(clock=clock)
    delays = [fail_until_allowed(throttle, clock, ACCOUNT, None) for _ in range(12)]
    assert delays == [0.0, 0.0, 0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]


def test_attempt_refused_until_delay_passes() -> None:
    clock = Clock()
    throttle = LoginThrottle(clock=clock)
    for _ in range(5):
        fail_until_allowed(throttle, clock, ACCOUNT, None)
    decision = throttle.check(ACCOUNT, None)
    assert not decision.allowed and decision.retry_after == 2.0
    clock.advance(1.5)
    assert throttle.check(ACCOUNT, None).retry_after == pytest.approx(0.5)
    clock.advance(0.5)
    assert throttle.check(ACCOUNT, None).allowed


def test_address_is_throttled_across_accounts() -> None:
    clock = Clock()
    throttle = LoginThrottle(clock=clock)
    for i in range(6):
        fail_until_allowed(throttle, clock, f"account-{i:02d}".ljust(20, "x"), ADDRESS)
    decision = throttle.check("a-fresh-account-key-0000", ADDRESS)
    assert not decision.allowed and decision.retry_after == 4.0
    assert throttle.check("a-fresh-account-key-0000", "c" * 64).allowed


def test_success_resets_the_account_but_not_the_address() -> None:
    clock = Clock()
    throttle = LoginThrottle(clock=clock)
    for _ in range(6):
        fail_until_allowed(throttle, clock, ACCOUNT, ADDRESS)
    assert throttle.failures(ACCOUNT) == 6
    throttle.record_success(ACCOUNT)
    assert throttle.failures(ACCOUNT) == 0
    assert throttle.check(ACCOUNT, None).allowed
    assert not throttle.check(None, ADDRESS).allowed


def test_lockout_after_100_consecutive_failures() -> None:
    assert LOCKOUT_AFTER == 100
    clock = Clock()
    throttle = LoginThrottle(clock=clock)
    for _ in range(99):
        fail_until_allowed(throttle, clock, ACCOUNT, None)
    assert not throttle.is_locked(ACCOUNT)
    fail_until_allowed(throttle, clock, ACCOUNT, None)
    assert throttle.is_locked(ACCOUNT)
    clock.advance(30 * 24 * 3600)  # a lockout does not wear off by itself
    decision = throttle.check(ACCOUNT, None)
    assert decision.locked and not decision.allowed


def test_success_in_between_keeps_account_unlocked() -> None:
    clock = Clock()
    throttle = LoginThrottle(clock=clock)
    for _ in range(99):
        fail_until_allowed(throttle, clock, ACCOUNT, None)
    throttle.record_success(ACCOUNT)
    for _ in range(99):
        fail_until_allowed(throttle, clock, ACCOUNT, None)
    assert not throttle.is_locked(ACCOUNT)


def test_admin_unlock() -> None:
    clock = Clock()
    throttle = LoginThrottle(clock=clock, lockout_after=5)
    for _ in range(5):
        fail_until_allowed(throttle, clock, ACCOUNT, None)
    assert throttle.is_locked(ACCOUNT)
    throttle.unlock(ACCOUNT)
    assert not throttle.is_locked(ACCOUNT)
    assert throttle.check(ACCOUNT, None).allowed


def test_lockout_threshold_cannot_exceed_100() -> None:
    with pytest.raises(ValueError):
        LoginThrottle(lockout_after=101)
    with pytest.raises(ValueError):
        LoginThrottle(lockout_after=0)


def test_memory_is_bounded() -> None:
    clock = Clock()
    throttle = LoginThrottle(clock=clock, max_entries=50)
    for i in range(1000):
        throttle.record_failure(f"acct{i:06d}".ljust(20, "0"), f"addr{i:06d}".ljust(20, "0"))
    assert throttle.tracked() <= 100
    # The most recent keys are the ones kept.
    assert throttle.failures("acct000999".ljust(20, "0")) == 1
    assert throttle.failures("acct000000".ljust(20, "0")) == 0


def test_idle_entries_are_forgotten() -> None:
    clock = Clock()
    throttle = LoginThrottle(clock=clock, forget_after=3600)
    for _ in range(6):
        fail_until_allowed(throttle, clock, ACCOUNT, ADDRESS)
    clock.advance(3601)
    assert throttle.check(ACCOUNT, ADDRESS).allowed
    assert throttle.failures(ACCOUNT) == 0
    assert throttle.tracked() == 0


def test_address_key_is_opaque_and_stable() -> None:
    key = address_key(SECRET, "203.0.113.7")
    assert key == address_key(SECRET, " 203.0.113.7 ")
    assert len(key) == 64 and all(c in "0123456789abcdef" for c in key)
    assert "203.0.113.7" not in key
    assert key != address_key(SECRET, "203.0.113.8")
    assert key != address_key(b"t" * 32, "203.0.113.7")


def test_address_key_groups_ipv6_by_64_and_unmaps_ipv4() -> None:
    assert address_key(SECRET, "2001:db8:1:2::1") == address_key(SECRET, "2001:db8:1:2:ffff::9")
    assert address_key(SECRET, "2001:db8:1:2::1") != address_key(SECRET, "2001:db8:1:3::1")
    assert address_key(SECRET, "::ffff:198.51.100.4") == address_key(SECRET, "198.51.100.4")


def test_address_key_rejects_non_addresses() -> None:
    with pytest.raises(ValueError):
        address_key(SECRET, "not-an-ip")
