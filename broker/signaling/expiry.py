"""When each session with a connection here is due to end, with one loop timer for them all."""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Callable

#: A session's end is handled this long before its ``expires``, while its record is still in the
#: store (the record's TTL ends at ``expires``; a check after that would find nothing to end).
EXPIRY_LEAD_S = 1.0


class ExpiryTimer:
    """Calls ``due(session_id)`` when a scheduled session's window closes (``EXPIRY_LEAD_S`` early).

    A heap of (due, session), its stale entries skipped, and one loop timer for the earliest:
    a timer per session costs memory per session.
    """

    def __init__(self, clock: Callable[[], float], due: Callable[[str], None]) -> None:
        self.clock = clock
        self._on_due = due
        self._due: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    def schedule(self, session_id: str, expires: float) -> None:
        """End the session when it expires (wall clock), unless it is forgotten first."""
        due = expires - EXPIRY_LEAD_S
        self._due[session_id] = due
        heapq.heappush(self._heap, (due, session_id))
        if len(self._heap) > 2 * len(self._due) + 64:
            self._heap = [(d, sid) for sid, d in self._due.items()]
            heapq.heapify(self._heap)
        self._arm()

    def forget(self, session_id: str) -> None:
        """Its heap entry is skipped when it comes up."""
        self._due.pop(session_id, None)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._due

    def _arm(self) -> None:
        if not self._heap:
            return
        due = self._heap[0][0]
        if self._timer is not None:
            if self._timer_at <= due:
                return
            self._timer.cancel()
        self._timer_at = due
        delay = max(0.0, due - self.clock())
        self._timer = asyncio.get_running_loop().call_later(delay, self._fired)

    def _fired(self) -> None:
        self._timer = None
        now = self.clock()
        heap = self._heap
        while heap and heap[0][0] <= now:
            due, sid = heapq.heappop(heap)
            if self._due.get(sid) == due:
                del self._due[sid]
                self._on_due(sid)
        self._arm()
