"""The signaling service: connections in, state machine and store in the middle, bus out.

The hub knows nothing about HTTP: the server hands it a ``Transport`` per
WebSocket and every text frame received. For each message it loads the
session record, applies one state-machine step atomically through the store,
and publishes what each peer should now see on the session's bus channel.
Every process that holds a connection of the session delivers those messages
locally, so peers of one session may sit on different broker processes.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import logging
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec

from broker.signaling import session as sm
from broker.signaling.protocol import (
    PROTOCOL_VERSION,
    Admit,
    AllowReturn,
    Answer,
    Candidate,
    ChecklistAccepted,
    ChecklistSubmit,
    ClientMessage,
    Decline,
    Declined,
    End,
    Error,
    ErrorCode,
    Hello,
    Join,
    Joined,
    Leave,
    Offer,
    OtherDeviceEntry,
    PeerInfo,
    Peers,
    Ping,
    Pong,
    PreflightAnswer,
    PreflightOffer,
    ProtocolError,
    Reconnect,
    Remove,
    Removed,
    Renegotiate,
    Report,
    Role,
    SeatState,
    SessionEnded,
    SessionRecord,
    Status,
    WaitingEntry,
    WaitingRoom,
    Welcome,
    decode_client,
    encode,
)
from broker.signaling.record import RecordSigner, build_record
from broker.signaling.session import Session
from broker.signaling.tokens import (
    INVALID_MESSAGE,
    TokenClaims,
    TokenCodec,
    new_resume_secret,
    new_session_id,
    resume_digest,
)
from broker.store.base import Store, StoreUnavailable, session_key, session_prefix
from broker.store.bus import Bus, Envelope, Pending, with_seq

log = logging.getLogger("broker.hub")

# WebSocket close codes the broker uses (documented in docs/protocol.md).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_RESTART = 1012
CLOSE_REPLACED = 4001
CLOSE_UNWELCOME = 4003
CLOSE_AUTH_TIMEOUT = 4008
CLOSE_TOO_SLOW = 4009
CLOSE_ENDED = 4010
CLOSE_FLOOD = 4029

#: Relayed messages kept per recipient for a peer that reconnects (the newest ones).
RESUME_MAX = 128
#: A session's end is handled this long before its ``expires``, while its record is still in the
#: store (the record's TTL ends at ``expires``; a check after that would find nothing to end).
EXPIRY_LEAD_S = 1.0
#: How long relays may go on checking this process's copy of a session record. A change made here
#: drops the copy at once, and a change made by another process when its notice (every change that
#: matters to relaying publishes one) arrives on the bus; the age limit covers a notice lost in a
#: bus outage.
RELAY_RECORD_MAX_AGE_S = 0.5
#: A copy older than this is read again in the background by the next relay that uses it, so a
#: session with traffic keeps a fresh copy and its relays never wait for the store (P4 in
#: benchmarks/: on Redis, waiting cost every sixth message a round trip at 12 messages/s).
RELAY_RECORD_REFRESH_S = RELAY_RECORD_MAX_AGE_S / 2
#: Copies that fall due within this long of each other are read again together: on Redis their
#: reads leave in one write and their answers come back together, so a process with many busy
#: sessions wakes itself and Redis a few times a second for them, not once per session and
#: refresh (P4 in benchmarks/: at 1,000 messages/s over 100 sessions, 400 reads a second per
#: process cost more CPU than the relays' own work). Well under the time left before the copy's
#: age runs out (MAX_AGE - REFRESH).
RELAY_RECORD_GATHER_S = 0.05
#: Decoded session records kept per process, the most recently used (a miss costs one msgpack decode).
DECODED_MAX = 1024

#: The messages the broker relays from one peer to another (handled by ``Hub._on_relay``).
_RELAYED = frozenset({Offer, Answer, Candidate, Renegotiate})


def mailbox_key(session_id: str, peer_id: str) -> str:
    return f"{session_prefix(session_id)}:box:{peer_id}"


_record_encoder = msgspec.msgpack.Encoder()
_record_decoder = msgspec.msgpack.Decoder(Session)


def encode_record(session: Session) -> bytes:
    return _record_encoder.encode(session)


def decode_record(raw: bytes) -> Session:
    return _record_decoder.decode(raw)


class Transport(Protocol):
    """What the hub needs from a WebSocket."""

    async def send_text(self, data: bytes) -> None:
        """Write ``data`` (UTF-8 JSON) as a text frame, waiting while the socket is paused."""
        ...

    async def close(self, code: int, reason: str) -> None: ...


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


IceServers = Callable[[str, int], list[dict[str, Any]]]
AuditHook = Callable[[str, str | None, str | None, str], Awaitable[None]]


@dataclass
class Limits:
    auth_deadline_s: float = 5.0
    heartbeat_s: float = 20.0
    rate_per_s: float = 50.0
    rate_burst: int = 200
    send_queue_limit: int = 256


class TokenBucket:
    """Per-connection message budget: ``rate`` per second, up to ``burst`` at once.

    Also counts refusals over a sliding window, so a sender that keeps going far over
    budget is recognised as a flood even though some of its messages get through.
    """

    FLOOD_WINDOW_S = 10.0

    __slots__ = ("rate", "burst", "tokens", "stamp", "refused", "_first_refusal_notice")  # one per connection: small

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic()
        #: Refusals in the current window (decayed linearly as the window slides).
        self.refused = 0.0
        self._first_refusal_notice = True

    def take(self) -> bool:
        now = time.monotonic()
        elapsed = now - self.stamp
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        if self.refused:
            self.refused = max(0.0, self.refused - elapsed * self.refused / self.FLOOD_WINDOW_S)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            if self.refused < 1.0:
                self._first_refusal_notice = True
            return True
        self.refused += 1.0
        return False

    def should_warn(self) -> bool:
        """True once per stretch of refusals: one error message, not one per dropped message."""
        warn, self._first_refusal_notice = self._first_refusal_notice, False
        return warn

    @property
    def flooding(self) -> bool:
        return self.refused > 4 * self.burst


@dataclass(eq=False, slots=True)
class Connection:
    """One WebSocket held by this process.

    Messages wait in a bounded queue, in order, for a writer task that exists only
    while the queue holds any: an idle connection holds neither, so ten thousand of
    them stay small. The writer hands them to aiohttp's WebSocket one by one and only
    waits when the peer's socket is paused (it reads slower than we write); a peer whose
    queue fills meanwhile is closed (4009), and nobody else waits for it.
    """

    transport: Transport
    limits: Limits
    id: str = field(default_factory=lambda: secrets.token_hex(8))
    helloed: bool = False
    session_id: str | None = None
    peer_id: str | None = None
    role: Role | None = None
    closed: bool = False
    bucket: TokenBucket = field(init=False)
    #: Messages waiting for the socket, oldest first, each with the close code to send after it
    #: (if any); made by the first message, dropped once the writer has written them all.
    pending: deque[tuple[bytes, int | None]] | None = None
    #: The task writing ``pending``; None whenever nothing waits.
    writer: asyncio.Task[None] | None = None
    deadline: asyncio.TimerHandle | None = None
    #: The highest relayed ``seq`` handed to this connection (to resend what a bus outage dropped).
    last_seq: int = 0
    #: While a replay reads the resume buffer, live relayed messages wait here, so order holds.
    replaying: bool = False
    held: list[Envelope] | None = None
    #: Joined as a client seat's other device: waits for the therapist, never relayed to.
    other_device: bool = False
    #: The bus was told this process holds the seat's peer (``Bus.hold_peer``).
    holds_peer: bool = False

    def __post_init__(self) -> None:
        self.bucket = TokenBucket(self.limits.rate_per_s, self.limits.rate_burst)

    @property
    def joined(self) -> bool:
        return self.peer_id is not None

    @property
    def flushed(self) -> bool:
        """Nothing waits to be written."""
        return self.writer is None

    def deliver(self, data: bytes, close: int | None = None) -> None:
        """Send a message (and then close, with ``close``), in order; a peer that cannot keep up
        is closed, nobody else waits."""
        if not self.closed:
            self._queue(data, close)

    def _queue(self, data: bytes, close: int | None) -> bool:
        """Let a message wait for the socket; False when the queue is full and the peer was closed."""
        pending = self.pending
        if pending is None:
            pending = self.pending = deque()
        if len(pending) >= self.limits.send_queue_limit:
            self.closed = True
            self.pending = None
            log.info("event=slow_consumer_closed conn=%s", self.id)
            asyncio.get_running_loop().create_task(self.transport.close(CLOSE_TOO_SLOW, "too slow"))
            return False
        pending.append((data, close))
        if self.writer is None:
            self.writer = asyncio.get_running_loop().create_task(self._write_pending())
        return True

    async def _write_pending(self) -> None:
        """Write what waits, then end, letting go of the queue: an idle connection keeps neither."""
        try:
            while self.pending:  # None once a full queue closed the peer
                data, close = self.pending.popleft()
                if data:
                    await self.transport.send_text(data)
                if close is not None:
                    self.closed = True
                    await self.transport.close(close, "")
                    return
        except (ConnectionError, RuntimeError):
            self.closed = True
        finally:
            self.writer = None
            self.pending = None


class Hub:
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
        audit: AuditHook | None = None,
        signer: RecordSigner | None = None,
        clock: Callable[[], float] = time.time,
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
        #: The answer to a genuine link whose session is not in the store (the store may have
        #: lost it: broker/store/redis_marker.py); ``invalid_token`` unless the app says otherwise.
        self.missing_session: Callable[[TokenClaims], ProtocolError] = lambda claims: sm.invalid_token_error()
        self.connections: dict[str, Connection] = {}
        #: Per connection, its newest relays that went on their way to the bus (see ``_on_its_way``).
        self._unsettled: dict[Connection, Pending] = {}
        # Local routing: seat -> connection, and the connections per session.
        self._by_peer: dict[tuple[str, str], Connection] = {}
        self._by_session: dict[str, set[Connection]] = {}
        # Expiry of the sessions with a local connection: when each is due, a heap of
        # (due, session) with stale entries skipped, and one loop timer for the earliest.
        self._expiry_due: dict[str, float] = {}
        self._expiry_heap: list[tuple[float, str]] = []
        self._expiry_timer: asyncio.TimerHandle | None = None
        self._expiry_timer_at = 0.0
        self._decoded: OrderedDict[str, tuple[bytes, Session]] = OrderedDict()
        #: What relays check admission against, per session: (when read, record); see RELAY_RECORD_MAX_AGE_S.
        self._relay_records: OrderedDict[str, tuple[float, Session]] = OrderedDict()
        #: Sessions whose copy is being read again in the background (one read each at a time).
        self._refreshing: set[str] = set()
        #: Of those, the ones whose read waits for the others of its gathering (RELAY_RECORD_GATHER_S).
        self._refresh_due: list[str] = []
        self._refresh_timer: asyncio.TimerHandle | None = None
        self._record_changes = 0
        self._bus_handlers: dict[str, Callable[[Envelope], None]] = {}
        self._preflights: dict[tuple[str, str], asyncio.Future[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._end_listeners: list[Callable[[str, str], Awaitable[None]]] = []
        self.accepting = True
        bus.add_reconnect_listener(self.resend_missed)

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
    ) -> tuple[Session, dict[str, str]]:
        """Schedule a session; returns it and the invite token of every seat by peer id.

        With ``group_link`` the tokens also hold, under ``"group"``, one link for all clients.
        """
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
        )
        await self._save(session)
        tokens = {seat.id: self.tokens.issue(sm.claims_for(session, seat)) for seat in session.seats}
        if group_link:
            tokens["group"] = self.tokens.issue(sm.group_claims(session))
        log.info("event=session_created session=%s seats=%d", session.id, len(session.seats))
        await self._audit("session_created", None, session.id, "ok")
        return session, tokens

    async def get_session(self, session_id: str) -> Session | None:
        raw = await self.store.get(session_key(session_id))
        return self._decode(session_id, raw) if raw is not None else None

    async def revoke_seat(self, session_id: str, peer_id: str, *, reissue: bool = False) -> str | None:
        """Revoke a client seat's link (and issue a new one if asked); drops its connections."""
        others: list[str | None] = []

        def revoke(s: Session) -> sm.Seat:
            seat = s.seat(peer_id)
            others.append(seat.other.conn if seat.other is not None else None)
            return (sm.reissue if reissue else sm.revoke)(s, peer_id)

        session, seat = await self._mutate(session_id, revoke)
        await self.store.clear_log(mailbox_key(session_id, peer_id))
        gone = encode(Error(code=ErrorCode.INVALID_TOKEN, message=INVALID_MESSAGE))
        await self.bus.publish(session_id, Envelope(peer_id, None, gone, CLOSE_UNWELCOME))
        if others[-1] is not None:
            await self.bus.publish(session_id, Envelope(None, others[-1], gone, CLOSE_UNWELCOME))
        await self._publish_views(session)
        log.info("event=seat_revoked session=%s peer=%s reissued=%s", session_id, peer_id, reissue)
        await self._audit("seat_revoked", None, session_id, "ok")
        return self.tokens.issue(sm.claims_for(session, seat)) if reissue else None

    def check_token(self, token: str) -> TokenClaims:
        """Authenticity and window of a token, without touching the store."""
        return self.tokens.check(token, self.clock())

    async def resolve_token(self, token: str) -> tuple[Session, sm.Seat]:
        """The session and seat a token opens, or ProtocolError with the right code."""
        claims = self.check_token(token)
        session = await self.get_session(claims.session_id)
        if session is None:
            raise self.missing_session(claims)
        if claims.token_id == session.group_token_id:
            client = session.clients()[0]
            return session, client
        return session, sm.seat_for_token(session, claims.token_id)

    # ------------------------------------------------------------ connections

    def open(self, transport: Transport) -> Connection:
        conn = Connection(transport, self.limits)
        self.connections[conn.id] = conn
        conn.deadline = asyncio.get_running_loop().call_later(self.limits.auth_deadline_s, self._auth_deadline, conn)
        return conn

    def _auth_deadline(self, conn: Connection) -> None:
        if not conn.joined and not conn.closed:
            log.info("event=auth_timeout conn=%s", conn.id)
            message = f"Join within {self.limits.auth_deadline_s:g} seconds of connecting."
            self._close_after_queue(conn, CLOSE_AUTH_TIMEOUT, Error(code=ErrorCode.AUTH_TIMEOUT, message=message))

    def _close_after_queue(self, conn: Connection, code: int, last: msgspec.Struct | None = None) -> None:
        """Close once everything already queued (and ``last``, if given) has been written."""
        conn.deliver(encode(last) if last is not None else b"", code)

    def receive_now(self, conn: Connection, text: str | bytes) -> Awaitable[None] | None:
        """Handle one frame within this step if it can be; else what to await to finish it.
        Any refusal is answered with an error and changes nothing.

        A relayed message is handled here at once when the session record is in this
        process's recent copy and the bus can relay without waiting (the embedded broker):
        no coroutine on the way of the most frequent message (P1 in benchmarks/).
        Frames of one connection must be handled in order: await what this returns
        before giving it the next one.
        """
        message = self._take_now(conn, text)
        return None if message is None else self._handle(conn, message)

    def _take_now(self, conn: Connection, text: str | bytes) -> ClientMessage | None:
        """What can be done with a frame within this step (rate limit, decoder, ping, a relay that
        waits for nothing); the decoded message when the rest must be awaited (``_handle``)."""
        try:
            message = self._taken(conn, text)
            if message is None or self._done_now(conn, message):
                return None
            return message
        except Exception as exc:  # never let one bad message take the connection down
            self._refuse(conn, exc, None)
            return None

    def _taken(self, conn: Connection, text: str | bytes) -> ClientMessage | None:
        """The frame's message after the rate limit and the decoder; None when it was answered
        (or dropped) already."""
        if conn.closed:
            return None
        if not conn.bucket.take():
            if conn.bucket.flooding:
                log.info("event=flood_closed conn=%s", conn.id)
                conn.closed = True
                self._spawn(conn.transport.close(CLOSE_FLOOD, "flood"))
            elif conn.bucket.should_warn():
                self._send(conn, Error(code=ErrorCode.TOO_MANY_REQUESTS, message="Slow down: too many messages."))
            return None
        try:
            return decode_client(text)
        except ProtocolError as exc:
            self._refuse(conn, exc, None)
            return None

    def _done_now(self, conn: Connection, message: ClientMessage) -> bool:
        """Handle a ping, or a relay that needs nothing awaited; False for anything else (untouched)."""
        if type(message) is Ping:  # answered at once, even while this connection's relays are on their way
            self._send(conn, Pong(n=message.n))
            return True
        if type(message) not in _RELAYED or conn.peer_id is None:
            return False
        session = self._relay_record_now(conn.session_id or "")
        if session is None:
            return False
        try:
            failed = functools.partial(self._relay_failed, conn, message.id)
            sent = self.bus.publish_relayed_soon(*self._relay_checked(conn, message, session), failed)  # type: ignore[arg-type]
        except Exception as exc:
            self._refuse(conn, exc, message.id)
            return True
        if sent is None:
            return False
        if not isinstance(sent, int):
            self._on_its_way(conn, sent)
        return True

    def _on_its_way(self, conn: Connection, sent: Pending) -> None:
        """Relays the bus is still sending (Redis): the connection's next frames need not wait for
        them, but anything other than a relay does (``_handle``); the bus settles them in order, so
        the newest stands for all. A failure is answered when it comes (``_relay_failed``)."""
        self._unsettled[conn] = sent

    def _relay_failed(self, conn: Connection, ref: str | None, error: BaseException) -> None:
        if isinstance(error, Exception):
            self._refuse(conn, error, ref)

    async def _handle(self, conn: Connection, message: ClientMessage) -> None:
        unsettled = self._unsettled.pop(conn, None)
        if unsettled is not None and not unsettled.done():
            await unsettled.wait()  # this connection's relays reach the store before what it sent next
        try:
            await self._dispatch(conn, message)
        except Exception as exc:
            self._refuse(conn, exc, message.id)

    def _refuse(self, conn: Connection, exc: Exception, ref: str | None) -> None:
        """Answer a message that failed with the error it earned (it changed nothing)."""
        if isinstance(exc, ProtocolError):
            self._send(conn, Error(code=exc.code, message=exc.message, ref=ref, retry_after_ms=exc.retry_after_ms))
        elif isinstance(exc, StoreUnavailable):
            self._send(
                conn,
                Error(
                    code=ErrorCode.UNAVAILABLE,
                    message="The service is briefly unavailable. Try again shortly.",
                    ref=ref,
                ),
            )
        else:  # never let one bad message take the connection down
            log.error("event=internal_error conn=%s", conn.id, exc_info=exc)
            self._send(conn, Error(code=ErrorCode.INTERNAL, message="Something went wrong on our side.", ref=ref))

    async def closed(self, conn: Connection) -> None:
        """The WebSocket is gone: release the seat if this connection still held it."""
        conn.closed = True
        self.connections.pop(conn.id, None)
        self._unsettled.pop(conn, None)
        if conn.deadline:
            conn.deadline.cancel()
        if conn.writer:
            conn.writer.cancel()
        conn.pending = None
        if not conn.joined:
            return
        assert conn.session_id and conn.peer_id
        peer_id = conn.peer_id
        key = (conn.session_id, conn.peer_id)
        if self._by_peer.get(key) is conn:
            del self._by_peer[key]
        await self._drop_local(conn)
        try:
            session, held = await self._mutate(conn.session_id, lambda s: sm.disconnect(s, peer_id, conn.id))
        except (ProtocolError, StoreUnavailable):
            return
        if held:
            log.info("event=peer_disconnected session=%s peer=%s", conn.session_id, conn.peer_id)
            await self._publish_views(session)

    # ------------------------------------------------------------ dispatch

    async def _dispatch(self, conn: Connection, message: ClientMessage) -> None:
        if not conn.helloed:
            if not isinstance(message, Hello):
                raise ProtocolError(ErrorCode.HELLO_REQUIRED, "Send hello first.")
            if message.protocol != PROTOCOL_VERSION:
                self._send(
                    conn,
                    Error(
                        code=ErrorCode.UNSUPPORTED_PROTOCOL,
                        message=f"This broker speaks protocol {PROTOCOL_VERSION}.",
                        ref=message.id,
                    ),
                )
                self._close_after_queue(conn, CLOSE_POLICY)
                return
            conn.helloed = True
            self._send(
                conn,
                Welcome(
                    protocol=PROTOCOL_VERSION,
                    heartbeat_s=self.limits.heartbeat_s,
                    auth_deadline_s=self.limits.auth_deadline_s,
                    max_message_bytes=64 * 1024,
                ),
            )
            return
        if isinstance(message, Hello):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "hello was already sent.")
        if not conn.joined:
            if not isinstance(message, Join):
                raise ProtocolError(ErrorCode.NOT_JOINED, "Join a session first.")
            await self._join(conn, message)
            return
        if isinstance(message, Join):
            raise ProtocolError(ErrorCode.ALREADY_JOINED, "This connection has already joined.")
        handler = self._handlers[type(message)]
        await handler(self, conn, message)

    async def _join(self, conn: Connection, message: Join) -> None:
        if not self.accepting:
            raise ProtocolError(ErrorCode.UNAVAILABLE, "This broker is restarting. Reconnect in a moment.")
        claims = self.check_token(message.token)
        presented = resume_digest(message.resume_secret) if message.resume_secret is not None else None
        secret = new_resume_secret()
        fresh = resume_digest(secret)
        by_group = [False]

        def take_seat(s: Session) -> sm.Joining:
            if s.group_token_id is not None and claims.token_id == s.group_token_id:
                seat = sm.claim_group_seat(s)
                by_group[0] = True
            else:
                seat = sm.seat_for_token(s, claims.token_id)
            return sm.connect(s, seat.id, conn.id, device=presented, new_device=fresh)

        # A genuine token of a session that is gone looks exactly like an unknown one.
        session, joining = await self._mutate(
            claims.session_id, take_seat, missing=lambda: self.missing_session(claims)
        )
        seat = joining.seat
        peer = seat.id
        conn.session_id, conn.peer_id, conn.role = session.id, peer, seat.role
        conn.other_device = joining.other is not None
        if conn.deadline:
            conn.deadline.cancel()
            conn.deadline = None  # the timer handle is not kept for the connection's whole life
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
        self._send(
            conn,
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
            ),
        )
        if message.resume is not None and not conn.other_device and seat.state is SeatState.ADMITTED:
            await self._replay(conn, session.id, peer, message.resume)
        else:
            # A fresh page, or one not admitted (the waiting room exchanges no signaling): what was
            # relayed to this seat before is not for it.
            missed = await self.store.read_since(mailbox_key(session.id, peer), 0)
            conn.last_seq = max(conn.last_seq, missed[-1][0] if missed else 0)
        log.info(
            "event=peer_joined session=%s peer=%s role=%s other_device=%s",
            session.id,
            peer,
            seat.role.value,
            conn.other_device,
        )
        if conn.other_device:
            await self._audit("other_device_joined", peer, session.id, "ok")
        await self._publish_views(session)

    async def _replay(self, conn: Connection, session_id: str, peer: str, after: int) -> None:
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

    async def _fill_gap(self, conn: Connection, session_id: str) -> None:
        """A relay came with a seq past the next one: send the missing ones from the resume buffer
        (a relay's entry is written there before it is published), then those held meanwhile."""
        try:
            await self._replay(conn, session_id, conn.peer_id or "", conn.last_seq)
        except StoreUnavailable:
            log.info("event=relay_gap_unfilled conn=%s", conn.id)

    async def resend_missed(self) -> None:
        """After the bus was cut off from other processes: resend each local peer what it missed."""
        self._record_changes += 1
        self._relay_records.clear()  # changes announced meanwhile were missed too
        for conn in list(self.connections.values()):
            if conn.joined and not conn.closed and not conn.other_device:
                try:
                    await self._replay(conn, conn.session_id or "", conn.peer_id or "", conn.last_seq)
                except StoreUnavailable:
                    return

    async def _on_checklist(self, conn: Connection, message: ChecklistSubmit) -> None:
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
            session, _ = await self._mutate(conn.session_id, submit)
        except ProtocolError as exc:
            if exc.code not in (ErrorCode.INVALID_STATE, ErrorCode.SESSION_ENDED):
                await self._audit("checklist_failed", conn.peer_id, conn.session_id, exc.code.value)
            raise
        await self._audit("checklist_passed", conn.peer_id, conn.session_id, "ok")
        self._send(conn, ChecklistAccepted(summary=accepted[0]))
        await self._publish_views(session)

    async def _on_preflight(self, conn: Connection, message: PreflightOffer) -> None:
        if self.preflight is None:
            raise ProtocolError(ErrorCode.PREFLIGHT_REFUSED, "This broker does not run a network pre-flight.")
        session = await self._load(conn.session_id or "")
        seat = session.seat(conn.peer_id or "")
        if sm.device_for(session, seat.id, conn.id).state is not SeatState.CHECKING:
            raise ProtocolError(ErrorCode.INVALID_STATE, "The pre-flight is part of the checklist, before waiting.")
        preflight_id, answer = await self.preflight.answer(message.sdp, session.id, seat.id)
        self._send(conn, PreflightAnswer(sdp=answer))
        key = (session.id, seat.id)
        task = asyncio.ensure_future(self._record_preflight(session.id, seat.id, conn.id, preflight_id))
        self._preflights[key] = task
        task.add_done_callback(lambda t: self._preflights.pop(key, None) if self._preflights.get(key) is t else None)

    async def _record_preflight(self, session_id: str, peer_id: str, conn_id: str, preflight_id: str) -> None:
        assert self.preflight is not None
        result = await self.preflight.wait_result(preflight_id, 30.0)

        def record(s: Session) -> None:
            sm.device_for(s, peer_id, conn_id).preflight = result  # the device that ran it

        try:
            await self._mutate(session_id, record)
        except (ProtocolError, StoreUnavailable):
            return
        log.info(
            "event=preflight_recorded session=%s peer=%s connected=%s", session_id, peer_id, result.get("connected")
        )

    async def _on_admit(self, conn: Connection, message: Admit) -> None:
        now = int(self.clock())
        if message.device is not None:
            await self._admit_other_device(conn, message.peer, message.device, now)
            return

        def admit(s: Session, actor: str, target: str) -> sm.Seat:
            seat = sm.admit(s, actor, target)
            sm.mark_admitted(s, target, now)
            return seat

        await self._therapist_action(conn, admit, message.peer, "seat_admitted", None)

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

        session, _ = await self._mutate(conn.session_id, admit)
        taken_from, taken_by = moved
        await self.store.clear_log(mailbox_key(session.id, target))
        log.info("event=other_device_admitted session=%s peer=%s", session.id, target)
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

    async def _on_decline(self, conn: Connection, message: Decline) -> None:
        if message.device is None:
            await self._therapist_action(conn, sm.decline, message.peer, "seat_declined", Declined())
            return
        assert conn.session_id and conn.peer_id
        session, turned_away = await self._mutate(
            conn.session_id, lambda s: sm.decline_other(s, conn.peer_id or "", message.peer, message.device or "")
        )
        log.info("event=other_device_declined session=%s peer=%s", session.id, message.peer)
        await self._audit("other_device_declined", conn.peer_id, session.id, "ok")
        if turned_away is not None:
            await self.bus.publish(session.id, Envelope(None, turned_away, encode(Declined()), CLOSE_UNWELCOME))
        await self._publish_views(session)

    async def _on_remove(self, conn: Connection, message: Remove) -> None:
        await self._therapist_action(conn, sm.remove, message.peer, "seat_removed", Removed())

    async def _on_allow_return(self, conn: Connection, message: AllowReturn) -> None:
        await self._therapist_action(conn, sm.allow_return, message.peer, "seat_allowed_back", None)

    async def _therapist_action(
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

        session, _ = await self._mutate(conn.session_id, act)
        log.info("event=%s session=%s peer=%s", event, session.id, target)
        await self._audit(event, conn.peer_id, session.id, "ok")
        if notice is not None:
            await self.store.clear_log(mailbox_key(session.id, target))
            await self.bus.publish(session.id, Envelope(target, None, encode(notice), CLOSE_UNWELCOME))
            if others[-1] is not None:
                await self.bus.publish(session.id, Envelope(None, others[-1], encode(notice), CLOSE_UNWELCOME))
        await self._publish_views(session)

    async def _on_relay(self, conn: Connection, message: Offer | Answer | Candidate | Renegotiate) -> None:
        assert conn.session_id and conn.peer_id
        session = await self._relay_record(conn.session_id)
        await self.bus.publish_relayed(*self._relay_checked(conn, message, session))

    def _relay_checked(
        self, conn: Connection, message: Offer | Answer | Candidate | Renegotiate, session: Session
    ) -> tuple[str, Envelope, Store, str, int, float]:
        """A relayed message checked against the session and encoded for its recipient: the
        arguments of ``Bus.publish_relayed`` (its resume buffer lives as long as the session);
        ProtocolError when it may not go."""
        assert conn.peer_id
        sm.can_relay(session, conn.peer_id, message.to, conn.id)
        if isinstance(message, (Offer, Answer, Renegotiate)):
            lead = sm.offerer(session.seat(conn.peer_id), session.seat(message.to))
            sender_offers = lead == conn.peer_id
            if isinstance(message, Offer) and not sender_offers:
                raise ProtocolError(ErrorCode.NOT_OFFERER, "The other peer makes the offers for this pair.")
            if isinstance(message, (Answer, Renegotiate)) and sender_offers:
                raise ProtocolError(ErrorCode.NOT_OFFERER, "You make the offers for this pair; send an offer.")
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

    async def _on_report(self, conn: Connection, message: Report) -> None:
        assert conn.session_id and conn.peer_id
        session = await self._load(conn.session_id)
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

        session, the_seat = await self._mutate(conn.session_id, leave)
        if the_seat and conn.role is Role.CLIENT:
            # What was relayed to the seat was for this page's calls: nobody else may read it.
            await self.store.clear_log(mailbox_key(session.id, conn.peer_id))
        log.info("event=peer_left session=%s peer=%s", session.id, conn.peer_id)
        self._close_after_queue(conn, CLOSE_NORMAL)
        await self._publish_views(session)

    async def _on_end(self, conn: Connection, message: End) -> None:
        assert conn.session_id and conn.peer_id
        session, _ = await self._mutate(conn.session_id, lambda s: sm.end(s, conn.peer_id or ""))
        if self.signer is not None:
            record = build_record(
                session, ended=int(self.clock()), reason="ended", verification=dict(message.verification or {})
            )
            signed = SessionRecord(record=record, signature=self.signer.sign(record), key_id=self.signer.key_id)
            await self.bus.publish(session.id, Envelope(conn.peer_id, None, encode(signed)))
        await self._finish(conn.session_id, "ended", actor=conn.peer_id, owner=session.owner)

    _handlers: dict[type, Callable[..., Awaitable[None]]] = {
        ChecklistSubmit: _on_checklist,
        PreflightOffer: _on_preflight,
        Admit: _on_admit,
        Decline: _on_decline,
        Remove: _on_remove,
        AllowReturn: _on_allow_return,
        Offer: _on_relay,
        Answer: _on_relay,
        Candidate: _on_relay,
        Renegotiate: _on_relay,
        Report: _on_report,
        Leave: _on_leave,
        End: _on_end,
    }

    # ------------------------------------------------------------ ending

    def add_end_listener(self, listener: Callable[[str, str], Awaitable[None]]) -> None:
        """``listener(owner, session_id)`` runs when a session with an owner ends here (by the
        therapist, or at its window's end), so what is kept about it elsewhere goes too."""
        self._end_listeners.append(listener)

    async def _finish(self, session_id: str, reason: str, actor: str | None = None, owner: str | None = None) -> None:
        """Tell everyone the session is over, then forget every key of it."""
        await self.bus.publish(
            session_id,
            Envelope(None, None, encode(SessionEnded(reason=reason)), CLOSE_ENDED),  # type: ignore[arg-type]
        )
        removed = await self.store.delete_prefix(session_prefix(session_id))
        self._decoded.pop(session_id, None)
        self._record_changed(session_id)
        log.info("event=session_%s session=%s keys_deleted=%d", reason, session_id, removed)
        if owner is not None:
            for listener in self._end_listeners:
                try:
                    await listener(owner, session_id)
                except StoreUnavailable:
                    log.info("event=end_listener_unavailable session=%s", session_id)
        await self._audit("session_ended", actor, session_id, reason)

    async def expire_due(self, session_id: str) -> None:
        """Called when a session's window closes (``EXPIRY_LEAD_S`` early, while its record still exists)."""
        try:
            session, ended = await self._mutate(session_id, lambda s: sm.expire(s, self.clock() + EXPIRY_LEAD_S))
        except (ProtocolError, StoreUnavailable):
            return
        if ended:
            await self._finish(session_id, "expired", owner=session.owner)

    async def shutdown(self, after_ms: int = 500) -> None:
        """Stop accepting; ask every connected peer to reconnect (to another process)."""
        self.accepting = False
        notice = encode(Reconnect(reason="restart", after_ms=after_ms))
        for conn in list(self.connections.values()):
            conn.deliver(notice, CLOSE_RESTART)
        for _ in range(100):
            if all(c.flushed for c in self.connections.values()):
                break
            await asyncio.sleep(0.02)
        if self._refresh_timer is not None:
            self._refresh_timer.cancel()
        for task in list(self._tasks):
            task.cancel()

    # ------------------------------------------------------------ views

    async def _publish_views(self, session: Session) -> None:
        """Send every peer of the session what it should now see."""
        therapist = session.therapist()
        present = therapist.conn is not None
        envelopes = [
            Envelope(
                therapist.id,
                None,
                encode(
                    WaitingRoom(
                        seats=[
                            WaitingEntry(
                                peer=s.id,
                                state=s.state,
                                connected=s.conn is not None,
                                minor=s.minor,
                                checklist=_summary_of(s),
                                details=s.details,
                                other_device=_other_device_entry(s.other),
                                other_device_declined=s.others_barred,
                            )
                            for s in session.clients()
                        ]
                    )
                ),
            )
        ]
        for seat in session.clients():
            if seat.conn is not None:
                envelopes.append(
                    Envelope(
                        seat.id,
                        None,
                        encode(Status(seat_state=seat.state, session_state=session.state, therapist_present=present)),
                    )
                )
            other = seat.other
            if other is not None and other.conn is not None:
                status = Status(seat_state=other.state, session_state=session.state, therapist_present=present)
                envelopes.append(Envelope(None, other.conn, encode(status)))
        live = sm.admitted(session)
        for seat in live:
            if seat.conn is None:
                continue
            peers = [
                PeerInfo(
                    peer=o.id,
                    role=o.role,
                    connected=o.conn is not None,
                    you_offer=sm.offerer(seat, o) == seat.id,
                    device=o.device_id,
                )
                for o in live
                if o.id != seat.id
            ]
            envelopes.append(Envelope(seat.id, None, encode(Peers(peers=peers))))
        for envelope in envelopes:
            await self.bus.publish(session.id, envelope)

    # ------------------------------------------------------------ local routing

    def _on_bus(self, session_id: str) -> Callable[[Envelope], None]:
        def handler(envelope: Envelope) -> None:
            if envelope.seq is None:
                # Every change of the record that matters to relaying is followed by such a notice.
                self._record_changed(session_id)
            if envelope.to_conn is not None:
                conn = self.connections.get(envelope.to_conn)
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

    async def _add_local(self, conn: Connection) -> None:
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
            session = await self.get_session(sid)
            if session is not None:
                self._schedule_expiry(sid, float(session.expires))
        if not conn.other_device:
            conn.holds_peer = True
            await self.bus.hold_peer(sid, conn.peer_id)  # before the connection reads its resume buffer

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
                await self._replay(conn, conn.session_id or "", conn.peer_id or "", conn.last_seq)
        except StoreUnavailable:
            pass  # the bus's reconnect resends what is missing (resend_missed)

    async def _drop_local(self, conn: Connection) -> None:
        sid = conn.session_id or ""
        members = self._by_session.get(sid)
        if not members or conn not in members:
            return
        members.discard(conn)
        handler = None
        if not members:  # the bookkeeping first, before anything is awaited
            del self._by_session[sid]
            handler = self._bus_handlers.pop(sid, None)
            self._expiry_due.pop(sid, None)  # its heap entry is skipped when it comes up
            self._decoded.pop(sid, None)
            self._record_changed(sid)
        if conn.holds_peer:
            conn.holds_peer = False
            await self.bus.release_peer(sid, conn.peer_id or "")
        if handler is not None:
            await self.bus.unsubscribe(sid, handler)

    # ------------------------------------------------------------ expiry

    def _schedule_expiry(self, session_id: str, expires: float) -> None:
        """End the session when it expires (wall clock), unless its last local connection goes first."""
        due = expires - EXPIRY_LEAD_S
        self._expiry_due[session_id] = due
        heapq.heappush(self._expiry_heap, (due, session_id))
        if len(self._expiry_heap) > 2 * len(self._expiry_due) + 64:
            self._expiry_heap = [(d, sid) for sid, d in self._expiry_due.items()]
            heapq.heapify(self._expiry_heap)
        self._arm_expiry_timer()

    def _arm_expiry_timer(self) -> None:
        """One loop timer, for the earliest due session (a timer per session costs memory per session)."""
        if not self._expiry_heap:
            return
        due = self._expiry_heap[0][0]
        if self._expiry_timer is not None:
            if self._expiry_timer_at <= due:
                return
            self._expiry_timer.cancel()
        self._expiry_timer_at = due
        delay = max(0.0, due - self.clock())
        self._expiry_timer = asyncio.get_running_loop().call_later(delay, self._expiry_timer_fired)

    def _expiry_timer_fired(self) -> None:
        self._expiry_timer = None
        now = self.clock()
        heap = self._expiry_heap
        while heap and heap[0][0] <= now:
            due, sid = heapq.heappop(heap)
            if self._expiry_due.get(sid) == due:
                del self._expiry_due[sid]
                self._spawn(self.expire_due(sid))
        self._arm_expiry_timer()

    # ------------------------------------------------------------ store access

    def _decode(self, session_id: str, raw: bytes) -> Session:
        """The record decoded, from a small cache of the recently used ones when it has not changed."""
        decoded = self._decoded
        cached = decoded.get(session_id)
        if cached is not None and (cached[0] is raw or cached[0] == raw):
            decoded.move_to_end(session_id)
            return cached[1]
        session = decode_record(raw)
        decoded[session_id] = (raw, session)
        decoded.move_to_end(session_id)
        if len(decoded) > DECODED_MAX:
            decoded.popitem(last=False)
        return session

    def _relay_record_now(self, session_id: str) -> Session | None:
        """This process's recent copy of the session record, if it has one."""
        hit = self._relay_records.get(session_id)
        if hit is None:
            return None
        age = time.monotonic() - hit[0]
        if age >= RELAY_RECORD_REFRESH_S:
            if age >= RELAY_RECORD_MAX_AGE_S:
                return None
            if session_id not in self._refreshing:
                self._refreshing.add(session_id)
                # Read after the relay that found it old is on its way, with the others due soon.
                if not self._refresh_due:
                    self._refresh_timer = asyncio.get_running_loop().call_later(
                        RELAY_RECORD_GATHER_S, self._start_refresh
                    )
                self._refresh_due.append(session_id)
        return hit[1]

    def _start_refresh(self) -> None:
        """Read every copy gathered: all in this step, so their reads go to the store together."""
        due, self._refresh_due, self._refresh_timer = self._refresh_due, [], None
        for session_id in due:
            self._spawn(self._refresh_relay_record(session_id))

    async def _refresh_relay_record(self, session_id: str) -> None:
        """Read the copy again while relays go on using it (it is still young enough)."""
        try:
            await self._read_relay_record(session_id)
        except (ProtocolError, StoreUnavailable):
            pass  # the next relay reads it itself, and answers what it finds
        except Exception:
            log.exception("event=internal_error where=relay_record_refresh")
        finally:
            self._refreshing.discard(session_id)

    async def _relay_record(self, session_id: str) -> Session:
        """The session record as relays see it: this process's recent copy, else the store's."""
        session = self._relay_record_now(session_id)
        if session is not None:
            return session
        return await self._read_relay_record(session_id)

    async def _read_relay_record(self, session_id: str) -> Session:
        """The store's record, kept as this process's copy unless a change came meanwhile."""
        now = time.monotonic()
        changes = self._record_changes
        session = await self._load(session_id)
        if changes == self._record_changes:  # no change was made or announced while it was read
            self._relay_records[session_id] = (now, session)
            self._relay_records.move_to_end(session_id)
            if len(self._relay_records) > DECODED_MAX:
                self._relay_records.popitem(last=False)
        return session

    def _record_changed(self, session_id: str) -> None:
        """The session's record changed (here, or announced on the bus): relays read it again."""
        self._record_changes += 1
        self._relay_records.pop(session_id, None)

    async def _load(self, session_id: str) -> Session:
        session = await self.get_session(session_id)
        if session is None:
            raise ProtocolError(ErrorCode.SESSION_ENDED, "This session has ended.")
        return session

    async def _save(self, session: Session) -> None:
        ttl = max(1.0, session.expires - self.clock())
        await self.store.put(session_key(session.id), encode_record(session), ttl)

    async def _mutate(
        self, session_id: str, step: Callable[[Session], Any], missing: Callable[[], ProtocolError] | None = None
    ) -> tuple[Session, Any]:
        """Apply one state-machine step atomically; a refused step writes nothing."""
        out: list[Session] = []
        gone = missing or (lambda: ProtocolError(ErrorCode.SESSION_ENDED, "This session has ended."))

        def mutate(raw: bytes | None) -> tuple[bytes | None, Any]:
            if raw is None:
                raise gone()
            session = decode_record(raw)
            result = step(session)
            new = encode_record(session)
            out.append(session)
            return new, result

        ttl = 1.0
        cached = self._decoded.get(session_id)
        if cached is not None:
            ttl = max(1.0, cached[1].expires - self.clock())
        else:
            current = await self.get_session(session_id)
            if current is None:
                raise gone()
            ttl = max(1.0, current.expires - self.clock())
        self._record_changed(session_id)
        try:
            result = await self.store.update(session_key(session_id), mutate, ttl)
        finally:
            self._record_changed(session_id)
        return out[-1], result

    # ------------------------------------------------------------ helpers

    def _send(self, conn: Connection, message: msgspec.Struct) -> None:
        conn.deliver(encode(message))

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _audit(self, event: str, actor: str | None, session: str | None, outcome: str) -> None:
        if self.audit is not None:
            await self.audit(event, actor, session, outcome)


def _summary_of(seat: sm.Seat | sm.OtherDevice) -> dict[str, Any] | None:
    return None if seat.state in (SeatState.CHECKING, SeatState.INVITED) else seat.checklist


def _other_device_entry(other: sm.OtherDevice | None) -> OtherDeviceEntry | None:
    if other is None:
        return None
    return OtherDeviceEntry(
        device=other.id,
        state=other.state,
        connected=other.conn is not None,
        checklist=_summary_of(other),
        details=other.details,
    )
