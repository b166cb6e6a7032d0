"""The WebSockets this process holds: what is written to each, and what is let in from it.

The connection side of the hub, knowing nothing of sessions: each ``Connection``
writes its messages in order through a bounded queue (a peer that cannot keep up
is closed, nobody else waits), spends a per-connection message budget, and is
closed if it has not joined by the auth deadline. ``Connections`` is the registry
of them, and the first step of every frame: the budget, the strict decoder,
pings, and the hello that opens the protocol; and the heartbeat, which pings a
connection it has not heard from and cuts off one that stays silent.

A close waits for nobody for long: a peer whose close frame cannot be written in time
(it stopped reading) is cut off, so that its seat is freed at once (``close_within``).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from broker.metrics.labels import ThrottleLimit
from broker.signaling.protocol import (
    PROTOCOL_VERSION,
    ClientMessage,
    Error,
    ErrorCode,
    Hello,
    Ping,
    Pong,
    ProtocolError,
    Role,
    Welcome,
    decode_client,
    encode,
)
from broker.signaling.tokens import new_connection_id
from broker.store.base import StoreUnavailable
from broker.store.bus import Envelope

if TYPE_CHECKING:
    from broker.metrics.registry import Metrics

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

#: How long a close may take (the close frame written after what was queued before it, and the
#: peer's answer) before the connection is cut off.
CLOSE_DEADLINE_S = 10.0
#: The same for a peer closed for not reading (4009) or for flooding (4029): its close frame is
#: stuck behind what it did not read, and its seat must not wait for it.
CUT_OFF_DEADLINE_S = 0.5
#: Heartbeat ticks per ``heartbeat_s``: a connection silent for half a heartbeat is pinged at the next
#: tick, and one silent for a whole heartbeat is cut off at the next, so a silent peer is cut off
#: at most ``1 + 1/BEAT_TICKS`` heartbeats after it was last heard (22.5 s at the default 20 s),
#: and a live one has at least ``1/2 - 1/BEAT_TICKS`` of a heartbeat (7.5 s) to answer a ping.
BEAT_TICKS = 8

#: A tick's pings go out this many at a time, ``PING_SPACING_S`` apart: at 17,600 connections a tick
#: pings about 4,400, and a task each, all at once, held the event loop for tens of milliseconds.
PING_SLICE = 256
PING_SPACING_S = 0.025

#: Starts a coroutine that nobody awaits (kept until done, cancelled at shutdown: ``Hub.spawn``).
Spawn = Callable[[Awaitable[Any]], None]


class Transport(Protocol):
    """What the hub needs from a WebSocket."""

    async def send_text(self, data: bytes) -> None:
        """Write ``data`` (UTF-8 JSON) as a text frame, waiting while the socket is paused."""
        ...

    async def close(self, code: int, reason: str) -> None:
        """Write a close frame (after what was sent before it) and wait for the peer's answer."""
        ...

    async def ping(self) -> None:
        """Write a WebSocket ping frame; a socket already gone is no error."""
        ...

    def abort(self) -> None:
        """Cut the connection off at once, dropping whatever was not written."""
        ...


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
    #: The highest ``seq`` the page acknowledged (``ping.ack``): the resume buffer holds none at or below it.
    acked: int = 0
    #: While a replay reads the resume buffer, live relayed messages wait here, so order holds.
    replaying: bool = False
    held: list[Envelope] | None = None
    #: The revision of the session record whose views this connection was last sent (``Envelope.revision``).
    view_revision: int = 0
    #: Joined as a client seat's other device: waits for the therapist, never relayed to.
    other_device: bool = False
    #: The bus was told this process holds the seat's peer (``Bus.hold_peer``).
    holds_peer: bool = False
    #: When a frame (a pong included) last came from the peer, by ``Connections.clock``.
    heard: float = 0.0
    #: Counts the errors sent (broker/metrics); None in tests that make a bare connection.
    metrics: Metrics | None = None

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

    def send(self, message: msgspec.Struct) -> None:
        if type(message) is Error and self.metrics is not None:
            self.metrics.error_reply(message.code)
        self.deliver(encode(message))

    def close_after_queue(self, code: int, last: msgspec.Struct | None = None) -> None:
        """Close once everything already queued (and ``last``, if given) has been written."""
        if type(last) is Error and self.metrics is not None:
            self.metrics.error_reply(last.code)
        self.deliver(encode(last) if last is not None else b"", code)

    def refuse(self, exc: Exception, ref: str | None) -> None:
        """Answer a message that failed with the error it earned (it changed nothing)."""
        if isinstance(exc, ProtocolError):
            self.send(Error(code=exc.code, message=exc.message, ref=ref, retry_after_ms=exc.retry_after_ms))
        elif isinstance(exc, StoreUnavailable):
            self.send(
                Error(
                    code=ErrorCode.UNAVAILABLE,
                    message="The service is briefly unavailable. Try again shortly.",
                    ref=ref,
                ),
            )
        else:  # never let one bad message take the connection down
            log.error("event=internal_error conn=%s", self.id, exc_info=exc)
            self.send(Error(code=ErrorCode.INTERNAL, message="Something went wrong on our side.", ref=ref))

    def _queue(self, data: bytes, close: int | None) -> bool:
        """Let a message wait for the socket; False when the queue is full and the peer was closed."""
        pending = self.pending
        if pending is None:
            pending = self.pending = deque()
        if len(pending) >= self.limits.send_queue_limit:
            self.closed = True
            self.pending = None
            log.info("event=slow_consumer_closed conn=%s", self.id)
            asyncio.get_running_loop().create_task(self.close_within(CLOSE_TOO_SLOW, "too slow", CUT_OFF_DEADLINE_S))
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
                    await self.close_within(close, "", CLOSE_DEADLINE_S)
                    return
        except (ConnectionError, RuntimeError):
            self.closed = True
        finally:
            self.writer = None
            self.pending = None

    async def close_within(self, code: int, reason: str, deadline_s: float) -> None:
        """Close with ``code``, or cut the connection off if that takes longer than ``deadline_s``
        (a peer that does not read never lets the close frame out): what the connection held is
        let go when its socket is gone, and that must not wait for the peer."""
        timer = asyncio.get_running_loop().call_later(deadline_s, self._cut_off, code)
        try:
            await self.transport.close(code, reason)  # returns once the socket is gone, cut off or not
        except (ConnectionError, RuntimeError):
            self.transport.abort()
        finally:
            timer.cancel()

    def _cut_off(self, code: int) -> None:
        log.info("event=connection_cut_off conn=%s code=%d", self.id, code)
        self.transport.abort()


