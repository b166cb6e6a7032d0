"""The Redis bus: a session's messages reach every broker process holding one of its peers.

One sharded pub/sub channel per session (``SSUBSCRIBE``/``SPUBLISH``, Redis 7),
named with the session's hash tag so it lives on the same shard as the
session's keys. Per process:

- ``publish`` first delivers to this process's own handlers, synchronously and
  in call order (no Redis round trip for peers on the same process), then hands
  the message to one publisher task that sends everything in call order on one
  connection, so other processes see this process's messages in the same order.
  A message is sealed (AES-GCM, bound to its channel and sender) and tagged with
  this process's random id; the listener skips its own.
- Relayed messages for one resume buffer that are queued back to back (a peer's
  burst of ICE candidates, read from its socket together) go to Redis as one
  script call and cross to the other processes as one sealed bus message. The
  publisher never waits to fill such a batch: it only joins what is already
  queued behind the previous command, so it costs a lone message nothing
  (``redis_relays``).
- Relayed messages go to their recipient's own channel (the session's hash
  tag and the peer id), which only the processes holding that peer subscribe
  (``hold_peer``): the sender's process, subscribed to the session's channel,
  does not get its own relays back from Redis. When nobody subscribes the
  recipient's channel (the peer is away, or held by a broker from before this
  change during a rolling upgrade) the script publishes to the session's
  channel instead, as before.
- One pub/sub connection with a listener task. A channel is subscribed when its
  first local handler (or holder) arrives, waiting for Redis to confirm, so
  nothing published afterwards is missed, and unsubscribed when the last one goes.
- When the connection breaks (Redis restarted, failed over, or went silent:
  a PING every few seconds must be answered), the listener reconnects with
  backoff and subscribes every channel again. No broker restart is needed.
  Messages published while Redis was away are not replayed by the bus; the
  hub's resume buffer covers relayed signaling.
- Both connections are redis-py's own, used through its public connection API
  (``send_packed_command``, ``read_response``): no reader or writer of ours under
  it (docs/security.md 3.6).

This module is the bus itself: subscriptions, delivery, the listener (confirmations,
keepalive, reconnection) and the publisher's queue. What a bus message looks like is in
``redis_bus_messages``, the relay batches and their script in ``redis_relays``, the
publisher's pipelined connection in ``redis_pipe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import secrets
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Union

import msgspec
import redis.asyncio as aioredis

from broker.store.base import Store, StoreUnavailable
from broker.store.bus import Envelope, Failed, Handler, append_then_publish
from broker.store.redis_bus_messages import (
    NODE_ID_BYTES,
    channel_of,
    deliver,
    open_message,
    peer_channel_of,
    seal_message,
    session_of,
)
from broker.store.redis_pipe import Pipe, Settles, fail_all, resp_command
from broker.store.redis_relays import LOAD_RELAY, RelayOrigin, Relays, RelaySeqs
from broker.store.redis_store import (
    TIMEOUT_S,
    RedisStore,
    is_unavailable,
    log_aad,
    ms,
)
from broker.store.sealing import Sealer, StoreCorrupt

log = logging.getLogger("broker.bus_redis")

#: How long subscribe() waits for Redis to confirm a new subscription.
CONFIRM_S = 1.0
#: PING interval on the pub/sub connection; three intervals without any reply mean it is dead.
KEEPALIVE_S = 5.0
#: Reconnect backoff: first delay and cap, in seconds (with jitter).
BACKOFF_FIRST_S = 0.05
BACKOFF_CAP_S = 1.0
#: Messages sent to Redis in one pipelined write.
BATCH = 512

#: What waits in the publisher's queue: a command with the future of its reply, or relays.
_Outgoing = Union[tuple[bytes, "asyncio.Future[Any]"], Relays]  # noqa: UP007 - a runtime alias, before 3.12's "type"


class RedisBus:
    """The Bus interface over Redis sharded pub/sub."""

    def __init__(self, client: aioredis.Redis, sealer: Sealer, *, keepalive_s: float = KEEPALIVE_S) -> None:
        self.redis = client
        self._sealer = sealer
        self.keepalive_s = keepalive_s
        #: This process's random id on the bus; its own messages come back and are skipped.
        self.node_id = secrets.token_bytes(NODE_ID_BYTES)
        self._handlers: dict[str, list[Handler]] = {}
        #: Peers' own channels (``peer_channel_of``) with how many local holders each.
        self._held: dict[bytes, int] = {}
        self._conn: Any = None  # the pub/sub connection while it is up
        self._send_lock = asyncio.Lock()
        self._confirmations: dict[bytes, list[asyncio.Future[None]]] = {}
        #: Commands for Redis, in publish order, each with the future its publisher waits on.
        self._outbox: deque[_Outgoing] = deque()
        #: The publisher's wait for the outbox to fill, while it is empty.
        self._outbox_filled: asyncio.Future[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._spawned: set[asyncio.Task[None]] = set()
        #: The publisher's connection (see ``redis_pipe.Pipe``), opened by the first command.
        self._pipe: Pipe | None = None
        #: The seq Redis should give the next relay to each resume buffer relayed to lately.
        self._relay_seqs = RelaySeqs()
        #: What the publisher's relays need of this bus.
        self._relay_origin = RelayOrigin(self.node_id, sealer, self._handlers, self._relay_seqs)
        self._closed = False
        self._last_rx = 0.0
        #: Set while the pub/sub connection is up and Redis confirmed every channel subscribed again.
        self.connected = asyncio.Event()
        self._resubscribing: set[bytes] = set()
        #: How many times the pub/sub connection was re-established (for tests and metrics).
        self.reconnects = 0
        self._reconnect_listeners: list[Callable[[], Awaitable[None]]] = []

    def add_reconnect_listener(self, listener: Callable[[], Awaitable[None]]) -> None:
        """Called after a lost pub/sub connection is back and every channel is subscribed again.

        Messages published by other processes in between were missed; the hub resends them from
        its resume buffers.
        """
        self._reconnect_listeners.append(listener)

    async def _after_reconnect(self) -> None:
        await self.connected.wait()
        for listener in self._reconnect_listeners:
            try:
                await listener()
            except Exception:
                log.exception("event=bus_reconnect_listener_failed")

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._listen(), name="bus-listener"),
            self._start_publisher(),
            loop.create_task(self._keepalive(), name="bus-keepalive"),
        ]

    def _start_publisher(self) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(self._publish_loop(), name="bus-publisher")
        task.add_done_callback(self._publisher_ended)
        return task

    def _publisher_ended(self, task: asyncio.Task[None]) -> None:
        """The publisher only ends when the bus closes: otherwise every publish from now on
        would wait forever, so a new one takes over (and a bug is logged)."""
        if self._closed or task not in self._tasks:
            return
        error = None if task.cancelled() else task.exception()
        log.error("event=bus_publisher_restarted error=%s", type(error).__name__ if error else "CancelledError")
        self._tasks[self._tasks.index(task)] = self._start_publisher()

    # ------------------------------------------------------------ the Bus interface

    async def subscribe(self, session_id: str, handler: Handler) -> None:
        """Never fails for want of Redis: the channel is (re)subscribed as soon as Redis answers."""
        handlers = self._handlers.setdefault(session_id, [])
        handlers.append(handler)
        if len(handlers) == 1:
            await self._subscribe_remote(channel_of(session_id))

    async def unsubscribe(self, session_id: str, handler: Handler) -> None:
        handlers = self._handlers.get(session_id)
        if not handlers or handler not in handlers:
            return
        handlers.remove(handler)
        if handlers:
            return
        del self._handlers[session_id]
        await self._unsubscribe_remote(channel_of(session_id))

    async def hold_peer(self, session_id: str, peer_id: str) -> None:
        """This process holds a connection of that peer: its relayed messages come here from now on
        (once Redis confirms; never fails for want of Redis, as ``subscribe``)."""
        channel = peer_channel_of(session_id, peer_id)
        holders = self._held.get(channel, 0)
        self._held[channel] = holders + 1
        if not holders:
            await self._subscribe_remote(channel)

    async def release_peer(self, session_id: str, peer_id: str) -> None:
        """One ``hold_peer`` less; the peer's channel is unsubscribed with the last."""
        channel = peer_channel_of(session_id, peer_id)
        holders = self._held.get(channel, 0)
        if holders > 1:
            self._held[channel] = holders - 1
        elif holders:
            del self._held[channel]
            await self._unsubscribe_remote(channel)

    async def publish(self, session_id: str, envelope: Envelope) -> None:
        """Deliver locally now, then to the other processes; StoreUnavailable if Redis cannot take it."""
        for handler in list(self._handlers.get(session_id, ())):
            handler(envelope)
        if self._closed:
            raise StoreUnavailable("closed")
        channel = channel_of(session_id)
        payload = seal_message(self._sealer, channel, self.node_id, envelope)
        await self._send(resp_command(b"SPUBLISH", channel, payload))

    async def publish_relayed(
        self, session_id: str, envelope: Envelope, store: Store, log_key: str, maxlen: int, ttl_s: float
    ) -> int:
        """Append and publish in one script call (with the relays queued right before it for
        the same buffer, see ``redis_relays.Relays``).

        The seq is assigned by Redis and travels outside the sealed envelopes, as it does in
        the resume buffer; relayed envelopes are sealed apart from other messages.
        """
        seq: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        if self._relay_soon(session_id, envelope, store, log_key, maxlen, ttl_s, seq) is None:
            return await append_then_publish(self, store, session_id, envelope, log_key, maxlen, ttl_s)
        return await seq

    def publish_relayed_soon(
        self,
        session_id: str,
        envelope: Envelope,
        store: Store,
        log_key: str,
        maxlen: int,
        ttl_s: float,
        failed: Failed,
    ) -> Relays | None:
        """The relay queued for the publisher, in the command that carries it (done when Redis has
        run it); ``failed`` is told if Redis refuses it or cannot be reached.

        Local handlers get the message when it is done, stamped with the seq Redis gave it.
        """
        return self._relay_soon(session_id, envelope, store, log_key, maxlen, ttl_s, failed)

    def _relay_soon(
        self,
        session_id: str,
        envelope: Envelope,
        store: Store,
        log_key: str,
        maxlen: int,
        ttl_s: float,
        settle: asyncio.Future[int] | Failed,
    ) -> Relays | None:
        if not isinstance(store, RedisStore) or store.redis is not self.redis:
            return None
        if maxlen < 1:
            raise ValueError("maxlen must be at least 1")
        if self._closed:
            raise StoreUnavailable("closed")
        entry = self._sealer.seal(log_aad(log_key), envelope.data)
        outbox = self._outbox
        relays = outbox[-1] if outbox else None
        if type(relays) is Relays and relays.takes(session_id, envelope.to_peer, log_key, maxlen, len(envelope.data)):
            relays.add(envelope, entry, ms(ttl_s), settle)
            return relays
        relays = Relays(self._relay_origin, session_id, log_key, maxlen)
        relays.add(envelope, entry, ms(ttl_s), settle)
        self._queue(relays)
        return relays

    @property
    def closed(self) -> bool:
        return self._closed

    async def call(self, *args: bytes | str | int) -> Any:
        """One Redis command on the publisher's pipelined connection, after what this process
        published before it; its reply (``CommandRefused`` for an error reply). The store reads
        through here (``RedisStore.read_through``)."""
        if self._closed:
            raise StoreUnavailable("closed")
        return await self._send(resp_command(*args))

    async def _send(self, command: bytes) -> Any:
        """Queue a command (``resp_command``) for the publisher; its reply once Redis has run it."""
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue((command, done))
        return await done

    def _queue(self, outgoing: _Outgoing) -> None:
        self._outbox.append(outgoing)
        filled, self._outbox_filled = self._outbox_filled, None
        if filled is not None and not filled.done():
            filled.set_result(None)

    async def close(self) -> None:
        self._closed = True
        for task in [*self._tasks, *self._spawned]:
            task.cancel()
        for task in [*self._tasks, *self._spawned]:
            with contextlib.suppress(BaseException):
                await task
        self._tasks = []
        self._spawned.clear()
        await self._drop_connection()
        while self._outbox:
            outgoing = self._outbox.popleft()
            done = outgoing if isinstance(outgoing, Relays) else outgoing[1]
            if not done.done():
                done.set_exception(StoreUnavailable("closed"))
        self._handlers.clear()
        self._held.clear()

    def channels(self) -> int:
        """Sessions with at least one local handler."""
        return len(self._handlers)

    # ------------------------------------------------------------ subscribing

    def _wanted(self, channel: bytes) -> bool:
        """Whether a local handler (a session's channel) or holder (a peer's) wants the channel."""
        if channel in self._held:
            return True
        session_id = session_of(channel)
        return session_id is not None and session_id in self._handlers and channel == channel_of(session_id)

    async def _unsubscribe_remote(self, channel: bytes) -> None:
        async with self._send_lock:
            conn = self._conn
            if conn is None or self._wanted(channel):
                return
            with contextlib.suppress(Exception):
                await conn.send_command("SUNSUBSCRIBE", channel, check_health=False)

    async def _subscribe_remote(self, channel: bytes) -> None:
        confirmed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiting = self._confirmations.setdefault(channel, [])
        waiting.append(confirmed)
        try:
            async with self._send_lock:
                conn = self._conn
                if conn is None or not self._wanted(channel):
                    return  # the listener subscribes every channel when it (re)connects
                await conn.send_command("SSUBSCRIBE", channel, check_health=False)
            await asyncio.wait_for(asyncio.shield(confirmed), CONFIRM_S)
        except Exception as exc:  # a broken connection: the listener reconnects and subscribes again
            log.info("event=bus_subscribe_deferred error=%s", type(exc).__name__)
        finally:
            waiting.remove(confirmed)
            if not waiting:
                self._confirmations.pop(channel, None)

    # ------------------------------------------------------------ the listener

    async def _listen(self) -> None:
        delay = BACKOFF_FIRST_S
        first = True
        while True:
            conn = None
            try:
                conn = self.redis.connection_pool.make_connection()
                await conn.connect()
                await self._resubscribe(conn)
                if not first:
                    self.reconnects += 1
                    log.info("event=bus_reconnected channels=%d", len(self._handlers))
                    task = asyncio.get_running_loop().create_task(self._after_reconnect())
                    self._spawned.add(task)
                    task.add_done_callback(self._spawned.discard)
                first = False
                delay = BACKOFF_FIRST_S
                await self._read(conn)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.connected.is_set() or first:
                    log.warning("event=bus_disconnected error=%s", type(exc).__name__)
            finally:
                self.connected.clear()
                self._resubscribing = set()
                if self._conn is conn:
                    self._conn = None
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.disconnect(nowait=True)
            await asyncio.sleep(delay * (1 + random.random() / 2))
            delay = min(delay * 2, BACKOFF_CAP_S)

    async def _resubscribe(self, conn: Any) -> None:
        """Subscribe every channel with a local handler, then make the connection the live one.

        ``connected`` is set once Redis has confirmed them all (the listener reads the confirmations).
        """
        async with self._send_lock:
            channels = [channel_of(s) for s in self._handlers]
            channels.extend(self._held)
            self._resubscribing = set(channels)
            if channels:
                await conn.send_packed_command(
                    conn.pack_commands([("SSUBSCRIBE", c) for c in channels]), check_health=False
                )
            self._conn = conn
            self._last_rx = asyncio.get_running_loop().time()
        if not channels:
            self.connected.set()

    async def _read(self, conn: Any) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # math.inf: wait for as long as it takes; the keepalive task detects a dead link.
            # push_request: with RESP3, messages and confirmations arrive as push frames.
            # An error reply raises: the listener reconnects.
            response = await conn.read_response(timeout=math.inf, push_request=True)
            self._last_rx = loop.time()
            self._on_response(response)

    def _on_response(self, response: Any) -> None:
        if not isinstance(response, list) or len(response) < 2:
            return
        kind = response[0]
        if kind == b"smessage" and len(response) == 3:
            self._deliver_remote(response[1], response[2])
        elif kind == b"ssubscribe":
            for confirmed in self._confirmations.get(response[1], ()):
                if not confirmed.done():
                    confirmed.set_result(None)
            if self._resubscribing:
                self._resubscribing.discard(response[1])
                if not self._resubscribing:
                    self.connected.set()
        elif kind == b"sunsubscribe" and self._wanted(response[1]):
            # Dropped by the server (or a subscribe raced an unsubscribe): subscribe again.
            task = asyncio.get_running_loop().create_task(self._subscribe_remote(response[1]))
            self._spawned.add(task)
            task.add_done_callback(self._spawned.discard)

    def _deliver_remote(self, channel: bytes, payload: bytes) -> None:
        node_id = payload[:NODE_ID_BYTES]
        if node_id == self.node_id:
            return  # delivered locally when it was published
        session_id = session_of(channel)
        handlers = self._handlers.get(session_id or "")
        if not handlers:
            return
        if channel[-1:] != b"}":  # a peer's channel: sealed for the session's
            channel = channel_of(session_id or "")
        try:
            envelopes = open_message(self._sealer, channel, node_id, payload[NODE_ID_BYTES:])
        except (StoreCorrupt, msgspec.DecodeError, msgspec.ValidationError, ValueError):
            log.warning("event=bus_message_rejected")
            return
        for envelope in envelopes:
            deliver(handlers, envelope)

    async def _keepalive(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.keepalive_s)
            conn = self._conn
            if conn is None:
                continue
            if loop.time() - self._last_rx > 3 * self.keepalive_s:
                log.warning("event=bus_connection_silent")
                self._conn = None
                with contextlib.suppress(Exception):
                    await conn.disconnect(nowait=True)  # the listener's read fails and it reconnects
                continue
            async with self._send_lock:
                if self._conn is conn:
                    with contextlib.suppress(Exception):
                        await conn.send_command("PING", check_health=False)

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.disconnect(nowait=True)

    # ------------------------------------------------------------ the publisher

    async def _publish_loop(self) -> None:
        """Write queued commands on one connection as they come, never waiting for replies in
        between (pipelining): Redis runs them in this process's publish order, and the pipe's
        reader settles each command's future as its reply arrives."""
        outbox = self._outbox
        loop = asyncio.get_running_loop()
        while True:
            while not outbox:
                self._outbox_filled = loop.create_future()
                await self._outbox_filled
            batch: list[tuple[bytes, Settles]] = []
            while outbox and len(batch) < BATCH:
                outgoing = outbox.popleft()
                if not isinstance(outgoing, Relays):
                    batch.append(outgoing)
                    continue
                command = outgoing.command_or_fail()
                if command is not None:
                    batch.append((command, outgoing))
            if not batch:
                continue
            try:
                pipe = self._pipe if self._pipe is not None and not self._pipe.broken else await self._open_pipe()
                await pipe.send(batch)
            except asyncio.CancelledError:  # closing, or a stray one: then a new publisher takes over
                fail_all(batch, StoreUnavailable("closed"))
                raise
            except Exception as exc:
                if not isinstance(exc, StoreUnavailable) and not is_unavailable(exc):
                    log.exception("event=bus_publish_failed")  # not Redis being away: a bug
                fail_all(batch, StoreUnavailable(type(exc).__name__))

    async def _open_pipe(self) -> Pipe:
        self._pipe = None
        conn = self.redis.connection_pool.make_connection()
        try:
            await conn.connect()
            # Before any relay on this connection: a restarted or flushed Redis has no scripts.
            await conn.send_packed_command(LOAD_RELAY, check_health=False)
            async with asyncio.timeout(TIMEOUT_S):
                await conn.read_response()
        except BaseException:
            with contextlib.suppress(Exception):
                await conn.disconnect(nowait=True)
            raise
        pipe = self._pipe = Pipe(conn)
        task = asyncio.get_running_loop().create_task(pipe.read_replies(), name="bus-publisher-replies")
        pipe.reader = task
        self._spawned.add(task)
        task.add_done_callback(self._spawned.discard)
        return pipe
