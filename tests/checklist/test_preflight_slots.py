"""How the pre-flight slots are shared out (broker.checklist.preflight_slots): per seat, per session, in a fair order.

The scheduler is pure bookkeeping; its clock (used for the per-seat window and the retry hints) is a
plain number the tests move. Waiting uses the event loop. The same rules against real aiortc
pre-flights and a real broker are in tests/checklist/test_preflight.py.
"""

from __future__ import annotations

import asyncio

import pytest

from broker.checklist.preflight_slots import PreflightRefused, Slot, SlotLimits, SlotScheduler


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def scheduler(clock: Clock, **limits: float) -> SlotScheduler:
    return SlotScheduler(SlotLimits(**limits), hold_s=9.0, clock=clock)  # type: ignore[arg-type]


async def refused(slots: SlotScheduler, session: str, seat: str) -> PreflightRefused:
    with pytest.raises(PreflightRefused) as caught:
        await slots.acquire(session, seat)
    return caught.value


async def waiting(slots: SlotScheduler, session: str, seat: str) -> asyncio.Task[Slot]:
    """An acquire that has joined the queue (the scheduler's own count says so)."""
    before = slots.waiting_count()
    task = asyncio.ensure_future(slots.acquire(session, seat))
    while slots.waiting_count() == before and not task.done():
        await asyncio.sleep(0)
    assert not task.done(), "expected to wait for a slot"
    return task


async def test_a_seat_runs_one_preflight_at_a_time_and_is_told_when_to_come_back() -> None:
    clock = Clock()
    slots = scheduler(clock)
    held = await slots.acquire("s1", "a")
    clock.now += 2
    again = await refused(slots, "s1", "a")
    assert again.code == "preflight_limited"
    assert "already running" in again.message
    assert again.retry_after_s == pytest.approx(7.0)  # the running one's hold (9 s) less the 2 s gone
    other = await slots.acquire("s1", "b")  # another seat of the same session is not held back
    slots.release(held)
    slots.release(held)  # twice is harmless
    assert slots.running_count() == 1
    slots.release(other)
    assert (await slots.acquire("s1", "a")).key == ("s1", "a")


async def test_a_seat_waiting_for_a_slot_cannot_queue_a_second_offer() -> None:
    clock = Clock()
    slots = scheduler(clock, slots=1, wait_s=30)
    held = await slots.acquire("s1", "a")
    queued = await waiting(slots, "s2", "b")
    second = await refused(slots, "s2", "b")
    assert second.code == "preflight_limited" and "already waiting" in second.message
    assert second.retry_after_s > 0
    assert slots.waiting_count() == 1
    slots.release(held)
    assert (await queued).key == ("s2", "b")


async def test_a_seat_starts_at_most_its_rate_per_minute() -> None:
    clock = Clock()
    slots = scheduler(clock, per_seat_per_minute=3)
    for _ in range(3):
        slots.release(await slots.acquire("s1", "a"))
        clock.now += 10
    over = await refused(slots, "s1", "a")
    assert over.code == "preflight_limited"
    assert "3 times in the last minute" in over.message
    assert over.retry_after_s == pytest.approx(30.0)  # the first start, 30 s ago, leaves the window in 30 s
    assert slots.starts_in_window("s1", "a") == 3
    slots.release(await slots.acquire("s1", "b"))  # the limit is the seat's own
    clock.now += 30
    assert slots.starts_in_window("s1", "a") == 2
    slots.release(await slots.acquire("s1", "a"))
    clock.now += 61
    assert slots.starts_in_window("s1", "a") == 0  # and what it remembers goes with the window


async def test_a_session_holds_at_most_its_share_of_the_slots() -> None:
    clock = Clock()
    slots = scheduler(clock, slots=4, per_session=2, wait_s=30)
    group = [await slots.acquire("group", f"g{i}") for i in range(2)]
    queued = await waiting(slots, "group", "g2")  # a free slot, but not for this session
    assert slots.running_count() == 2
    others = [await slots.acquire("other", "o1"), await slots.acquire("third", "t1")]  # no wait for them
    assert slots.running_count() == 4 and not queued.done()
    slots.release(others[0])  # a free slot, and the group still holds its share: it stays free
    await asyncio.sleep(0)
    assert not queued.done() and slots.running_count() == 3
    slots.release(group[0])
    assert (await queued).key == ("group", "g2")