class Connections:
    """Every connection this process holds, by id, from its opening to its closing."""

    def __init__(
        self,
        limits: Limits,
        spawn: Spawn,
        node: str = "",
        clock: Callable[[], float] = time.monotonic,
        metrics: Metrics | None = None,
    ) -> None:
        self.limits = limits
        self._spawn = spawn
        #: The id of this process (``tokens.new_node_id``), in every connection id it gives.
        self.node = node
        self.clock = clock
        self.metrics = metrics
        #: Told of a joined page's ``ping.ack`` (Relays.acknowledge): its resume buffer can shrink.
        self.on_ack: Callable[[Connection, int], None] | None = None
        self.by_id: dict[str, Connection] = {}
        self._beat_timer: asyncio.TimerHandle | None = None

    def __iter__(self) -> Iterator[Connection]:
        """A snapshot: the registry may change while the caller awaits."""
        return iter(list(self.by_id.values()))

    def open(self, transport: Transport) -> Connection:
        conn = Connection(transport, self.limits, id=new_connection_id(self.node), metrics=self.metrics)
        conn.heard = self.clock()
        self.by_id[conn.id] = conn
        conn.deadline = asyncio.get_running_loop().call_later(self.limits.auth_deadline_s, self._auth_deadline, conn)
        return conn

    def _auth_deadline(self, conn: Connection) -> None:
        if not conn.joined and not conn.closed:
            log.info("event=auth_timeout conn=%s", conn.id)
            message = f"Join within {self.limits.auth_deadline_s:g} seconds of connecting."
            conn.close_after_queue(CLOSE_AUTH_TIMEOUT, Error(code=ErrorCode.AUTH_TIMEOUT, message=message))

    def authenticated(self, conn: Connection) -> None:
        """The connection holds a seat: its auth deadline is met."""
        if conn.deadline:
            conn.deadline.cancel()
            conn.deadline = None  # the timer handle is not kept for the connection's whole life

    def forget(self, conn: Connection) -> None:
        """The WebSocket is gone: nothing more is written to it."""
        conn.closed = True
        self.by_id.pop(conn.id, None)
        if conn.deadline:
            conn.deadline.cancel()
        if conn.writer:
            conn.writer.cancel()
        conn.pending = None

    def take(self, conn: Connection, text: str | bytes) -> ClientMessage | None:
        """The frame's message after the rate limit and the decoder; None when it was answered
        (a ping, a refusal) or dropped already."""
        conn.heard = self.clock()
        if conn.closed:
            return None
        if not conn.bucket.take():
            if self.metrics is not None:
                self.metrics.throttle(ThrottleLimit.MESSAGES)
            if conn.bucket.flooding:
                log.info("event=flood_closed conn=%s", conn.id)
                conn.closed = True
                self._spawn(conn.close_within(CLOSE_FLOOD, "flood", CUT_OFF_DEADLINE_S))
            elif conn.bucket.should_warn():
                conn.send(Error(code=ErrorCode.TOO_MANY_REQUESTS, message="Slow down: too many messages."))
            return None
        try:
            message = decode_client(text)
        except ProtocolError as exc:
            conn.refuse(exc, exc.ref)  # the frame's id, when it could be read
            return None
        if type(message) is Ping:  # answered at once, even while this connection's relays are on their way
            conn.send(Pong(n=message.n))
            if message.ack is not None and message.ack > conn.acked and self.on_ack is not None:
                self.on_ack(conn, message.ack)
            return None
        return message

    def greet(self, conn: Connection, message: ClientMessage) -> None:
        """The connection's first message must be a hello in the protocol version spoken here."""
        if not isinstance(message, Hello):
            raise ProtocolError(ErrorCode.HELLO_REQUIRED, "Send hello first.")
        if message.protocol != PROTOCOL_VERSION:
            conn.send(
                Error(
                    code=ErrorCode.UNSUPPORTED_PROTOCOL,
                    message=f"This broker speaks protocol {PROTOCOL_VERSION}.",
                    ref=message.id,
                ),
            )
            conn.close_after_queue(CLOSE_POLICY)
            return
        conn.helloed = True
        conn.send(
            Welcome(
                protocol=PROTOCOL_VERSION,
                heartbeat_s=self.limits.heartbeat_s,
                auth_deadline_s=self.limits.auth_deadline_s,
                max_message_bytes=64 * 1024,
            ),
        )

    async def close_all(self, last: bytes, code: int) -> None:
        """Send every connection ``last`` and close it with ``code``; wait (up to 2 s) for the writes."""
        for conn in self:
            conn.deliver(last, code)
        for _ in range(100):
            if all(c.flushed for c in self.by_id.values()):
                break
            await asyncio.sleep(0.02)

    # ------------------------------------------------------------ heartbeat

    def heard_from(self, conn: Connection) -> None:
        """A frame other than a message came (a ping, a pong): the peer is alive."""
        conn.heard = self.clock()

    def start_heartbeat(self) -> None:
        """Check every connection ``BEAT_TICKS`` times per heartbeat, until ``stop``."""
        self._beat_timer = asyncio.get_running_loop().call_later(self.limits.heartbeat_s / BEAT_TICKS, self._tick)

    def _tick(self) -> None:
        self.start_heartbeat()
        self.beat()

    def beat(self) -> None:
        """Ping every connection not heard from for half a heartbeat; cut off every one not heard
        from for a whole heartbeat (it answered no ping: its seat goes at once).

        One pass over the connections per tick, no timer per connection: idle ones stay small. The
        pings go out ``PING_SLICE`` at a time, the first at once and the rest ``PING_SPACING_S`` apart.
        """
        now = self.clock()
        heartbeat = self.limits.heartbeat_s
        due: list[Connection] = []
        for conn in list(self.by_id.values()):
            silent = now - conn.heard
            if silent >= heartbeat:
                if not conn.closed:
                    log.info("event=heartbeat_timeout conn=%s", conn.id)
                    conn.closed = True
                conn.transport.abort()  # once gone, the socket's handler forgets it (Hub.closed)
            elif silent >= heartbeat / 2 and not conn.closed:
                due.append(conn)
        self._ping(due[:PING_SLICE])
        loop = asyncio.get_running_loop()
        for n, start in enumerate(range(PING_SLICE, len(due), PING_SLICE), start=1):
            loop.call_later(n * PING_SPACING_S, self._ping, due[start : start + PING_SLICE])

    def _ping(self, conns: list[Connection]) -> None:
        for conn in conns:
            if not conn.closed:
                self._spawn(conn.transport.ping())

    def stop(self) -> None:
        if self._beat_timer is not None:
            self._beat_timer.cancel()
            self._beat_timer = None
