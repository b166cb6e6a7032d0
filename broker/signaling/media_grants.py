"""Janus credentials for the admitted participants of a session whose media goes through Janus.

A seat is *entitled* to its session's room while the session is on, the seat is admitted and not on
hold: then the connection holding it is sent ``media_janus`` (docs/protocol.md 10) with the room, its
PIN and a token of the seat's own. When the seat stops being entitled (it leaves, is removed,
its link is revoked, it is put on hold, it moves to another device), its token is revoked
in Janus, and a later grant gives another one.

The token is derived, never stored (``broker.janus.rooms.seat_token``): HMAC of the session id, the
peer id, the device holding the seat and the seat's *generation*, under the broker's Janus key. What
the store keeps per session (one record under the session's prefix, sealed like every value, gone
with the session) is only each seat's generation and the device it was granted to: any broker
process can work out, and so revoke, the token another process granted. The generation grows at
every revocation, so a revoked token is never granted again.

``settle`` runs after every change of the session (the hub calls it where it publishes the views).
It compares what each seat is entitled to with what was granted, in one atomic step of the store,
then does the grants and revocations in Janus. Views published by different processes may come in
any order: the record keeps the newest session revision it settled and ignores older ones. A grant
that Janus does not confirm is forgotten (the next change of the session tries again, and so does
the seat's next join), and the participant gets ``janus_unavailable``: its admission stands.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from broker.janus.client import JanusUnavailable
from broker.janus.scheduling import MediaPlanner
from broker.signaling.protocol import Error, ErrorCode, MediaJanus, Role, SeatState, SessionState, encode
from broker.signaling.session_state import Seat, Session
from broker.store.base import Store, StoreUnavailable, session_prefix
from broker.store.bus import Bus, Envelope

log = logging.getLogger("broker.janus")

#: What a participant whose credentials Janus did not confirm is told (``janus_unavailable``).
GRANT_FAILED_MESSAGE = (
    "The practice's media server (Janus) is not answering, so your audio and video cannot start yet. "
    "You are still in the session: it is tried again when anything changes, or reconnect."
)
#: The therapist's seat has no device id; its grants name it so.
THERAPIST_HOLDER = "therapist"


def grants_key(session_id: str) -> str:
    """Each seat's generation and grant, for one session (deleted with the session's keys)."""
    return f"{session_prefix(session_id)}:janus"


def holder_of(session: Session, seat: Seat) -> str | None:
    """Who may hold the seat's credentials now (its device), or None: nobody."""
    if session.media != "janus" or session.state is SessionState.ENDED:
        return None
    if seat.state is not SeatState.ADMITTED or seat.held:
        return None
    if seat.role is Role.THERAPIST:
        return THERAPIST_HOLDER
    return seat.device_id or "client"


@dataclass(frozen=True)
class Change:
    """One thing to do in Janus for one seat: grant (to ``holder``) or revoke, at ``generation``."""

    grant: bool
    peer: str
    holder: str
    generation: int


class GrantRecord:
    """The stored record: the newest revision settled, and per seat ``[generation, holder or None]``."""

    def __init__(self, raw: bytes | None) -> None:
        data = json.loads(raw) if raw else {}
        self.revision: int = int(data.get("rev", -1))
        self.seats: dict[str, list[int | str | None]] = dict(data.get("seats", {}))

    def seat(self, peer: str) -> tuple[int, str | None]:
        generation, holder = self.seats.get(peer, [0, None])
        return int(generation or 0), holder if isinstance(holder, str) else None

    def encode(self) -> bytes:
        return json.dumps({"rev": self.revision, "seats": self.seats}, separators=(",", ":")).encode()