async def test_a_freed_slot_goes_to_the_seat_with_the_fewest_recent_preflights_first() -> None:
    clock = Clock()
    slots = scheduler(clock, slots=1, wait_s=30)
    for _ in range(3):  # a seat that has already had several
        slots.release(await slots.acquire("s1", "often"))
        clock.now += 1
    held = await slots.acquire("s2", "holder")
    often = await waiting(slots, "s1", "often")  # came first
    fresh = await waiting(slots, "s3", "fresh")  # has had none yet
    second = await waiting(slots, "s4", "second")  # had none either, came after fresh
    pending = {"often": often, "fresh": fresh, "second": second}
    order: list[str] = []
    freed = held
    while pending:
        slots.release(freed)
        done, _ = await asyncio.wait(pending.values(), return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1  # one slot, one seat at a time
        freed = done.pop().result()
        order.append(freed.key[1])
        del pending[freed.key[1]]
    assert order == ["fresh", "second", "often"]


async def test_a_hammering_session_cannot_starve_another_sessions_waiting_seat() -> None:
    """Every seat of one session keeps offering; another session's seat still gets the next free slot."""
    clock = Clock()
    slots = scheduler(clock, slots=3, per_session=2, wait_s=30)
    attacker = [await slots.acquire("attack", "a0"), await slots.acquire("attack", "a1")]
    bystander = await slots.acquire("busy", "b0")
    hammering = [await waiting(slots, "attack", f"a{i}") for i in range(2, 8)]
    victim = await waiting(slots, "victim", "v")
    for _ in range(3):  # the attacker's slots free and fill up again and again
        slots.release(attacker.pop(0))
        done, _ = await asyncio.wait([*hammering, victim], return_when=asyncio.FIRST_COMPLETED)
        assert victim not in done and len(done) == 1
        granted = done.pop()
        hammering.remove(granted)
        attacker.append(granted.result())
        assert slots.held_by("attack") == 2 and slots.held_by("victim") == 0  # its share, never more
        clock.now += 1
    slots.release(bystander)  # the first slot outside the attacker's share goes to the victim
    assert (await victim).key == ("victim", "v")
    for task in hammering:
        task.cancel()
    await asyncio.gather(*hammering, return_exceptions=True)
    assert slots.waiting_count() == 0


async def test_no_slot_within_the_wait_is_busy_with_a_hint_and_changes_nothing() -> None:
    clock = Clock()
    slots = scheduler(clock, slots=1, wait_s=0.05)
    held = await slots.acquire("s1", "a")
    clock.now += 4
    busy = await refused(slots, "s2", "b")
    assert busy.code == "preflight_busy"
    assert busy.retry_after_s == pytest.approx(5.0)  # when the running one gives its slot back at the latest
    assert slots.waiting_count() == 0 and slots.starts_in_window("s2", "b") == 0
    slots.release(held)
    assert (await slots.acquire("s2", "b")).key == ("s2", "b")


async def test_a_full_queue_is_busy_at_once() -> None:
    clock = Clock()
    slots = scheduler(clock, slots=1, wait_s=30, max_waiting=1)
    held = await slots.acquire("s1", "a")
    queued = await waiting(slots, "s2", "b")
    assert (await refused(slots, "s3", "c")).code == "preflight_busy"
    slots.release(held)
    await queued


async def test_a_waiter_that_gives_up_leaves_nothing_behind() -> None:
    clock = Clock()
    slots = scheduler(clock, slots=1, wait_s=30)
    held = await slots.acquire("s1", "a")
    queued = await waiting(slots, "s2", "b")
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued
    assert slots.waiting_count() == 0
    slots.release(held)
    assert slots.running_count() == 0
    assert (await slots.acquire("s2", "b")).key == ("s2", "b")  # the seat is free to offer again


def test_limits_that_cannot_work_are_named() -> None:
    assert SlotLimits().problems() == []
    assert SlotLimits(slots=0).problems() and SlotLimits(per_session=0).problems()
    assert SlotLimits(per_seat_per_minute=0).problems() and SlotLimits(wait_s=-1).problems()
