"""Call set-up time: from the moment two peers could call to the first answer between them.

A peer can call once it is joined and admitted: the therapist at its join, a client at its
admission (or at its join when it comes back to a seat already admitted). The set-up of a pair
ends with the first answer relayed between them after the later of their two moments; a peer
that joins again starts a new one. Kept per process, by what this process sees: on Redis, a
pair whose admission and answer pass through different processes is not measured (never
measured wrongly). Entries go when the session ends or has no connection here any more.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class CallSetups:
    """The moments peers became able to call, per session, until their pairs' first answers."""

    def __init__(self, observe: Callable[[float], None], clock: Callable[[], float] = time.monotonic) -> None:
        self._observe = observe
        self._clock = clock
        #: Per session: per peer, the monotonic moment it could call.
        self._ready: dict[str, dict[str, float]] = {}
        #: Per session: the pairs (sorted peer ids) already measured, with the moment their set-up began.
        self._measured: dict[str, dict[tuple[str, str], float]] = {}

    def ready(self, session_id: str, peer_id: str) -> None:
        """The peer is joined and admitted from now on."""
        self._ready.setdefault(session_id, {})[peer_id] = self._clock()

    def answered(self, session_id: str, sender: str, recipient: str) -> None:
        """An answer is relayed from ``sender`` to ``recipient``: observe their set-up, once."""
        ready = self._ready.get(session_id)
        if ready is None:
            return
        a, b = ready.get(sender), ready.get(recipient)
        if a is None or b is None:
            return
        began = max(a, b)
        pair = (sender, recipient) if sender < recipient else (recipient, sender)
        measured = self._measured.setdefault(session_id, {})
        if measured.get(pair) == began:
            return
        measured[pair] = began
        self._observe(max(0.0, self._clock() - began))

    def forget(self, session_id: str) -> None:
        self._ready.pop(session_id, None)
        self._measured.pop(session_id, None)

    def __len__(self) -> int:
        """Sessions with an entry (for tests: none remain once sessions end)."""
        return len(self._ready.keys() | self._measured.keys())
