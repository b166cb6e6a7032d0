"""The broker's long-lived objects kept out of the garbage collector's full passes.

CPython's cyclic garbage collector walks every container object it tracks on a full
(generation 2) pass, and the event loop waits meanwhile. A broker holding thousands of
WebSockets tracks millions of them (about 75 per connection: aiohttp's request, parser,
queues, tasks and suspended coroutines, and the hub's own), nearly all alive as long as their
session: a full pass took 0.5-1 s at 8,000 sessions, a stall for every session of the process
(issue 32; ``benchmarks/sessions.py`` measures it).

So the heap is **frozen** (``gc.freeze``: moved to a generation no pass walks, in constant
time) once the broker has started, and again at the end of every full pass: what a full pass
leaves has just been found alive, and from then on passes walk only what is newer. Full passes
are made frequent (``FULL_PASS_AFTER``), so that "newer" stays small. Reference counting still
frees frozen objects as soon as nothing refers to them.

What freezing costs: a frozen object that dies inside a reference cycle is not freed, since no
pass walks it, nor is what it refers to. On asyncio's own event loop each closed socket leaves
such a cycle (its transport refers to itself through its read callback: about 0.7 KB, six
objects); uvloop's transports leave none, and the broker's own objects were measured to leave
none when sessions end. A **reclaim** gives it back: everything frozen returns to the
collector, one full pass frees what is dead (a stall as long as the ones freezing avoids), and
the rest is frozen again. It runs once as many connections have closed since the last one as
``reclaim_factor`` times those open now (and at least ``RECLAIM_MIN_CLOSED``): the stall, in
proportion to what is open, is paid once per that many closes, and what waits for it stays
within a few KB per open connection. A reclaim that finds less than one object per closed
connection (nothing was waiting: uvloop) doubles the factor, up to ``RECLAIM_FACTOR_MAX``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from typing import Any, Protocol

log = logging.getLogger("broker.heap")

#: A full pass runs after this many passes of the middle generation (Python's default: 10). What
#: full passes walk is what survived since the last one: run often, they stay short (measured at
#: 2,000 sessions set up at 50 a second: 6,000-19,000 objects a pass, at most 19 ms of CPU, where
#: the default's 30,000 took up to 80 ms on the same busy machine).
FULL_PASS_AFTER = 1
#: A reclaim is due once this many times as many connections have closed since the last one as are open.
RECLAIM_FACTOR = 4
#: ... when the reclaims find nothing waiting, up to this many times.
RECLAIM_FACTOR_MAX = 256
#: ... and never before this many have closed (a small process's reclaims are short, but not free).
RECLAIM_MIN_CLOSED = 10_000


class SocketCounts(Protocol):
    """The process's connections so far: opened and closed (``ConnectionGuard`` counts them)."""

    @property
    def opened(self) -> int: ...

    @property
    def closed(self) -> int: ...


class LongLivedHeap:
    """Freezes the heap after start-up and after every full pass, and reclaims it when due.

    One per process (the garbage collector is the process's): ``broker serve`` starts it once
    it has started, and stops it when it stops.
    """

    def __init__(self, sockets: SocketCounts) -> None:
        self.sockets = sockets
        self.reclaim_factor = RECLAIM_FACTOR
        self.reclaims = 0
        self._closed_at_reclaim = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reclaim_due = False
        self._thresholds = gc.get_threshold()

    def start(self) -> None:
        """Freeze what start-up made (after one full pass frees its garbage), and every full pass's survivors from now on."""
        self._loop = asyncio.get_running_loop()
        self._closed_at_reclaim = self.sockets.closed
        gc.collect()
        gc.freeze()
        self._thresholds = gc.get_threshold()
        young, middle, _ = self._thresholds
        gc.set_threshold(young, middle, FULL_PASS_AFTER)
        gc.callbacks.append(self._on_gc)

    def stop(self) -> None:
        """Everything frozen goes back to the collector."""
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        self._loop = None
        gc.set_threshold(*self._thresholds)
        gc.unfreeze()

    def reclaim_is_due(self) -> bool:
        closed = self.sockets.closed - self._closed_at_reclaim
        still_open = self.sockets.opened - self.sockets.closed
        return closed >= max(RECLAIM_MIN_CLOSED, self.reclaim_factor * still_open)

    def reclaim(self) -> int:
        """One full pass over everything, frozen or not; returns the objects it found dead."""
        self._reclaim_due = False
        closed = self.sockets.closed - self._closed_at_reclaim
        self._closed_at_reclaim = self.sockets.closed
        gc.unfreeze()
        started = time.perf_counter()
        found = gc.collect()  # its end freezes what is left (_on_gc)
        pause_ms = (time.perf_counter() - started) * 1e3
        self.reclaims += 1
        if found < closed:
            self.reclaim_factor = min(RECLAIM_FACTOR_MAX, self.reclaim_factor * 2)
        else:
            self.reclaim_factor = RECLAIM_FACTOR
        log.info(
            "event=heap_reclaimed found=%d closed=%d pause_ms=%.0f next_factor=%d",
            found,
            closed,
            pause_ms,
            self.reclaim_factor,
        )
        return found

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        """At the end of a full pass (on whichever thread ran it): freeze what it left alive."""
        if phase != "stop" or info.get("generation") != 2:
            return
        gc.freeze()
        loop = self._loop
        if loop is not None and not self._reclaim_due and self.reclaim_is_due():
            self._reclaim_due = True  # not from inside a pass: a collection started here would do nothing
            try:
                loop.call_soon_threadsafe(self.reclaim)
            except RuntimeError:  # the loop has closed: the process is stopping
                self._reclaim_due = False
