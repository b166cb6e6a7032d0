"""The process's own health: event-loop lag and its longest stall, garbage-collector pauses, memory.

- The lag monitor sleeps ``TICK_S`` at a time and records how late it woke: everything the
  loop did meanwhile (a long decode, a full collection, a blocking call) shows as lag. The
  stall maximum is the longest lag of the last minute, whenever Prometheus scrapes.
- Garbage-collector pauses are timed through ``gc.callbacks`` (the standard library's hook),
  from each pass's start to its end, by generation.
- Memory, CPU time and open files come from prometheus-client's ``ProcessCollector`` and the
  collector counts from its ``GCCollector`` (both public, read from /proc and ``gc``).
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections import deque
from typing import Any

from prometheus_client import GCCollector, ProcessCollector

from broker.metrics.registry import Metrics

#: How often the lag monitor wakes: ten times a second costs a few microseconds a second.
TICK_S = 0.1
#: The stall maximum covers this long.
STALL_WINDOW_S = 60.0
#: Kept as the longest lag per slice of this long, so the window slides in small steps.
STALL_SLICE_S = 5.0


class StallWindow:
    """The longest lag of the last STALL_WINDOW_S seconds, kept as one maximum per slice."""

    def __init__(self) -> None:
        self.slices: deque[tuple[float, float]] = deque()  # (slice start, longest lag in it)

    def add(self, now: float, lag: float) -> None:
        start = now - now % STALL_SLICE_S
        if self.slices and self.slices[-1][0] == start:
            if lag > self.slices[-1][1]:
                self.slices[-1] = (start, lag)
        else:
            self.slices.append((start, lag))
        while self.slices and self.slices[0][0] <= now - STALL_WINDOW_S:
            self.slices.popleft()

    def longest(self) -> float:
        return max((lag for _, lag in self.slices), default=0.0)


class Runtime:
    """Starts and stops the process-health parts of one broker's metrics."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.stalls = StallWindow()
        self._task: asyncio.Task[None] | None = None
        self._gc_started = 0.0
        metrics.stall_max.set_function(self.stalls.longest)
        ProcessCollector(registry=metrics.registry)
        GCCollector(registry=metrics.registry)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch_loop(), name="metrics-loop-lag")
        gc.callbacks.append(self._on_gc)

    async def stop(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _watch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        observe = self.metrics.loop_lag.observe
        while True:
            due = loop.time() + TICK_S
            await asyncio.sleep(TICK_S)
            now = loop.time()
            lag = max(0.0, now - due)
            observe(lag)
            self.stalls.add(now, lag)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
            return
        child = self.metrics.gc_by_generation.get(str(info.get("generation")))
        if child is not None:
            child.observe(time.perf_counter() - self._gc_started)
