"""What a client passes before the waiting room: the practice's checklist, and the broker's network pre-flight.

The result of each is kept on the seat's device that passed it (the session
record), for the therapist's waiting room. The checklist's verification and the
pre-flight peer live in broker.checklist; broker.signaling.admission adapts them
to the two interfaces below.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from broker.signaling import session as sm
from broker.signaling.connections import Connection
from broker.signaling.protocol import (
    ChecklistSubmit,
    ErrorCode,
    PreflightAnswer,
    PreflightOffer,
    ProtocolError,
    Role,
    SeatState,
)
from broker.signaling.session import Session
from broker.signaling.session_records import SessionRecords
from broker.store.base import StoreUnavailable

log = logging.getLogger("broker.hub")

#: ``audit(event, actor, session, outcome)``: the hub's audit trail.
Audit = Callable[[str, str | None, str | None, str], Awaitable[None]]


class Checklist(Protocol):
    """Verifies a checklist submission against the practice's policy (broker.checklist.policy)."""

    def policy_for(self, minor: bool) -> dict[str, Any]: ...

    def verify(self, submission: ChecklistSubmit, *, minor: bool, preflight: dict[str, Any] | None) -> dict[str, Any]:
        """Returns the result to keep, or raises ProtocolError naming what is missing."""
        ...


class Preflight(Protocol):
    async def answer(self, offer_sdp: str, session_id: str, peer_id: str) -> tuple[str, str]:
        """(preflight id, answer SDP); the pre-flight shares its slots out by session and seat."""
        ...

    async def wait_result(self, preflight_id: str, timeout: float) -> dict[str, Any]: ...

    async def close(self) -> None: ...


class ClientChecks:
    """Runs a client's checklist and pre-flight, and records their results on its device."""

    def __init__(
        self, records: SessionRecords, checklist: Checklist | None, preflight: Preflight | None, audit: Audit
    ) -> None:
        self.records = records
        self.checklist = checklist
        self.preflight = preflight
        self._audit = audit
        #: The pre-flights whose result is not recorded yet, by (session, seat).
        self._preflights: dict[tuple[str, str], asyncio.Future[None]] = {}

    async def submit_checklist(self, conn: Connection, message: ChecklistSubmit) -> tuple[Session, dict[str, Any]]:
        """Verify a client's checklist and record it; ProtocolError naming what is missing."""
        if self.checklist is None:
            raise ProtocolError(ErrorCode.INVALID_STATE, "This broker has no checklist policy.")
        checklist = self.checklist
        accepted: list[dict[str, Any]] = []

        def submit(s: Session) -> None:
            seat = s.seat(conn.peer_id or "")
            place = sm.device_for(s, seat.id, conn.id)
            if seat.role is not Role.CLIENT or place.state is not SeatState.CHECKING:
                raise ProtocolError(
                    ErrorCode.INVALID_STATE, "The checklist can only be submitted before entering the waiting room."
                )
            result = checklist.verify(message, minor=seat.minor, preflight=place.preflight)
            accepted.append(result)
            sm.pass_checklist(s, seat.id, result, message.details, conn.id)

        assert conn.session_id and conn.peer_id
        running = self._preflights.get((conn.session_id, conn.peer_id))
        if running is not None:
            # The page may finish its side of the pre-flight before the broker has recorded its own result.
            await asyncio.wait({running}, timeout=15.0)
        try:
            session, _ = await self.records.mutate(conn.session_id, submit)
        except ProtocolError as exc:
            if exc.code not in (ErrorCode.INVALID_STATE, ErrorCode.SESSION_ENDED):
                await self._audit("checklist_failed", conn.peer_id, conn.session_id, exc.code.value)
            raise
        await self._audit("checklist_passed", conn.peer_id, conn.session_id, "ok")
        return session, accepted[0]

    def start_preflight(self, conn: Connection, message: PreflightOffer) -> None:
        """Answer the page's pre-flight offer and record its result, without holding up the
        connection: a wait for a pre-flight slot can last seconds, and meanwhile the page's next
        frames must be read (a ``ping`` answered: a client takes a broker silent for 5 s as hung).
        A checklist that comes meanwhile waits for this run (``submit_checklist``)."""
        assert conn.session_id and conn.peer_id
        key = (conn.session_id, conn.peer_id)
        task = asyncio.ensure_future(self._run_preflight(conn, message))
        self._preflights[key] = task
        task.add_done_callback(lambda t: self._preflights.pop(key, None) if self._preflights.get(key) is t else None)

    async def _run_preflight(self, conn: Connection, message: PreflightOffer) -> None:
        try:
            session_id, seat_id, preflight_id = await self.answer_preflight(conn, message)
        except Exception as exc:  # refused like any message: an error naming it, nothing changed
            conn.refuse(exc, message.id)
            return
        await self._record_preflight(session_id, seat_id, conn.id, preflight_id)

    async def answer_preflight(self, conn: Connection, message: PreflightOffer) -> tuple[str, str, str]:
        """Answer the page's pre-flight offer: (session, seat, pre-flight) whose result is to be recorded."""
        if self.preflight is None:
            raise ProtocolError(ErrorCode.PREFLIGHT_REFUSED, "This broker does not run a network pre-flight.")
        session = await self.records.load(conn.session_id or "")
        seat = session.seat(conn.peer_id or "")
        if sm.device_for(session, seat.id, conn.id).state is not SeatState.CHECKING:
            raise ProtocolError(ErrorCode.INVALID_STATE, "The pre-flight is part of the checklist, before waiting.")
        preflight_id, answer = await self.preflight.answer(message.sdp, session.id, seat.id)
        conn.send(PreflightAnswer(sdp=answer))
        return session.id, seat.id, preflight_id

    async def _record_preflight(self, session_id: str, peer_id: str, conn_id: str, preflight_id: str) -> None:
        assert self.preflight is not None
        result = await self.preflight.wait_result(preflight_id, 30.0)

        def record(s: Session) -> None:
            sm.device_for(s, peer_id, conn_id).preflight = result  # the device that ran it

        try:
            await self.records.mutate(session_id, record)
        except (ProtocolError, StoreUnavailable):
            return
        log.info(
            "event=preflight_recorded session=%s peer=%s connected=%s", session_id, peer_id, result.get("connected")
        )
