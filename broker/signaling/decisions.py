"""The therapist's decisions in the waiting room: admit, decline, remove, allow back; holds; a note.

Each is one atomic step of the session's record (session.py), then what it means for the peers:
a seat that moves to its other device takes over from the old connection; a client sent away
(declined, removed) is told, with its other device, and its resume buffer is emptied, since
what was relayed there was for a seat they no longer hold.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from broker.metrics.registry import Metrics
from broker.signaling import session as sm
from broker.signaling.connections import CLOSE_REPLACED, CLOSE_UNWELCOME, Connection
from broker.signaling.protocol import Admit, Decline, Declined, Error, ErrorCode, TherapistNote, WaitingNote, encode
from broker.signaling.relay import mailbox_key
from broker.signaling.session import Session
from broker.signaling.session_records import SessionRecords
from broker.store.base import Store
from broker.store.bus import Bus, Envelope

log = logging.getLogger("broker.hub")

Audit = Callable[[str, str | None, str | None, str], Awaitable[None]]


class _Unchanged(Exception):
    """A step that found nothing to change: the store writes nothing (as for a refused step)."""


class TherapistDecisions:
    """Applies the therapist's waiting-room actions and tells whom they concern."""

    def __init__(
        self,
        store: Store,
        bus: Bus,
        records: SessionRecords,
        metrics: Metrics,
        clock: Callable[[], float],
        *,
        audit: Audit,
        publish_views: Callable[[Session], Awaitable[None]],
    ) -> None:
        self.store = store
        self.bus = bus
        self.records = records
        self.metrics = metrics
        self.clock = clock
        self._audit = audit
        self._publish_views = publish_views

    async def admit(self, conn: Connection, message: Admit) -> None:
        now = int(self.clock())
        if message.device is not None:
            await self._admit_other_device(conn, message.peer, message.device, now)
            return

        def admit(s: Session, actor: str, target: str) -> sm.Seat:
            seat = sm.admit(s, actor, target)
            sm.mark_admitted(s, target, now)
            return seat

        await self.act(conn, admit, message.peer, "seat_admitted", None)

    async def _admit_other_device(self, conn: Connection, target: str, device: str, now: int) -> None:
        """The seat moves to its other device: the old connection is closed, the seat's resume
        buffer emptied (what was relayed there was for the old device), and the new one joins the call."""
        assert conn.session_id and conn.peer_id
        moved: list[str | None] = []

        def admit(s: Session) -> None:
            taken_from = sm.admit_other(s, conn.peer_id or "", target, device)
            sm.mark_admitted(s, target, now)
            moved.append(taken_from)
            moved.append(s.seat(target).conn)

        session, _ = await self.records.mutate(conn.session_id, admit)
        taken_from, taken_by = moved
        await self.store.clear_log(mailbox_key(session.id, target))
        log.info("event=other_device_admitted session=%s peer=%s", session.id, target)
        self.metrics.admission("seat_admitted", session.id, target)
        await self._audit("other_device_admitted", conn.peer_id, session.id, "ok")
        if taken_from is not None:
            message = "Your therapist let you in from another device or window, so this one has stopped."
            await self.bus.publish(
                session.id,
                Envelope(None, taken_from, encode(Error(code=ErrorCode.REPLACED, message=message)), CLOSE_REPLACED),
            )
        if taken_by is not None:
            await self.bus.publish(session.id, Envelope(None, taken_by, b"", takes_seat=True))
        await self._publish_views(session)

    async def decline(self, conn: Connection, message: Decline) -> None:
        if message.device is None:
            await self.act(conn, sm.decline, message.peer, "seat_declined", Declined())
            return
        assert conn.session_id and conn.peer_id
        session, turned_away = await self.records.mutate(
            conn.session_id, lambda s: sm.decline_other(s, conn.peer_id or "", message.peer, message.device or "")
        )
        log.info("event=other_device_declined session=%s peer=%s", session.id, message.peer)
        self.metrics.admission("seat_declined")
        await self._audit("other_device_declined", conn.peer_id, session.id, "ok")
        if turned_away is not None:
            await self.bus.publish(session.id, Envelope(None, turned_away, encode(Declined()), CLOSE_UNWELCOME))
        await self._publish_views(session)

    async def hold(self, conn: Connection, target: str, *, held: bool) -> None:
        """Put an admitted client on hold or bring them back (private time). Relays to and from a
        held seat are refused (``sm.can_relay``); every process drops its copy of the record when
        the views below reach it. A hold that changes nothing is neither logged nor shown again."""
        assert conn.session_id and conn.peer_id

        def hold(s: Session) -> None:
            if not sm.hold(s, conn.peer_id or "", target, held=held):
                raise _Unchanged  # nothing to write: the record stays exactly as it is

        try:
            session, _ = await self.records.mutate(conn.session_id, hold)
        except _Unchanged:
            return
        event = "seat_held" if held else "seat_released"
        log.info("event=%s session=%s peer=%s", event, session.id, target)
        await self._audit(event, target, session.id, "ok")  # the held seat's id, nothing else
        await self._publish_views(session)

    async def act(
        self, conn: Connection, step: Callable[[Session, str, str], sm.Seat], target: str, event: str, notice: Any
    ) -> None:
        """Apply a therapist's action on a client seat. The ones that send the client away
        (``notice``) send its other device away too, and empty the seat's resume buffer."""
        assert conn.session_id and conn.peer_id
        others: list[str | None] = []

        def act(s: Session) -> sm.Seat:
            seat = s.seat(target)
            others.append(seat.other.conn if seat.other is not None else None)
            return step(s, conn.peer_id or "", target)

        session, _ = await self.records.mutate(conn.session_id, act)
        log.info("event=%s session=%s peer=%s", event, session.id, target)
        self.metrics.admission(event, session.id, target)
        await self._audit(event, conn.peer_id, session.id, "ok")
        if notice is not None:
            await self.store.clear_log(mailbox_key(session.id, target))
            await self.bus.publish(session.id, Envelope(target, None, encode(notice), CLOSE_UNWELCOME))
            if others[-1] is not None:
                await self.bus.publish(session.id, Envelope(None, others[-1], encode(notice), CLOSE_UNWELCOME))
        await self._publish_views(session)

    async def waiting_note(self, conn: Connection, message: WaitingNote) -> None:
        """Pass the therapist's sealed word on to a client who is checking or waiting. The broker
        cannot read it, and neither keeps nor logs it: it goes to the seat's connection only."""
        assert conn.session_id and conn.peer_id
        session = await self.records.load(conn.session_id)
        target = sm.note_target(session, conn.peer_id, message.peer)
        await self.bus.publish(session.id, Envelope(target.id, None, encode(TherapistNote(sealed=message.sealed))))
        log.info("event=waiting_note session=%s peer=%s", session.id, target.id)
