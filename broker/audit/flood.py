"""Flood control for audit events that anyone can cause.

A failed or throttled login needs no account, and a ``report`` needs only an invite link; each
used to cost an audit entry with two fsyncs, so a stranger could grow the log without bound. Per
kind (event, outcome, actor, session) the first ``burst`` events of a window are written as
usual; the rest are only counted, and when the window closes one aggregate entry records how
many there were, so every event is still accounted for. The key holds the same opaque ids the
entries would, nothing more.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger("broker.audit")

#: Individually written events per kind and window, and the window's length.
DEFAULT_BURST = 10
DEFAULT_WINDOW_S = 60.0

#: (event, outcome, actor, session) of an audit entry.
FloodKey = tuple[str, str, "str | None", "str | None"]
#: Writes one aggregate entry: the kind, how many events were not written, and when the window began.
WriteAggregate = Callable[[FloodKey, int, float], Awaitable[object]]


@dataclass
class _Window:
    since: float  # wall clock: when the window opened, then when its first event was counted
    written: int
    counted: int
    timer: asyncio.TimerHandle | None = None


class FloodGate:
    """Decides per event whether it is written now or counted into its window's aggregate."""

    def __init__(
        self,
        write_aggregate: WriteAggregate,
        *,
        burst: int = DEFAULT_BURST,
        window_s: float = DEFAULT_WINDOW_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if burst < 1 or window_s <= 0:
            raise ValueError("burst must be at least 1 and window_s positive")
        self._write_aggregate = write_aggregate
        self._burst = burst
        self._window_s = window_s
        self._clock = clock
        self._windows: dict[FloodKey, _Window] = {}
        self._writing: set[asyncio.Task[None]] = set()

    def admit(self, key: FloodKey) -> bool:
        """True: write this event now. False: it was counted, and will be in an aggregate entry."""
        window = self._windows.get(key)
        if window is None:
            window = _Window(self._clock(), 0, 0)
            window.timer = asyncio.get_running_loop().call_later(self._window_s, self._close, key)
            self._windows[key] = window
        if window.written < self._burst:
            window.written += 1
            return True
        if not window.counted:
            window.since = self._clock()  # the aggregate counts from its first event not written
        window.counted += 1
        return False

    def _close(self, key: FloodKey) -> None:
        window = self._windows.pop(key, None)
        if window is None or not window.counted:
            return
        task = asyncio.get_running_loop().create_task(self._write(key, window.counted, window.since))
        self._writing.add(task)
        task.add_done_callback(self._writing.discard)

    async def _write(self, key: FloodKey, count: int, since: float) -> None:
        try:
            await self._write_aggregate(key, count, since)
        except (OSError, ValueError):
            log.exception("event=audit_aggregate_failed audit_event=%s count=%d", key[0], count)

    def take_pending(self) -> list[tuple[FloodKey, int, float]]:
        """Close every window now: what each has counted and not yet written."""
        pending = []
        for key, window in self._windows.items():
            if window.timer is not None:
                window.timer.cancel()
            if window.counted:
                pending.append((key, window.counted, window.since))
        self._windows.clear()
        return pending

    async def drain(self) -> None:
        """Write every aggregate now, including those already on their way (at shutdown)."""
        for key, count, since in self.take_pending():
            await self._write(key, count, since)
        if self._writing:
            await asyncio.gather(*self._writing, return_exceptions=True)
