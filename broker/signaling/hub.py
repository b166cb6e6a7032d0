"""The signaling service: connections in, state machine and store in the middle, bus out.

The hub knows nothing about HTTP: the server hands it a ``Transport`` per WebSocket and every
text frame received. For each message it loads the session record, applies one state-machine
step atomically through the store, and publishes what each peer should now see on the session's
bus channel. Every process that holds a connection of the session delivers those messages
locally, so peers of one session may sit on different broker processes.

The ``Hub`` is the session logic (scheduling, moving, cancelling, revoking, joining, leaving,
ending, expiry), made of parts that know nothing of one another's work: ``Connections``
(connections.py), ``Relays`` (relay.py), ``SessionRecords`` (session_records.py),
``TherapistDecisions`` (decisions.py), ``ClientChecks`` (client_checks.py), ``ExpiryTimer``
(expiry.py), ``views_of`` (views.py), ``NodeLiveness`` (liveness.py), ``SessionHistory`` (history.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from broker.janus.scheduling import MediaPlanner
from broker.metrics.registry import Metrics
from broker.signaling import session as sm
from broker.signaling.arrivals import publish_count, waiting_count
from broker.signaling.cancelled import cancelled_error, mark_cancelled, was_cancelled
from broker.signaling.client_checks import Audit, Checklist, ClientChecks, Preflight
from broker.signaling.connections import (
    CLOSE_ENDED,
    CLOSE_NORMAL,
    CLOSE_REPLACED,
    CLOSE_RESTART,
    CLOSE_UNWELCOME,
    Connection,
    Connections,
    Limits,
    Transport,
)
from broker.signaling.decisions import TherapistDecisions
from broker.signaling.expiry import EXPIRY_LEAD_S, ExpiryTimer
from broker.signaling.history import SessionHistory, SignedRecord
from broker.signaling.link_checks import gone_error, seat_for
from broker.signaling.liveness import NodeLiveness
from broker.signaling.media_grants import MediaGrants
from broker.signaling.protocol import (
    ROLE_ONLY,
    Admit,
    AllowReturn,
    Answer,
    Candidate,
    ChecklistAccepted,
    ChecklistSubmit,
    ClientMessage,
    Decline,
    End,
    Error,
    ErrorCode,
    Hello,
    Hold,
    Join,
    Joined,
    Leave,
    Offer,
    PreflightOffer,
    ProtocolError,
    Reconnect,
    Release,
    Remove,
    Removed,
    Renegotiate,
    Report,
    Role,
    Roster,
    SeatState,
    SessionEnded,
    SessionRecord,
    WaitingNote,
    encode,
)
from broker.signaling.record import RecordSigner, build_record
from broker.signaling.relay import Relayed, Relays, mailbox_key
from broker.signaling.session import Session
from broker.signaling.session_records import SessionRecords
from broker.signaling.tokens import (
    INVALID_MESSAGE,
    TokenClaims,
    TokenCodec,
    check_window,
    new_node_id,
    new_resume_secret,
    new_session_id,
    resume_digest,
)
from broker.signaling.views import views_of
from broker.store.base import Store, StoreUnavailable, session_prefix
from broker.store.bus import Bus, Envelope
from broker.store.local_bus import LocalBus

log = logging.getLogger("broker.hub")


IceServers = Callable[[str, int], list[dict[str, Any]]]


class Hub:
    """One process's signaling service: the session logic, and the parts it is made of."""

    def __init__(
        self,
        store: Store,
        bus: Bus,
        tokens: TokenCodec,
        *,
        limits: Limits | None = None,
        checklist: Checklist | None = None,
        preflight: Preflight | None = None,
        ice_servers: IceServers | None = None,
        audit: Audit | None = None,
        signer: RecordSigner | None = None,
        clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.bus = bus
        self.tokens = tokens
        self.limits = limits or Limits()
        self.checklist = checklist
        self.preflight = preflight
        self.ice_servers = ice_servers or (lambda peer, ttl: [])
        self.audit = audit
        self.signer = signer
        self.clock = clock
        self.metrics = metrics or Metrics()
        self.media = MediaPlanner()  # mesh or Janus, and the Janus rooms (broker/janus/scheduling.py)
        self.grants = MediaGrants(store, bus, lambda: self.media, clock)  # each admitted seat's Janus credentials
        #: The answer to a genuine link whose session the store lost (broker/store/redis_marker.py).
        self.missing_session: Callable[[TokenClaims], ProtocolError] = lambda claims: sm.invalid_token_error()
        #: Looks at the store again for having lost its sessions (True: a join answers ``missing_session``).
        self.store_lost_now: Callable[[], Awaitable[bool]] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        #: This process's opaque id in the store, and in every connection id it gives.
        self.node = new_node_id()
        self.connections = Connections(self.limits, self._spawn, self.node, metrics=self.metrics)
        self.records = SessionRecords(store, clock, self._spawn)
        self.relays = Relays(store, bus, self.records, self.connections, clock, self._spawn, self.metrics)
        self.expiry = ExpiryTimer(clock, lambda session_id: self._spawn(self.expire_due(session_id)))
        self.decisions = TherapistDecisions(
            store, bus, self.records, self.metrics, clock, audit=self._audit, publish_views=self._publish_views
        )
        self.checks = ClientChecks(self.records, checklist, preflight, self._audit)
        #: Each therapist's signed records of their ended sessions (30 days).
        self.history = SessionHistory(store, clock)
        self._end_listeners: list[Callable[[str, str], Awaitable[None]]] = []
        self.accepting = True
        self.liveness = NodeLiveness(
            store,
            self.records,
            self.connections,
            self.limits.heartbeat_s,
            sessions_here=self.relays.sessions_here,
            publish_views=self._publish_views,
            alone=isinstance(bus, LocalBus),
        )

    async def start(self) -> None:
        """The heartbeat and the liveness mark: for a process that serves (before it accepts anyone)."""
        await self.liveness.beat()
        self._spawn(self.liveness.run())
        self.connections.start_heartbeat()

    # ------------------------------------------------------------ sessions (admin side)

    async def create_session(
        self,
        *,
        clients: int = 1,
        minors: int = 0,
        starts: int | None = None,
        duration_s: int = 50 * 60,
        relay_only: bool = False,
        group_link: bool = False,
        owner: str | None = None,
        kind: sm.SessionKind = "individual",
    ) -> tuple[Session, dict[str, str]]:
        """Schedule a session: it, and every seat's invite token by peer id (``"group"``: the group link's)."""
        now = int(self.clock())
        session = sm.new_session(
            new_session_id(),
            now=now,
            starts=now if starts is None else starts,
            duration_s=duration_s,
            clients=clients,
            minors=minors,
            relay_only=relay_only,
            group_link=group_link,
            owner=owner,
            kind=kind,
            media=self.media.media_for(clients),
        )
        await self.media.prepare(session.id, session.media)  # JanusUnavailable: nothing saved
        await self.records.save(session)
        tokens = {seat.id: self.tokens.issue(sm.claims_for(session, seat)) for seat in session.seats}
        if group_link:
            tokens["group"] = self.tokens.issue(sm.group_claims(session))
        log.info("event=session_created session=%s seats=%d", session.id, len(session.seats))
        await self._audit("session_created", None, session.id, "ok")
        return session, tokens

    async def get_session(self, session_id: str) -> Session | None:
        return await self.records.get(session_id)

    async def revoke_seat(self, session_id: str, peer_id: str, *, reissue: bool = False) -> str | None:
        """Revoke a client seat's link (and issue a new one if asked); drops its connections."""
        others: list[str | None] = []

        def revoke(s: Session) -> sm.Seat:
            seat = s.seat(peer_id)
            others.append(seat.other.conn if seat.other is not None else None)
            return (sm.reissue if reissue else sm.revoke)(s, peer_id)

        session, seat = await self.records.mutate(session_id, revoke)
        await self.store.clear_log(mailbox_key(session_id, peer_id))
        gone = encode(Error(code=ErrorCode.INVALID_TOKEN, message=INVALID_MESSAGE))
        await self.bus.publish(session_id, Envelope(peer_id, None, gone, CLOSE_UNWELCOME))
        if others[-1] is not None:
            await self.bus.publish(session_id, Envelope(None, others[-1], gone, CLOSE_UNWELCOME))
        await self._publish_views(session)
        log.info("event=seat_revoked session=%s peer=%s reissued=%s", session_id, peer_id, reissue)
        await self._audit("seat_revoked", None, session_id, "ok")
        return self.tokens.issue(sm.claims_for(session, seat)) if reissue else None

    async def reschedule_session(self, session_id: str, *, starts: int, duration_s: int) -> Session:
        """Move a session nobody is in to another time; links are judged by the record's window, so they follow."""
        now = int(self.clock())
        _, expires = sm.window(now, starts, duration_s)  # the record's TTL follows its new end
        step = lambda s: sm.reschedule(s, now=now, starts=starts, duration_s=duration_s)  # noqa: E731
        session, _ = await self.records.mutate(session_id, step, expires=expires)
        log.info("event=session_rescheduled session=%s", session_id)
        await self._audit("session_rescheduled", None, session_id, "ok")
        return session

    async def cancel_session(self, session_id: str) -> None:
        """End a session before or during it: its links stop working at once and say ``session_cancelled``
        until its window would have closed; peers get ``session_ended`` with ``cancelled``."""
        session, _ = await self.records.mutate(session_id, lambda s: sm.end(s, s.therapist().id))
        await mark_cancelled(self.store, session_id, session.expires - self.clock())
        await self._finish(session, "cancelled")

    def check_token(self, token: str) -> TokenClaims:
        """Authenticity and the token's own window, without touching the store."""
        return self.tokens.check(token, self.clock())

    async def resolve_token(self, token: str) -> tuple[Session, sm.Seat]:
        """The session and seat a token opens, or ProtocolError with the right code."""
        claims = self.tokens.verify(token)
        session = await self.get_session(claims.session_id)
        if session is None or sm.is_over(session):  # an ended session's record is about to go
            raise await gone_error(self.store, claims, self.clock(), self.missing_session)
        if claims.token_id != session.group_token_id:
            return session, seat_for(session, claims, self.clock())
        check_window(session.not_before, session.expires, self.clock())
        return session, session.clients()[0]

    # ------------------------------------------------------------ connections

    def open(self, transport: Transport) -> Connection:
        return self.connections.open(transport)

    def receive_now(self, conn: Connection, text: str | bytes) -> Awaitable[None] | None:
        """Handle one frame within this step if it can be; else what to await to finish it.
        Any refusal is answered with an error and changes nothing.

        A relayed message is handled here at once when the session record is in this
        process's recent copy and the bus can relay without waiting (the embedded broker):
        no coroutine on the way of the most frequent message (P1 in benchmarks/).
        Frames of one connection must be handled in order: await what this returns
        before giving it the next one.
        """
        message: ClientMessage | None = None
        try:
            message = self.connections.take(conn, text)
            if message is None or self.relays.done_now(conn, message):
                return None
        except Exception as exc:  # never let one bad message take the connection down
            conn.refuse(exc, message.id if message is not None else None)
            return None
        return self._handle(conn, message)

    async def _handle(self, conn: Connection, message: ClientMessage) -> None:
        unsettled = self.relays.unsettled(conn)
        if unsettled is not None:
            await unsettled.wait()  # this connection's relays reach the store before what it sent next
        try:
            await self._dispatch(conn, message)
        except Exception as exc:
            conn.refuse(exc, message.id)

    async def closed(self, conn: Connection) -> None:
        """The WebSocket is gone: release the seat if this connection still held it."""
        self.connections.forget(conn)
        self.relays.forget(conn)
        if not conn.joined:
            return
        assert conn.session_id and conn.peer_id
        peer_id = conn.peer_id
        self.relays.unroute_seat(conn)
        await self._drop_local(conn)
        try:
            session, held = await self.records.mutate(conn.session_id, lambda s: sm.disconnect(s, peer_id, conn.id))
        except (ProtocolError, StoreUnavailable):
            return
        if held:
            log.info("event=peer_disconnected session=%s peer=%s", conn.session_id, conn.peer_id)
            await self._publish_views(session)

    async def _add_local(self, conn: Connection) -> None:
        """This process delivers the session's messages to the connection, and ends the session when it expires."""
        assert conn.session_id
        if await self.relays.route(conn):
            session = await self.records.get(conn.session_id)
            if session is not None:
                self.expiry.schedule(conn.session_id, float(session.expires))
        await self.relays.hold_seat(conn)  # before the connection reads its resume buffer

    async def _drop_local(self, conn: Connection) -> None:
        if self.relays.last_here(conn):  # nothing of the session stays here; before anything is awaited
            self.expiry.forget(conn.session_id or "")
            self.records.forget(conn.session_id or "")
            self.metrics.setups.forget(conn.session_id or "")
        await self.relays.unroute(conn)

    # ------------------------------------------------------------ dispatch

    async def _dispatch(self, conn: Connection, message: ClientMessage) -> None:
        if not conn.helloed:
            self.connections.greet(conn, message)
            return
        if isinstance(message, Hello):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "hello was already sent.")
        if not conn.joined:
            if not isinstance(message, Join):
                raise ProtocolError(ErrorCode.NOT_JOINED, "Join a session first.")
            await self.metrics.count_join(self._join(conn, message))
            return
        if isinstance(message, Join):
            raise ProtocolError(ErrorCode.ALREADY_JOINED, "This connection has already joined.")
        only = ROLE_ONLY.get(type(message))
        if only is not None and conn.role is not only:
            who = "the therapist" if only is Role.THERAPIST else "a client"
            raise ProtocolError(ErrorCode.NOT_ALLOWED, f"Only {who} can do that.")
        handler = self._handlers[type(message)]
        await handler(self, conn, message)

    async def _join(self, conn: Connection, message: Join) -> None:
        if not self.accepting:
            raise ProtocolError(ErrorCode.UNAVAILABLE, "This broker is restarting. Reconnect in a moment.")
        claims = self.tokens.verify(message.token)
        presented = resume_digest(message.resume_secret) if message.resume_secret is not None else None
        secret = new_resume_secret()
        fresh = resume_digest(secret)
        by_group = [False]

        def take_seat(s: Session) -> sm.Joining:
            if sm.is_over(s):  # its record is about to go: answered as if gone already
                raise missing()
            if s.group_token_id is not None and claims.token_id == s.group_token_id:
                check_window(s.not_before, s.expires, self.clock())
                seat = sm.claim_group_seat(s)
                by_group[0] = True
            else:
                seat = seat_for(s, claims, self.clock())
            return sm.connect(s, seat.id, conn.id, device=presented, new_device=fresh, now=int(self.clock()))

        # A gone session's token looks like an unknown one, unless the store lost its sessions (looked at only then).
        gone: list[bool] = []

        def missing() -> ProtocolError:
            gone.append(True)
            check_window(claims.not_before, claims.expires, self.clock())
            return self.missing_session(claims)

        try:
            session, joining = await self.records.mutate(claims.session_id, take_seat, missing=missing)
        except ProtocolError as exc:
            if gone and exc.code is ErrorCode.INVALID_TOKEN and await was_cancelled(self.store, claims.session_id):
                raise cancelled_error() from None
            lost = self.store_lost_now
            if not gone or exc.code is not ErrorCode.INVALID_TOKEN or lost is None:
                raise
            await lost()  # this look, or one that just ran (the periodic one), may find the store emptied
            raise self.missing_session(claims) from None
        seat = joining.seat
        peer = seat.id
        conn.session_id, conn.peer_id, conn.role = session.id, peer, seat.role
        conn.other_device = joining.other is not None
        self.connections.authenticated(conn)
        await self._add_local(conn)
        if joining.replaced:
            await self.bus.publish(
                session.id,
                Envelope(
                    None,
                    joining.replaced,
                    encode(Error(code=ErrorCode.REPLACED, message="This seat was opened in another window.")),
                    CLOSE_REPLACED,
                ),
            )
        ttl = max(60, session.expires - int(self.clock()))
        conn.send(
            Joined(
                session=session.id,
                peer=peer,
                role=seat.role,
                seat_state=joining.state,
                session_state=session.state,
                starts=session.starts,
                expires=session.expires,
                minor=seat.minor,
                ice_servers=self.ice_servers(peer, ttl),
                ice_transport_policy=session.ice_transport_policy,
                policy=self.checklist.policy_for(seat.minor)
                if self.checklist is not None and seat.role is Role.CLIENT
                else None,
                seat_token=self.tokens.issue(sm.claims_for(session, seat)) if by_group[0] else None,
                resume_secret=secret if joining.issued else None,
                other_device=conn.other_device,
                seat_keys=session.seat_keys,
                media=session.media,
            ),
        )
        if not conn.other_device and seat.state is SeatState.ADMITTED:
            self.metrics.setups.ready(session.id, peer)
        if message.resume is not None and not conn.other_device and seat.state is SeatState.ADMITTED:
            await self.relays.replay(conn, session.id, peer, message.resume)
        else:
            await self.relays.skip_missed(conn, session.id, peer)
        event = "event=peer_joined session=%s peer=%s role=%s other_device=%s"
        log.info(event, session.id, peer, seat.role.value, conn.other_device)
        if conn.other_device:
            await self._audit("other_device_joined", peer, session.id, "ok")
        await self._publish_views(session, resend=None if conn.other_device else peer)

    async def _on_checklist(self, conn: Connection, message: ChecklistSubmit) -> None:
        session, summary = await self.checks.submit_checklist(conn, message)
        conn.send(ChecklistAccepted(summary=summary))
        await self._publish_views(session)

    async def _on_preflight(self, conn: Connection, message: PreflightOffer) -> None:
        self.checks.start_preflight(conn, message)

    async def _on_admit(self, conn: Connection, message: Admit) -> None:
        await self.decisions.admit(conn, message)

    async def _on_decline(self, conn: Connection, message: Decline) -> None:
        await self.decisions.decline(conn, message)

    async def _on_remove(self, conn: Connection, message: Remove) -> None:
        await self.decisions.act(conn, sm.remove, message.peer, "seat_removed", Removed())

    async def _on_allow_return(self, conn: Connection, message: AllowReturn) -> None:
        await self.decisions.act(conn, sm.allow_return, message.peer, "seat_allowed_back", None)

    async def _on_hold(self, conn: Connection, message: Hold) -> None:
        await self.decisions.hold(conn, message.peer, held=True)

    async def _on_release(self, conn: Connection, message: Release) -> None:
        await self.decisions.hold(conn, message.peer, held=False)

    def _on_relay(self, conn: Connection, message: Relayed) -> Awaitable[None]:
        return self.relays.relay(conn, message)

    async def _on_waiting_note(self, conn: Connection, message: WaitingNote) -> None:
        await self.decisions.waiting_note(conn, message)

    async def _on_report(self, conn: Connection, message: Report) -> None:
        assert conn.session_id and conn.peer_id
        session = await self.records.load(conn.session_id)
        # No seat check: a peer the broker made up (not in the session) is exactly what gets reported.
        log.warning("event=interception_warning session=%s peer=%s reason=%s", session.id, conn.peer_id, message.reason)
        await self._audit("interception_warning", conn.peer_id, session.id, "warning")

    async def _on_leave(self, conn: Connection, message: Leave) -> None:
        assert conn.session_id and conn.peer_id

        def leave(s: Session) -> bool:
            seat = s.seat(conn.peer_id or "")
            left = sm.leave(s, seat.id, conn.id)
            sm.disconnect(s, seat.id, conn.id)
            return left is seat

        session, the_seat = await self.records.mutate(conn.session_id, leave)
        if the_seat and conn.role is Role.CLIENT:  # what was relayed there was for this page's calls only:
            await self.store.clear_log(mailbox_key(session.id, conn.peer_id))  # nobody else may read it
        log.info("event=peer_left session=%s peer=%s", session.id, conn.peer_id)
        conn.close_after_queue(CLOSE_NORMAL)  # before the audit's write: a page leaving quickly waits for it
        if the_seat and conn.role is Role.CLIENT:
            await self._audit("seat_left", conn.peer_id, session.id, "ok")
        await self._publish_views(session)

    async def _on_end(self, conn: Connection, message: End) -> None:
        assert conn.session_id and conn.peer_id
        session, _ = await self.records.mutate(conn.session_id, lambda s: sm.end(s, conn.peer_id or ""))
        await self._finish(session, "ended", actor=conn.peer_id, verification=dict(message.verification or {}))

    _handlers: dict[type, Callable[..., Awaitable[None]]] = {
        ChecklistSubmit: _on_checklist,
        PreflightOffer: _on_preflight,
        Admit: _on_admit,
        Decline: _on_decline,
        Remove: _on_remove,
        AllowReturn: _on_allow_return,
        Hold: _on_hold,
        Release: _on_release,
        Offer: _on_relay,
        Answer: _on_relay,
        Candidate: _on_relay,
        Renegotiate: _on_relay,
        Roster: _on_relay,
        WaitingNote: _on_waiting_note,
        Report: _on_report,
        Leave: _on_leave,
        End: _on_end,
    }

    # ------------------------------------------------------------ ending

    def add_end_listener(self, listener: Callable[[str, str], Awaitable[None]]) -> None:
        """``listener(owner, session_id)`` runs as an owned session ends here: what is kept of it elsewhere goes too."""
        self._end_listeners.append(listener)

    async def _finish(
        self, session: Session, reason: str, actor: str | None = None, verification: dict[str, str] | None = None
    ) -> None:
        """Tell everyone it is over (the therapist's side also gets the signed record, kept in the
        owner's history whatever the reason), then forget every key of it."""
        session_id, owner = session.id, session.owner
        signed = None
        if self.signer is not None:
            record = build_record(session, ended=int(self.clock()), reason=reason, verification=verification)
            signed = SessionRecord(record=record, signature=self.signer.sign(record), key_id=self.signer.key_id)
            if reason != "expired":  # nobody asked for it then
                await self.bus.publish(session_id, Envelope(session.therapist().id, None, encode(signed)))
        await self.bus.publish(
            session_id,
            Envelope(None, None, encode(SessionEnded(reason=reason)), CLOSE_ENDED),  # type: ignore[arg-type]
        )
        await publish_count(self.bus, owner, session_id, 0)
        await self.grants.ended(session)  # before its keys go: they say which tokens to revoke
        removed = await self.store.delete_prefix(session_prefix(session_id))
        self.records.forget(session_id)
        self.metrics.setups.forget(session_id)
        await self.media.release(session_id, session.media)
        log.info("event=session_%s session=%s keys_deleted=%d", reason, session_id, removed)
        if owner is not None:
            for listener in self._end_listeners:
                try:
                    await listener(owner, session_id)
                except StoreUnavailable:
                    log.info("event=end_listener_unavailable session=%s", session_id)
            if signed is not None:
                await self.history.keep(owner, SignedRecord(signed.record, signed.signature, signed.key_id))
        await self._audit("session_ended", actor, session_id, reason)

    async def expire_due(self, session_id: str) -> None:
        """Called when a session's window closes (``EXPIRY_LEAD_S`` early, while its record still exists)."""
        try:
            session, ended = await self.records.mutate(session_id, lambda s: sm.expire(s, self.clock() + EXPIRY_LEAD_S))
        except (ProtocolError, StoreUnavailable):
            return
        if ended:
            await self._finish(session, "expired")

    async def shutdown(self, after_ms: int = 500) -> None:
        """Stop accepting; ask every connected peer to reconnect (to another process)."""
        self.accepting = False
        notice = encode(Reconnect(reason="restart", after_ms=after_ms))
        await self.connections.close_all(notice, CLOSE_RESTART)
        self.connections.stop()
        self.records.stop()
        for task in list(self._tasks):
            task.cancel()

    async def _publish_views(self, session: Session, resend: str | None = None) -> None:
        """Send every peer of the session what it should now see (and Janus credentials to whom they are due)."""
        for envelope in views_of(session):
            await self.bus.publish(session.id, envelope)
        if session.media == "janus":
            self._spawn(self.grants.settle(session, resend))
        await publish_count(self.bus, session.owner, session.id, waiting_count(session))  # the owner's dashboard

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _audit(self, event: str, actor: str | None, session: str | None, outcome: str) -> None:
        if self.audit is not None:
            await self.audit(event, actor, session, outcome)
