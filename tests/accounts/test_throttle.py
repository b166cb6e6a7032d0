"""Login throttling with a hand-driven clock: delays, lockout, reset, memory bound, address keys.

The rules run against both throttles: one process's ``LoginThrottle`` and the
``RedisLoginThrottle`` several processes share (on a real redis-server).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from broker.accounts.throttle import LOCKOUT_AFTER, MAX_DELAY, Throttle, address_key, delay_for
from broker.accounts.throttle_memory import LoginThrottle
from broker.accounts.throttle_redis import RedisLoginThrottle
from broker.store.redis_store import redis_client
from tests.redis_server import RedisServer, redis_server  # noqa: F401 - the fixture

MakeThrottle = Callable[..., Any]
THROTTLE_DB = 8

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


@pytest.fixture(params=["memory", "redis"])
async def make(request: pytest.FixtureRequest) -> AsyncIterator[MakeThrottle]:
    """Builds throttles of one kind; Redis ones share a fresh key space per test."""
    made: list[RedisLoginThrottle] = []
    if request.param == "memory":
        yield LoginThrottle
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    url = server.empty_database(THROTTLE_DB)

    def build(**options: Any) -> RedisLoginThrottle:
        throttle = RedisLoginThrottle(redis_client(url), **options)
        made.append(throttle)
        return throttle

    yield build
    for throttle in made:
        await throttle.redis.aclose(close_connection_pool=True)


async def fail_until_allowed(throttle: Throttle, clock: Clock, account: str | None, address: str | None) -> float:
    """Wait out any delay, then record one failure; returns the delay imposed afterwards."""
    decision = await throttle.check(account, address)
    clock.advance(decision.retry_after)
    return (await throttle.record_failure(account, address)).retry_after


def test_delay_schedule() -> None:
    assert [delay_for(n) for n in range(0, 4)] == [0.0, 0.0, 0.0, 0.0]
    assert [delay_for(n) for n in range(4, 10)] == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
    assert delay_for(10) == MAX_DELAY == 60.0
    assert delay_for(99) == 60.0


async def test_first_three_failures_are_free_then_delay_doubles(make: MakeThrottle) -> None:
    clock = Clock()
    throttle = make(clock=clock)
    delays = [await fail_until_allowed(throttle, clock, ACCOUNT, None) for _ in range(12)]
    assert delays == [0.0, 0.0, 0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]


async def test_attempt_refused_until_delay_passes(make: MakeThrottle) -> None:
    clock = Clock()
    throttle = make(clock=clock)
    for _ in range(5):
        await fail_until_allowed(throttle, clock, ACCOUNT, None)
    decision = await throttle.check(ACCOUNT, None)
    assert not decision.allowed and decision.retry_after == 2.0
    clock.advance(1.5)
    assert (await throttle.check(ACCOUNT, None)).retry_after == pytest.approx(0.5)
    clock.advance(0.5)
    assert (await throttle.check(ACCOUNT, None)).allowed


async def test_address_is_throttled_across_accounts(make: MakeThrottle) -> None:
    clock = Clock()
    throttle = make(clock=clock)
    for i in range(6):
        await fail_until_allowed(throttle, clock, f"account-{i:02d}".ljust(20, "x"), ADDRESS)
    decision = await throttle.check("a-fresh-account-key-0000", ADDRESS)
    assert not decision.allowed and decision.retry_after == 4.0
    assert (await throttle.check("a-fresh-account-key-0000", "c" * 64)).allowed


async def test_success_resets_the_account_but_not_the_address(make: MakeThrottle) -> None:
    clock = Clock()
    throttle = make(clock=clock)
    for _ in range(6):
        await fail_until_allowed(throttle, clock, ACCOUNT, ADDRESS)
    assert await throttle.failures(ACCOUNT) == 6
    await throttle.record_success(ACCOUNT)
    assert await throttle.failures(ACCOUNT) == 0
    assert (await throttle.check(ACCOUNT, None)).allowed
    assert not (await throttle.check(None, ADDRESS)).allowed


async def test_lockout_after_100_consecutive_failures(make: MakeThrottle) -> None:
    assert LOCKOUT_AFTER == 100
    clock = Clock()
    throttle = make(clock=clock)
    for _ in range(99):
        await fail_until_allowed(throttle, clock, ACCOUNT, None)
    assert not await throttle.is_locked(ACCOUNT)
    await fail_until_allowed(throttle, clock, ACCOUNT, None)
    assert await throttle.is_locked(ACCOUNT)
    clock.advance(30 * 24 * 3600)  # a lockout does not wear off by itself
    decision = await throttle.check(ACCOUNT, None)
    assert decision.locked and not decision.allowed


async def test_success_in_between_keeps_account_unlocked(make: MakeThrottle) -> None:
    clock = Clock()
    throttle = make(clock=clock)
    for _ in range(99):
        await fail_until_allowed(throttle, clock, ACCOUNT, None)
    await throttle.record_success(ACCOUNT)
    for _ in range(99):
        await fail_until_allowed(throttle, clock, ACCOUNT, None)
    assert not await throttle.is_locked(ACCOUNT)


async def test_admin_unlock(make: MakeThrottle) -> None:
    clock = Clock()
    throttle = make(clock=clock, lockout_after=5)
    for _ in range(5):
        await fail_until_allowed(throttle, clock, ACCOUNT, None)
    assert await throttle.is_locked(ACCOUNT)
    await throttle.unlock(ACCOUNT)
    assert not await throttle.is_locked(ACCOUNT)
    assert (await throttle.check(ACCOUNT, None)).allowed


def test_lockout_threshold_cannot_exceed_100() -> None:
    with pytest.raises(ValueError):
        LoginThrottle(lockout_after=101)
    with pytest.raises(ValueError):
        LoginThrottle(lockout_after=0)


async def test_memory_is_bounded() -> None:
    clock = Clock()
    throttle = LoginThrottle(clock=clock, max_entries=50)  # memory only: Redis bounds itself by expiry
    for i in range(1000):
        await throttle.record_failure(f"acct{i:06d}".ljust(20, "0"), f"addr{i:06d}".ljust(20, "0"))
    assert throttle.tracked() <= 100
    # The most recent keys are the ones kept.
    assert await throttle.failures("acct000999".ljust(20, "0")) == 1
    assert await throttle.failures("acct000000".ljust(20, "0")) == 0


async def test_idle_entries_are_forgotten(make: MakeThrottle) -> None:
    clock = Clock()
    throttle = make(clock=clock, forget_after=3600)
    for _ in range(6):
        await fail_until_allowed(throttle, clock, ACCOUNT, ADDRESS)
    clock.advance(3601)
    assert (await throttle.check(ACCOUNT, ADDRESS)).allowed
    assert await throttle.failures(ACCOUNT) == 0
    if isinstance(throttle, LoginThrottle):
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


async def test_processes_sharing_redis_count_every_failure(redis_server: RedisServer) -> None:  # noqa: F811
    """Two throttles on one Redis stand for two broker processes: spreading guesses over them gains
    nothing, and 100 concurrent failures lock the account exactly as 100 in a row would."""
    url = redis_server.empty_database(THROTTLE_DB)
    one, two = RedisLoginThrottle(redis_client(url)), RedisLoginThrottle(redis_client(url))
    account = os.urandom(16).hex()
    try:
        await asyncio.gather(*(t.record_failure(account, None) for t in [one, two] * 50))
        assert await one.failures(account) == 100
        assert (await two.check(account, None)).locked
        await one.unlock(account)
        assert not await two.is_locked(account)
    finally:
        for t in (one, two):
            await t.redis.aclose(close_connection_pool=True)


# ---------------------------------------------------------------- reservations (check and count in one step)


async def test_concurrent_attempts_get_no_more_than_the_schedule_allows(make: MakeThrottle) -> None:
    """Many attempts at once for one account: only the free ones and the one after them run;
    every other one is refused before any password check (review finding 2)."""
    clock = Clock()
    throttle = make(clock=clock)
    decisions = await asyncio.gather(*(throttle.reserve(ACCOUNT, None) for _ in range(50)))
    allowed = [d for d in decisions if d.allowed]
    assert len(allowed) == 4  # three free failures, then the fourth attempt runs and earns a delay
    assert all(d.reserved_at == clock.now for d in allowed)
    assert all(not d.allowed and d.retry_after == 1.0 for d in decisions if d not in allowed)
    assert await throttle.failures(ACCOUNT) == 4  # each allowed attempt already counts as a failure


async def test_one_address_during_a_due_delay_gets_one_attempt(make: MakeThrottle) -> None:
    clock = Clock()
    throttle = make(clock=clock)
    for i in range(10):
        await fail_until_allowed(throttle, clock, f"account-{i:02d}".ljust(20, "x"), ADDRESS)
    clock.advance((await throttle.check(None, ADDRESS)).retry_after)  # the 60 s delay is due now
    names = [f"guess-{i:02d}".ljust(20, "y") for i in range(40)]
    decisions = await asyncio.gather(*(throttle.reserve(name, ADDRESS) for name in names))
    assert sum(d.allowed for d in decisions) == 1
    assert {d.retry_after for d in decisions if not d.allowed} == {60.0}


async def test_a_reservation_is_a_failure_until_settled(make: MakeThrottle) -> None:
    clock = Clock()
    throttle = make(clock=clock, lockout_after=5)
    for _ in range(4):
        await fail_until_allowed(throttle, clock, ACCOUNT, None)
    clock.advance((await throttle.check(ACCOUNT, None)).retry_after)
    # The fifth attempt is reserved: counted, but the lock waits for its outcome...
    fifth = await throttle.reserve(ACCOUNT, None)
    assert fifth.allowed and await throttle.failures(ACCOUNT) == 5 and not await throttle.is_locked(ACCOUNT)
    # ...so a right password at the threshold still gets in and clears the count,
    await throttle.record_success(ACCOUNT)
    assert await throttle.failures(ACCOUNT) == 0
    # while a wrong one locks the account.
    for _ in range(4):
        await fail_until_allowed(throttle, clock, ACCOUNT, None)
    clock.advance((await throttle.check(ACCOUNT, None)).retry_after)
    assert (await throttle.reserve(ACCOUNT, None)).allowed
    await throttle.confirm_failure(ACCOUNT)
    assert await throttle.is_locked(ACCOUNT)
    assert (await throttle.reserve(ACCOUNT, None)).locked


async def test_release_and_success_give_back_exactly_what_the_reservation_took(make: MakeThrottle) -> None:
    clock = Clock()
    throttle = make(clock=clock)
    for _ in range(5):
        await fail_until_allowed(throttle, clock, ACCOUNT, ADDRESS)
    clock.advance(100)  # every delay is over
    before = await throttle.check(ACCOUNT, ADDRESS)
    assert before.allowed
    # Right password, second factor still to come: neither a failure nor a success.
    reserved = await throttle.reserve(ACCOUNT, ADDRESS)
    assert reserved.reserved_at is not None and not (await throttle.check(ACCOUNT, ADDRESS)).allowed
    await throttle.release(ACCOUNT, ADDRESS, reserved.reserved_at)
    assert await throttle.failures(ACCOUNT) == 5 and (await throttle.check(ACCOUNT, ADDRESS)).allowed
    # A success clears the account and leaves the address as it was before the attempt.
    reserved = await throttle.reserve(ACCOUNT, ADDRESS)
    assert reserved.reserved_at is not None
    await throttle.record_success(ACCOUNT, ADDRESS, reserved.reserved_at)
    assert await throttle.failures(ACCOUNT) == 0
    assert (await throttle.check(None, ADDRESS)).allowed  # no new delay for the office's next login
    first_fresh = await fail_until_allowed(throttle, clock, "a-fresh-account-key-0000", ADDRESS)
    assert first_fresh == 4.0  # the address still holds its five failures, the sixth earns 4 s


async def test_processes_sharing_redis_reserve_no_more_than_allowed(redis_server: RedisServer) -> None:  # noqa: F811
    """Two throttles on one Redis (two broker processes): 100 simultaneous attempts for one name
    and from one address let exactly as many through as one process would."""
    url = redis_server.empty_database(THROTTLE_DB)
    one, two = RedisLoginThrottle(redis_client(url)), RedisLoginThrottle(redis_client(url))
    account, address = os.urandom(16).hex(), os.urandom(16).hex()
    try:
        decisions = await asyncio.gather(*(t.reserve(account, address) for t in [one, two] * 50))
        assert sum(d.allowed for d in decisions) == 4
        assert await one.failures(account) == 4
        others = await asyncio.gather(*(t.reserve(os.urandom(8).hex(), address) for t in [one, two] * 20))
        assert not any(d.allowed for d in others)  # the address earned its delay too
    finally:
        for t in (one, two):
            await t.redis.aclose(close_connection_pool=True)