class MediaGrants:
    """Grants and revocations of Janus credentials; the hub's ``media`` (MediaPlanner) holds the rooms."""

    def __init__(
        self, store: Store, bus: Bus, planner: Callable[[], MediaPlanner], clock: Callable[[], float] = time.time
    ) -> None:
        self.store = store
        self.bus = bus
        self.planner = planner
        self.clock = clock

    async def settle(self, session: Session, resend: str | None = None) -> None:
        """Bring Janus in line with who is entitled now; ``resend``: a seat that just joined again,
        sent its credentials (the same token, the room's door opened again) if it still holds them."""
        planner = self.planner()
        if session.media != "janus" or planner.rooms is None:
            return
        wanted = {seat.id: holder_of(session, seat) for seat in session.seats}

        def step(raw: bytes | None) -> tuple[bytes | None, list[Change]]:
            record = GrantRecord(raw)
            if session.revision < record.revision:
                return raw, []  # a newer state of the session was settled already
            record.revision = session.revision
            changes: list[Change] = []
            for peer, holder in wanted.items():
                generation, had = record.seat(peer)
                if had == holder:
                    if holder is not None and peer == resend:
                        changes.append(Change(True, peer, holder, generation))
                    continue
                if had is not None:
                    changes.append(Change(False, peer, had, generation))
                    generation += 1
                if holder is not None:
                    changes.append(Change(True, peer, holder, generation))
                record.seats[peer] = [generation, holder]
            return record.encode(), changes

        ttl = max(60.0, session.expires - self.clock() + 60)
        try:
            for change in await self.store.update(grants_key(session.id), step, ttl):
                if change.grant:
                    await self._grant(planner, session, change, ttl)
                else:
                    await self._revoke(planner, session.id, change)
        except StoreUnavailable:
            log.info("event=janus_grants_unavailable session=%s", session.id)  # the next change settles it

    async def ended(self, session: Session) -> None:
        """The session is over (its room goes next): no seat's token opens Janus's API any more. The same
        step as any change (nobody is entitled in an ended session), so a token is revoked once, whether
        here or by a settle that a connection closing at the end started."""
        await self.settle(session)

    async def _grant(self, planner: MediaPlanner, session: Session, change: Change, ttl: float) -> None:
        assert planner.rooms is not None
        token = planner.rooms.seat_token(session.id, change.peer, change.holder, change.generation)
        try:
            credentials = await planner.rooms.grant(session.id, change.peer, token=token)
        except JanusUnavailable:
            await self._forget(session.id, change, ttl)
            log.warning("event=janus_grant_failed session=%s peer=%s", session.id, change.peer)
            error = Error(code=ErrorCode.JANUS_UNAVAILABLE, message=GRANT_FAILED_MESSAGE)
            await self.bus.publish(session.id, Envelope(change.peer, None, encode(error)))
            return
        # Revoked meanwhile (by another process, or a later change here): take it back, send nothing.
        if GrantRecord(await self.store.get(grants_key(session.id))).seat(change.peer) != (
            change.generation,
            change.holder,
        ):
            await self._revoke(planner, session.id, change)
            return
        slot = next(i for i, seat in enumerate(session.seats) if seat.id == change.peer)
        message = MediaJanus(
            slot=slot,
            url=planner.public_url,
            room=credentials.room,
            pin=credentials.pin,
            token=credentials.token,
            join_by=credentials.join_by,
        )
        # To the connection holding the seat, wherever it is: the bus seals what crosses processes,
        # and nothing of it is kept (it is not a relayed message: no resume buffer).
        await self.bus.publish(session.id, Envelope(change.peer, None, encode(message)))
        log.info("event=janus_credentials_sent session=%s peer=%s", session.id, change.peer)

    async def _forget(self, session_id: str, change: Change, ttl: float) -> None:
        """A grant Janus did not confirm: the seat holds nothing, so the next settle grants again."""

        def step(raw: bytes | None) -> tuple[bytes | None, None]:
            record = GrantRecord(raw)
            if record.seat(change.peer) != (change.generation, change.holder):
                return raw, None
            record.seats[change.peer] = [change.generation, None]
            return record.encode(), None

        await self.store.update(grants_key(session_id), step, ttl)

    async def _revoke(self, planner: MediaPlanner, session_id: str, change: Change) -> None:
        assert planner.rooms is not None
        token = planner.rooms.seat_token(session_id, change.peer, change.holder, change.generation)
        try:
            await planner.rooms.revoke(session_id, token, peer_id=change.peer)
        except JanusUnavailable:
            # Its generation moved on, so it is never granted again; the room's door closes by itself
            # (JOIN_WINDOW_S) and the room goes with the session.
            log.warning("event=janus_revoke_failed session=%s peer=%s", session_id, change.peer)
