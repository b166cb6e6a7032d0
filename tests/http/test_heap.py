"""The long-lived heap out of the garbage collector's full passes (broker/http/heap.py, issue 32):
frozen after start-up and after every full pass, frozen cyclic garbage given back by a reclaim
once enough connections have closed, and ``broker serve`` doing both for as long as it serves.

These run in the test process, whose collector they change: each test stops what it started."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import io
import signal
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker.config import Config
from broker.http.heap import FULL_PASS_AFTER, RECLAIM_FACTOR, RECLAIM_MIN_CLOSED, LongLivedHeap
from broker.http.serve import serve


@dataclass
class Sockets:
    opened: int = 0
    closed: int = 0


class Node:
    """A container the collector tracks, which can refer to itself."""

    def __init__(self) -> None:
        self.other: object = None


def in_a_generation(obj: object) -> bool:
    """Whether a pass may walk ``obj`` (frozen objects are in no generation)."""
    return any(o is obj for g in range(3) for o in gc.get_objects(generation=g))


@pytest.fixture
async def heap() -> AsyncIterator[tuple[LongLivedHeap, Sockets]]:
    sockets = Sockets()
    kept = LongLivedHeap(sockets)
    before = gc.get_threshold()
    kept.start()
    try:
        yield kept, sockets
    finally:
        kept.stop()
    assert gc.get_threshold() == before


async def test_start_freezes_the_heap_and_each_full_pass_freezes_what_it_left(
    heap: tuple[LongLivedHeap, Sockets],
) -> None:
    assert gc.get_freeze_count() > 0, "what start-up made is frozen"
    assert gc.get_threshold()[2] == FULL_PASS_AFTER
    young = Node()
    assert in_a_generation(young), "a new object is walked by passes until a full pass has found it alive"
    gc.collect()
    assert not in_a_generation(young), "frozen at the end of the full pass"


async def test_stopping_gives_every_frozen_object_back_to_the_collector() -> None:
    kept = LongLivedHeap(Sockets())
    kept.start()
    node = Node()
    gc.collect()
    assert not in_a_generation(node)
    kept.stop()
    assert gc.get_freeze_count() == 0
    assert in_a_generation(node)
    assert all(getattr(callback, "__self__", None) is not kept for callback in gc.callbacks)


async def test_frozen_cyclic_garbage_waits_for_a_reclaim_which_comes_once_enough_connections_closed(
    heap: tuple[LongLivedHeap, Sockets],
) -> None:
    kept, sockets = heap
    cycle = Node()
    cycle.other = cycle
    gone = weakref.ref(cycle)
    gc.collect()  # found alive: frozen
    del cycle
    gc.collect()
    assert gone() is not None, "frozen garbage in a cycle is not freed by a pass (the cost of freezing)"

    sockets.opened, sockets.closed = 3000, 2000  # 1,000 open: a reclaim is due after RECLAIM_MIN_CLOSED closes
    assert not kept.reclaim_is_due()
    sockets.opened += RECLAIM_MIN_CLOSED
    sockets.closed += RECLAIM_MIN_CLOSED
    assert kept.reclaim_is_due()
    gc.collect()  # the end of a full pass finds the reclaim due and asks the loop to run it
    for _ in range(3):
        await asyncio.sleep(0)
    assert kept.reclaims == 1
    assert gone() is None, "the reclaim freed it"
    assert not kept.reclaim_is_due()
    assert gc.get_freeze_count() > 0, "and froze the rest again"


async def test_the_reclaims_pace_follows_what_they_find(heap: tuple[LongLivedHeap, Sockets]) -> None:
    kept, sockets = heap
    open_now = 5000
    sockets.opened = open_now
    sockets.closed = 0
    sockets.opened += RECLAIM_FACTOR * open_now
    sockets.closed += RECLAIM_FACTOR * open_now
    assert kept.reclaim_is_due(), "RECLAIM_FACTOR times as many closed as open"
    kept.reclaim()  # nothing was waiting: the next one waits twice as long
    assert kept.reclaim_factor == 2 * RECLAIM_FACTOR
    sockets.opened += RECLAIM_FACTOR * open_now
    sockets.closed += RECLAIM_FACTOR * open_now
    assert not kept.reclaim_is_due()

    closed = 2 * RECLAIM_FACTOR * open_now
    sockets.opened += closed
    sockets.closed += closed
    litter = []
    for _ in range(3 * RECLAIM_FACTOR * open_now):  # more frozen garbage than closed connections
        node = Node()
        node.other = node
        litter.append(node)
    gc.collect()
    del litter, node
    assert kept.reclaim_is_due()
    assert kept.reclaim() >= closed
    assert kept.reclaim_factor == RECLAIM_FACTOR, "garbage was waiting: back to the first pace"


async def test_a_serving_broker_keeps_its_heap_frozen_and_gives_it_back_when_it_stops(tmp_path: Path) -> None:
    before = gc.get_threshold()
    config = dataclasses.replace(Config(), data_dir=tmp_path / "data", host="127.0.0.1", port=0, metrics_address="")
    stop = asyncio.Event()
    serving = asyncio.get_running_loop().create_task(serve(config, out=io.StringIO(), stop=stop))
    try:
        for _ in range(200):
            if gc.get_freeze_count() > 0 or serving.done():
                break
            await asyncio.sleep(0.05)
        assert gc.get_freeze_count() > 0, "frozen once it serves"
        assert gc.get_threshold()[2] == FULL_PASS_AFTER
    finally:
        stop.set()
        await asyncio.wait_for(serving, 30)
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().remove_signal_handler(sig)
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == before
