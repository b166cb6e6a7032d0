"""Relays between the seats of a session, and what the bus delivers to this process's connections.

A relayed offer, answer, candidate, renegotiate or roster is checked against the session
record (the sender and the recipient admitted and neither on hold, the offerer rule, a roster
only from the therapist), stamped with its sender,
written to the recipient's resume buffer (its mailbox) and published on the
session's bus channel; the bus numbers it (``seq``) per recipient. Every process
that holds a connection of the session delivers what comes on the channel to its
own connections, in ``seq`` order: a relay that overtook an earlier one waits while
the missing ones are read from the resume buffer, and a peer that comes back is
sent what it missed from there.

Views of the session (waiting room, status, peers) carry the revision of the record they
show: processes publish them on their own, so one can arrive after a newer one, and a
connection is never sent a view older than the last it was sent (a late ``peers`` of before
the admit would close a call being set up: tests/store/test_cross_broker_soak.py found it).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import msgspec

from broker.metrics.registry import Metrics
from broker.signaling import session as sm
from broker.signaling.connections import Connection, Connections, Spawn
from broker.signaling.protocol import (
    Answer,
    Candidate,
    ClientMessage,
    ErrorCode,
    Offer,
    ProtocolError,
    Renegotiate,
    Role,
    Roster,
    encode,
)
from broker.signaling.session import Session
from broker.signaling.session_records import SessionRecords
from broker.store.base import Store, StoreUnavailable, session_prefix
from broker.store.bus import Bus, Envelope, Pending, with_seq

log = logging.getLogger("broker.hub")

#: Relayed messages kept per recipient for a peer that reconnects (the newest ones).
RESUME_MAX = 128

#: The messages the broker relays from one peer to another.
RELAYED = frozenset({Offer, Answer, Candidate, Renegotiate, Roster})

Relayed = Offer | Answer | Candidate | Renegotiate | Roster


def mailbox_key(session_id: str, peer_id: str) -> str:
    """The seat's resume buffer: what was relayed to it, by ``seq``."""
    return f"{session_prefix(session_id)}:box:{peer_id}"


class Relays:
    """Relays between seats, and the routing of the bus's messages to this process's connections."""

    def __init__(
        self,
        store: Store,
        bus: Bus,
        records: SessionRecords,
        connections: Connections,
        clock: Callable[[], float],
        spawn: Spawn,
        metrics: Metrics,
    ) -> None:
        self.metrics = metrics
        self.store = store
        self.bus = bus
        self.records = records
        self.connections = connections
        self.clock = clock
        self._spawn = spawn
        #: Per connection, its newest relays that went on their way to the bus (see ``_on_its_way``).
        self._unsettled: dict[Connection, Pending] = {}
        # Local routing: seat -> connection, and the connections per session.
        self._by_peer: dict[tuple[str, str], Connection] = {}
        self._by_session: dict[str, set[Connection]] = {}
        self._bus_handlers: dict[str, Callable[[Envelope], None]] = {}
        bus.add_reconnect_listener(self.resend_missed)
        connections.on_ack = self.acknowledge

    # ------------------------------------------------------------ relaying

    def done_now(self, conn: Connection, message: ClientMessage) -> bool:
        """Relay a message that needs nothing awaited: the session record is in this process's
        recent copy and the bus can relay without waiting (the embedded broker). False for
        anything else (untouched): no coroutine on the way of the most frequent message (P1 in benchmarks/)."""
        if type(message) not in RELAYED or conn.peer_id is None:
            return False
        session = self.records.relay_copy_now(conn.session_id or "")
        if session is None:
            return False
        try:
            failed = functools.partial(self._relay_failed, conn, message.id)
            sent = self.bus.publish_relayed_soon(*self.checked(conn, message, session), failed)  # type: ignore[arg-type]
        except Exception as exc:
            conn.refuse(exc, message.id)
            return True
        if sent is None:
            return False
        if not isinstance(sent, int):
            self._on_its_way(conn, sent)
        return True

    def _on_its_way(self, conn: Connection, sent: Pending) -> None:
        """Relays the bus is still sending (Redis): the connection's next frames need not wait for
        them, but anything other than a relay does (``unsettled``); the bus settles them in order, so
        the newest stands for all. A failure is answered when it comes (``_relay_failed``)."""
        self._unsettled[conn] = sent

    def _relay_failed(self, conn: Connection, ref: str | None, error: BaseException) -> None:
        if isinstance(error, Exception):
            conn.refuse(error, ref)

    def unsettled(self, conn: Connection) -> Pending | None:
        """This connection's relays still on their way to the store, if any: what it sent next waits for them."""
        unsettled = self._unsettled.pop(conn, None)
        return unsettled if unsettled is not None and not unsettled.done() else None

    async def relay(self, conn: Connection, message: Relayed) -> None:
        """A relay that waits for the store's record (this process has no recent copy)."""
        assert conn.session_id and conn.peer_id
        session = await self.records.relay_copy(conn.session_id)
        await self.bus.publish_relayed(*self.checked(conn, message, session))

    def checked(
        self, conn: Connection, message: Relayed, session: Session
    ) -> tuple[str, Envelope, Store, str, int, float]:
        """A relayed message checked against the session and encoded for its recipient: the
        arguments of ``Bus.publish_relayed`` (its resume buffer lives as long as the session);
        ProtocolError when it may not go. Every relay passes here."""
        assert conn.peer_id
        if isinstance(message, Roster) and conn.role is not Role.THERAPIST:
            # Therapist only: refused before anything else about it (docs/protocol.md 5, "Roles").
            raise ProtocolError(ErrorCode.NOT_ALLOWED, "Only the therapist can send a roster.")
        sm.can_relay(session, conn.peer_id, message.to, conn.id)
        if isinstance(message, (Offer, Answer, Renegotiate)):
            lead = sm.offerer(session.seat(conn.peer_id), session.seat(message.to))
            sender_offers = lead == conn.peer_id
            if isinstance(message, Offer) and not sender_offers:
                raise ProtocolError(ErrorCode.NOT_OFFERER, "The other peer makes the offers for this pair.")
            if isinstance(message, (Answer, Renegotiate)) and sender_offers:
                raise ProtocolError(ErrorCode.NOT_OFFERER, "You make the offers for this pair; send an offer.")
        self.metrics.relayed_message(message, session.id, conn.peer_id, message.to)
        # Encoded once, with seq null: the bus stamps the seq into the bytes (bus.with_seq).
        data = encode(msgspec.structs.replace(message, from_=conn.peer_id, id=None, seq=None))
        # The buffer lives as long as the session: never longer, and its numbering never restarts early.
        ttl = max(1.0, session.expires - self.clock())
        return (
            session.id,
            Envelope(message.to, None, data),
            self.store,
            mailbox_key(session.id, message.to),
            RESUME_MAX,
            ttl,
        )

    def forget(self, conn: Connection) -> None:
        """The connection is gone: its relays on their way are nobody's concern."""
        self._unsettled.pop(conn, None)

    # ------------------------------------------------------------ resume buffers

    async def replay(self, conn: Connection, session_id: str, peer: str, after: int) -> None:
        """Send again what was relayed to this seat after ``after``, then what arrived meanwhile, in order."""
        conn.replaying = True
        try:
            entries = await self.store.read_since(mailbox_key(session_id, peer), after)
        finally:
            held, conn.held, conn.replaying = conn.held or [], None, False
        conn.last_seq = max(conn.last_seq, after)
        for seq, data in entries:
            if seq > conn.last_seq:
                conn.deliver(with_seq(data, seq))
                conn.last_seq = seq
        for envelope in held:
            if envelope.seq is not None and envelope.seq <= conn.last_seq:
                continue  # already sent from the buffer
            conn.last_seq = max(conn.last_seq, envelope.seq or 0)
            conn.deliver(envelope.data, envelope.close)

    def acknowledge(self, conn: Connection, seq: int) -> None:
        """The page has read every relay up to ``seq`` (``ping.ack``): its seat's resume buffer drops
        them, since a reconnect of this page resumes after them anyway. Only what this connection
        was handed counts (an ack past it trims nothing more), and another device of the seat is
        sent no relays, so has nothing to acknowledge. Most of a session's relays are its set-up's:
        without this an idle call kept them all in the buffer (issue 32's memory per session)."""
        through = min(seq, conn.last_seq)
        if through <= conn.acked or conn.other_device or conn.session_id is None or conn.peer_id is None:
            return
        conn.acked = through
        self._spawn(self._trim(mailbox_key(conn.session_id, conn.peer_id), through))

    async def _trim(self, key: str, through: int) -> None:
        try:
            await self.store.trim_log(key, through)
        except StoreUnavailable:
            log.info("event=resume_trim_failed")  # kept a while longer: a later ack trims it

    async def skip_missed(self, conn: Connection, session_id: str, peer: str) -> None:
        """A fresh page, or one not admitted (the waiting room exchanges no signaling): what was
        relayed to this seat before is not for it."""
        missed = await self.store.read_since(mailbox_key(session_id, peer), 0)
        conn.last_seq = max(conn.last_seq, missed[-1][0] if missed else 0)

    async def _fill_gap(self, conn: Connection, session_id: str) -> None:
        """A relay came with a seq past the next one: send the missing ones from the resume buffer
        (a relay's entry is written there before it is published), then those held meanwhile."""
        try:
            await self.replay(conn, session_id, conn.peer_id or "", conn.last_seq)
        except StoreUnavailable:
            log.info("event=relay_gap_unfilled conn=%s", conn.id)

    async def resend_missed(self) -> None:
        """After the bus was cut off from other processes: resend each local peer what it missed."""
        self.records.all_changed()  # changes announced meanwhile were missed too
        for conn in self.connections:
            if conn.joined and not conn.closed and not conn.other_device:
                try:
                    await self.replay(conn, conn.session_id or "", conn.peer_id or "", conn.last_seq)
                except StoreUnavailable:
                    return

    # ------------------------------------------------------------ local routing

    def _on_bus(self, session_id: str) -> Callable[[Envelope], None]:
        def handler(envelope: Envelope) -> None:
            if envelope.seq is None:
                # Every change of the record that matters to relaying is followed by such a notice.
                self.records.changed(session_id)
            if envelope.to_conn is not None:
                conn = self.connections.by_id.get(envelope.to_conn)
                targets = [conn] if conn is not None and conn.session_id == session_id else []
                if envelope.takes_seat:
                    for conn in targets:
                        self._take_seat(conn)
                    return
            elif envelope.to_peer is not None:
                conn = self._by_peer.get((session_id, envelope.to_peer))
                targets = [conn] if conn is not None else []
            else:
                targets = list(self._by_session.get(session_id, ()))
            for conn in targets:
                if envelope.revision is not None:
                    if envelope.revision < conn.view_revision:
                        continue  # a view of an older record, published by another process, came late
                    conn.view_revision = envelope.revision
                if envelope.seq is not None and conn.replaying:
                    if conn.held is None:
                        conn.held = []
                    conn.held.append(envelope)
                    continue
                if envelope.seq is not None:
                    if envelope.seq <= conn.last_seq:
                        continue  # already resent from the resume buffer
                    if envelope.seq > conn.last_seq + 1:
                        # An earlier relay for this seat is still on its way: relays from this
                        # process and from another reach it by different paths. Send what is
                        # missing from the seat's resume buffer first, then this one, in order.
                        conn.replaying = True
                        conn.held = [envelope]
                        self._spawn(self._fill_gap(conn, session_id))
                        continue
                    conn.last_seq = envelope.seq
                conn.deliver(envelope.data, envelope.close)
                if envelope.close is not None and envelope.to_conn is None:
                    # This connection no longer holds a seat worth routing to.
                    key = (session_id, conn.peer_id or "")
                    if self._by_peer.get(key) is conn:
                        del self._by_peer[key]

        return handler

    async def route(self, conn: Connection) -> bool:
        """Deliver the session's messages to this joined connection; True when it is the session's
        first connection here (this process now listens on the session's channel)."""
        assert conn.session_id and conn.peer_id
        sid = conn.session_id
        if not conn.other_device:  # another device gets views by its connection, and no relays
            self._by_peer[(sid, conn.peer_id)] = conn
        members = self._by_session.setdefault(sid, set())
        first = not members
        members.add(conn)
        if first:
            handler = self._on_bus(sid)
            self._bus_handlers[sid] = handler
            await self.bus.subscribe(sid, handler)
        return first

    async def hold_seat(self, conn: Connection) -> None:
        """Relays for the connection's seat come to this process (before it reads its resume buffer)."""
        assert conn.session_id and conn.peer_id
        if not conn.other_device:
            conn.holds_peer = True
            await self.bus.hold_peer(conn.session_id, conn.peer_id)

    def _take_seat(self, conn: Connection) -> None:
        """A seat's other device was admitted: its connection now holds the seat here."""
        if not conn.other_device or conn.closed:
            return
        conn.other_device = False
        self._by_peer[(conn.session_id or "", conn.peer_id or "")] = conn
        self._spawn(self._hold_taken_seat(conn))

    async def _hold_taken_seat(self, conn: Connection) -> None:
        """Relays for the seat reach this process from now on; any that came before the bus knew
        it (they are in the seat's resume buffer) are sent now, in order."""
        conn.holds_peer = True
        try:
            await self.bus.hold_peer(conn.session_id or "", conn.peer_id or "")
            if not conn.closed:
                await self.replay(conn, conn.session_id or "", conn.peer_id or "", conn.last_seq)
        except StoreUnavailable:
            pass  # the bus's reconnect resends what is missing (resend_missed)

    def unroute_seat(self, conn: Connection) -> None:
        """Relays for the seat no longer go to this connection."""
        key = (conn.session_id or "", conn.peer_id or "")
        if self._by_peer.get(key) is conn:
            del self._by_peer[key]

    def sessions_here(self) -> list[str]:
        """The sessions this process holds a connection of."""
        return list(self._by_session)

    def last_here(self, conn: Connection) -> bool:
        """The connection is the only one of its session routed here."""
        return self._by_session.get(conn.session_id or "") == {conn}

    async def unroute(self, conn: Connection) -> None:
        """Deliver nothing more to the connection; the last of its session here stops listening."""
        sid = conn.session_id or ""
        members = self._by_session.get(sid)
        if not members or conn not in members:
            return
        members.discard(conn)
        handler = None
        if not members:  # the bookkeeping first, before anything is awaited
            del self._by_session[sid]
            handler = self._bus_handlers.pop(sid, None)
        if conn.holds_peer:
            conn.holds_peer = False
            await self.bus.release_peer(sid, conn.peer_id or "")
        if handler is not None:
            await self.bus.unsubscribe(sid, handler)
