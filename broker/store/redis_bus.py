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
  queued behind the previous command, so it costs a lone message nothing.
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
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import random
import secrets
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from typing import Any, Union

import msgspec
import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from broker.store.base import Store, StoreUnavailable
from broker.store.bus import Envelope, Failed, Handler, append_then_publish, pack, unpack, with_seq
from broker.store.redis_store import (
    NEXT_SEQ_LUA,
    TIMEOUT_S,
    CommandRefused,
    RedisStore,
    Sealer,
    StoreCorrupt,
    is_unavailable,
    keep_entries_lua,
    log_aad,
    ms,
)

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
#: Relays to one resume buffer queued back to back travel as one command, up to this many ...
RELAYS_PER_COMMAND = 32
#: ... and about this many bytes of messages.
RELAY_BYTES_PER_COMMAND = 256 * 1024
#: Resume buffers whose next seq the publisher remembers (the most recently relayed to).
EXPECTED_SEQS_MAX = 4096

_NODE_ID_BYTES = 8
#: After the node id, relayed messages carry "r<seq>:" (the first one's, assigned by Redis)
#: before their sealed list of envelopes; the rest follow it in order.
_RELAYS_MARK = b"r"
#: How brokers before the batched relay sent a relayed message: "s<seq>:" and one sealed envelope.
#: Still read, so that during a rolling upgrade nothing from a process not yet upgraded is lost.
_OLD_SEQ_MARK = b"s"

# Relayed messages for one recipient in one call: append them to its resume buffer (the
# capped "<seq>:<sealed entry>" log of store_redis, numbered on from its last entry) and
# publish them with the first seq the log gave them. The call travels in the publisher's
# pipeline, so the messages keep their place among this process's other messages.
#
# The publisher numbers the entries and the bus message itself, from the seq it expects the
# log to give (what Redis answered for its previous relays to this buffer). When that holds,
# as it does unless another process or the store appended in between, the script checks it
# and passes its arguments on: building strings in Lua was most of the script's cost (P4 in
# benchmarks/, results.md). Otherwise the script numbers them again. What is stored and
# published is the same either way, and the same as before the publisher numbered anything.
# The message goes to the recipient's channel; if no client subscribes it there, to the session's.
# KEYS[1] the log; ARGV: maxlen, ttl ms, the recipient's channel, the session's channel, the
# expected first seq, the bus message (head, "<seq>:", sealed list of envelopes), then one
# "<seq>:<sealed entry>" per message.
_RELAY = (
    NEXT_SEQ_LUA
    + """
local message = ARGV[6]
if first == tonumber(ARGV[5]) then
"""
    + keep_entries_lua("ARGV, 7")
    + """
else
  local entries = {}
  for i = 7, #ARGV do
    local entry = ARGV[i]
    entries[i - 6] = string.format('%d:', first + i - 7) .. string.sub(entry, string.find(entry, ':', 1, true) + 1)
  end
"""
    + keep_entries_lua("entries")
    + """
  local colon = string.find(message, ':', HEAD + 1, true)
  message = string.sub(message, 1, HEAD) .. string.format('%d:', first) .. string.sub(message, colon + 1)
end
if redis.call('SPUBLISH', ARGV[3], message) == 0 and ARGV[3] ~= ARGV[4] then
  redis.call('SPUBLISH', ARGV[4], message)
end
return first
""".replace("HEAD", str(_NODE_ID_BYTES + len(_RELAYS_MARK)))
)


def channel_of(session_id: str) -> bytes:
    """The session's channel: the same ``{session id}`` hash tag as its keys."""
    return f"b:{{{session_id}}}".encode()


def peer_channel_of(session_id: str, peer_id: str) -> bytes:
    """A peer's own channel, where its relayed messages go: subscribed by the processes holding it."""
    return f"b:{{{session_id}}}:{peer_id}".encode()


def _session_of(channel: bytes) -> str | None:
    """The session of a session's channel or of one of its peers' channels."""
    if channel.startswith(b"b:{"):
        close = channel.find(b"}", 3)
        if close > 3 and (close == len(channel) - 1 or channel[close + 1 : close + 2] == b":"):
            return channel[3:close].decode(errors="replace")
    return None


def _aad(channel: bytes, node_id: bytes) -> bytes:
    return b"bus\x00" + channel + b"\x00" + node_id


def _relays_aad(channel: bytes, node_id: bytes) -> bytes:
    """Relayed messages are sealed apart from other messages: neither passes for the other."""
    return b"bus-relays\x00" + channel + b"\x00" + node_id


_relays_encoder = msgspec.msgpack.Encoder()
_relays_decoder = msgspec.msgpack.Decoder(list[Envelope])


def resp_command(*args: bytes | str | int) -> bytes:
    """One Redis command in the wire format (RESP): what redis-py's pack_command makes, at a fraction of its cost."""
    return b"*%d\r\n" % len(args) + _resp_arguments(args)


def _resp_arguments(args: tuple[bytes | str | int, ...]) -> bytes:
    parts = []
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode()
        elif isinstance(arg, int):
            arg = b"%d" % arg
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


#: The unchanging start of every relay command after its argument count: EVALSHA, the script's
#: digest, one key. Redis hashes an EVAL's script on every call; the publisher loads it once per connection.
_RELAY_HEAD = _resp_arguments((b"EVALSHA", hashlib.sha1(_RELAY.encode()).hexdigest(), 1))
_LOAD_RELAY = resp_command(b"SCRIPT", b"LOAD", _RELAY)


class _Relays:
    """Relayed messages for one resume buffer, queued back to back: one script call for them all.

    Settled by the publisher's pipe like a future: with the first message's seq, it delivers the
    messages to this process's own handlers (stamped) and answers the relays that wait for their
    seq (``publish_relayed``); a failure goes to every relay. It is also the hub's ``Pending``
    for these relays: the hub keeps it, not a future per relay.
    """

    __slots__ = (
        "bus",
        "entries",
        "envelopes",
        "log_key",
        "maxlen",
        "settle",
        "session_id",
        "settled",
        "size",
        "ttl_ms",
        "waiters",
    )

    def __init__(self, bus: RedisBus, session_id: str, log_key: str, maxlen: int) -> None:
        self.bus = bus
        self.session_id = session_id
        self.log_key = log_key
        self.maxlen = maxlen
        self.ttl_ms = 0
        self.envelopes: list[Envelope] = []
        self.entries: list[bytes] = []
        #: Per relay: the future of its seq (``publish_relayed``), or whom to tell of a failure.
        self.settle: list[asyncio.Future[int] | Failed] = []
        self.size = 0
        self.settled = False
        self.waiters: list[asyncio.Future[None]] | None = None

    def takes(self, session_id: str, to_peer: str | None, log_key: str, maxlen: int, size: int) -> bool:
        return (
            log_key == self.log_key
            and session_id == self.session_id
            and to_peer == self.envelopes[0].to_peer
            and maxlen == self.maxlen
            and len(self.envelopes) < RELAYS_PER_COMMAND
            and self.size + size <= RELAY_BYTES_PER_COMMAND
        )

    def add(self, envelope: Envelope, entry: bytes, ttl_ms: int, settle: asyncio.Future[int] | Failed) -> None:
        """One more relay, with its sealed resume-buffer entry (the buffer is its recipient's)."""
        self.envelopes.append(envelope)
        self.entries.append(entry)
        self.settle.append(settle)
        self.size += len(envelope.data)
        self.ttl_ms = ttl_ms  # the newest: the session's remaining life, as the last message saw it

    def command(self) -> bytes:
        """The script call, made when the publisher takes it (nothing joins it afterwards)."""
        bus = self.bus
        channel = channel_of(self.session_id)
        # One buffer is one recipient's: the first message names it for them all.
        recipient = self.envelopes[0].to_peer
        to = channel if recipient is None else peer_channel_of(self.session_id, recipient)
        first = bus._expected_seq(self)
        # As the hub made them (seq None): the seal's own associated data marks them relayed. It
        # names the session's channel whichever channel carries them.
        sealed = bus._sealer.seal(_relays_aad(channel, bus.node_id), _relays_encoder.encode(self.envelopes))
        message = b"%s%s%d:%s" % (bus.node_id, _RELAYS_MARK, first, sealed)
        entries = [b"%d:%s" % (first + n, entry) for n, entry in enumerate(self.entries)]
        arguments: tuple[bytes | str | int, ...] = (
            self.log_key,
            self.maxlen,
            self.ttl_ms,
            to,
            channel,
            first,
            message,
            *entries,
        )
        return b"*%d\r\n" % (len(arguments) + 3) + _RELAY_HEAD + _resp_arguments(arguments)

    def command_or_fail(self) -> bytes | None:
        """``command``, or None when making it failed: a bug, so these relays fail (their senders
        are told) and whoever sends commands goes on."""
        try:
            return self.command()
        except Exception as exc:
            log.exception("event=bus_publish_failed")
            self.set_exception(StoreUnavailable(type(exc).__name__))
            return None

    # The pipe settles it as it settles a future; the hub waits on it (``bus.Pending``).

    def done(self) -> bool:
        return self.settled

    async def wait(self) -> None:
        if not self.settled:
            waiter = asyncio.get_running_loop().create_future()
            if self.waiters is None:
                self.waiters = []
            self.waiters.append(waiter)
            await waiter

    def set_result(self, first: Any) -> None:
        self.settled = True
        seq = int(first)
        self.bus._seq_answered(self, seq + len(self.envelopes))
        handlers = self.bus._handlers.get(self.session_id)
        if handlers:
            for n, envelope in enumerate(self.envelopes):  # the hub's, sent already: stamped in place
                envelope.data = with_seq(envelope.data, seq + n)
                envelope.seq = seq + n
                _deliver(handlers, envelope)
        for n, settle in enumerate(self.settle):
            if isinstance(settle, asyncio.Future) and not settle.done():
                settle.set_result(seq + n)
        self._release()

    def set_exception(self, error: BaseException) -> None:
        self.settled = True  # whoever sent them answers the failure
        for settle in self.settle:
            if not isinstance(settle, asyncio.Future):
                try:
                    settle(error)
                except Exception:
                    log.exception("event=bus_relay_failure_unreported")
            elif not settle.done():
                settle.set_exception(error)
        self._release()

    def _release(self) -> None:
        """Wake whoever waits, and let go of the messages (the hub may keep this a while)."""
        self.envelopes, self.entries, self.settle = [], [], []
        waiters, self.waiters = self.waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)


#: What a reply from Redis settles: a command's future, or relays.
_Settles = Union["asyncio.Future[Any]", _Relays]  # noqa: UP007 - a runtime alias, before 3.12's "type"
#: What waits in the publisher's queue: a command with the future of its reply, or relays.
_Outgoing = Union[tuple[bytes, "asyncio.Future[Any]"], _Relays]  # noqa: UP007


class RedisBus:
    """The Bus interface over Redis sharded pub/sub."""

    def __init__(self, client: aioredis.Redis, sealer: Sealer, *, keepalive_s: float = KEEPALIVE_S) -> None:
        self.redis = client
        self._sealer = sealer
        self.keepalive_s = keepalive_s
        #: This process's random id on the bus; its own messages come back and are skipped.
        self.node_id = secrets.token_bytes(_NODE_ID_BYTES)
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
        #: The publisher's connection (see ``_Pipe``), opened by the first command.
        self._pipe: _Pipe | None = None
        #: Per resume buffer relayed to lately: the seq Redis should give its next relay (0: not
        #: known), and the relays last sent to it (their answer sets it; None once answered).
        self._expected: OrderedDict[str, list[Any]] = OrderedDict()
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
        payload = self.node_id + self._sealer.seal(_aad(channel, self.node_id), pack(envelope))
        await self._send(resp_command(b"SPUBLISH", channel, payload))

    async def publish_relayed(
        self, session_id: str, envelope: Envelope, store: Store, log_key: str, maxlen: int, ttl_s: float
    ) -> int:
        """Append and publish in one script call (with the relays queued right before it for
        the same buffer, see ``_Relays``).

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
    ) -> _Relays | None:
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
    ) -> _Relays | None:
        if not isinstance(store, RedisStore) or store.redis is not self.redis:
            return None
        if maxlen < 1:
            raise ValueError("maxlen must be at least 1")
        if self._closed:
            raise StoreUnavailable("closed")
        entry = self._sealer.seal(log_aad(log_key), envelope.data)
        outbox = self._outbox
        relays = outbox[-1] if outbox else None
        if type(relays) is _Relays and relays.takes(session_id, envelope.to_peer, log_key, maxlen, len(envelope.data)):
            relays.add(envelope, entry, ms(ttl_s), settle)
            return relays
        relays = _Relays(self, session_id, log_key, maxlen)
        relays.add(envelope, entry, ms(ttl_s), settle)
        self._queue(relays)
        return relays

    def _expected_seq(self, relays: _Relays) -> int:
        """The seq Redis should give the first of these relays, which are being sent now (0: not known)."""
        expected = self._expected
        known = expected.get(relays.log_key)
        if known is None:
            known = expected[relays.log_key] = [0, relays]
            if len(expected) > EXPECTED_SEQS_MAX:
                expected.popitem(last=False)
        else:
            expected.move_to_end(relays.log_key)
        first: int = known[0]
        known[0] = first + len(relays.envelopes) if first else 0
        known[1] = relays
        return first

    def _seq_answered(self, relays: _Relays, next_seq: int) -> None:
        """Redis numbered these relays: unless more were sent to that buffer since, the next follow them."""
        known = self._expected.get(relays.log_key)
        if known is not None and known[1] is relays:
            known[0] = next_seq
            known[1] = None

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
            done = outgoing if isinstance(outgoing, _Relays) else outgoing[1]
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
        session_id = _session_of(channel)
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
        node_id = payload[:_NODE_ID_BYTES]
        if node_id == self.node_id:
            return  # delivered locally when it was published
        session_id = _session_of(channel)
        handlers = self._handlers.get(session_id or "")
        if not handlers:
            return
        if channel[-1:] != b"}":  # a peer's channel: sealed for the session's
            channel = channel_of(session_id or "")
        try:
            envelopes = self._open(channel, node_id, payload[_NODE_ID_BYTES:])
        except (StoreCorrupt, msgspec.DecodeError, msgspec.ValidationError, ValueError):
            log.warning("event=bus_message_rejected")
            return
        for envelope in envelopes:
            _deliver(handlers, envelope)

    def _open(self, channel: bytes, node_id: bytes, body: bytes) -> list[Envelope]:
        """The envelopes of a message from another process (``channel``: the session's): one, or
        relayed ones numbered on from the seq Redis gave the first."""
        mark = body[:1]
        if mark != _RELAYS_MARK and mark != _OLD_SEQ_MARK:
            envelope = unpack(self._sealer.open(_aad(channel, node_id), body))
            if envelope.seq == 0:
                raise ValueError("a relayed message without its seq")
            return [envelope]
        number, sep, body = body[1:].partition(b":")
        if not sep or not number.isdigit() or len(number) > 19:
            raise ValueError("bad seq")
        first = int(number)
        if mark == _OLD_SEQ_MARK:  # one envelope, marked relayed by seq 0 inside
            relayed = [unpack(self._sealer.open(_aad(channel, node_id), body))]
            if relayed[0].seq != 0:
                raise ValueError("a seq on a message that is not relayed")
        else:
            relayed = _relays_decoder.decode(self._sealer.open(_relays_aad(channel, node_id), body))
            if not relayed or any(e.seq is not None for e in relayed):
                raise ValueError("relayed messages get their seq from the bus message")
        for n, e in enumerate(relayed):  # decoded for this call: stamped in place
            e.to_conn = None
            e.data = with_seq(e.data, first + n)
            e.seq = first + n
        return relayed

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
            batch: list[tuple[bytes, _Settles]] = []
            while outbox and len(batch) < BATCH:
                outgoing = outbox.popleft()
                if not isinstance(outgoing, _Relays):
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
                _fail(batch, StoreUnavailable("closed"))
                raise
            except Exception as exc:
                if not isinstance(exc, StoreUnavailable) and not is_unavailable(exc):
                    log.exception("event=bus_publish_failed")  # not Redis being away: a bug
                _fail(batch, StoreUnavailable(type(exc).__name__))

    async def _open_pipe(self) -> _Pipe:
        self._pipe = None
        conn = self.redis.connection_pool.make_connection()
        try:
            await conn.connect()
            # Before any relay on this connection: a restarted or flushed Redis has no scripts.
            await conn.send_packed_command(_LOAD_RELAY, check_health=False)
            async with asyncio.timeout(TIMEOUT_S):
                await conn.read_response()
        except BaseException:
            with contextlib.suppress(Exception):
                await conn.disconnect(nowait=True)
            raise
        pipe = self._pipe = _Pipe(conn)
        task = asyncio.get_running_loop().create_task(pipe.read_replies(), name="bus-publisher-replies")
        pipe.reader = task
        self._spawned.add(task)
        task.add_done_callback(self._spawned.discard)
        return pipe


def _fail(batch: list[tuple[bytes, _Settles]], error: BaseException) -> None:
    for _, done in batch:
        if not done.done():
            done.set_exception(error)


def _deliver(handlers: list[Handler], envelope: Envelope) -> None:
    for handler in list(handlers):
        try:
            handler(envelope)
        except Exception:
            log.exception("event=bus_handler_failed")


class _Pipe:
    """The publisher's own connection: commands written as they come, replies matched in order.

    A reply that does not come within ``TIMEOUT_S`` of its command, or a broken connection,
    fails every command still waiting (StoreUnavailable) and retires the pipe; the next
    command opens a new one. One timer watches the oldest command waiting (not one per
    reply): when it is overdue, the reader is cancelled.
    """

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.loop = asyncio.get_running_loop()
        #: Futures of the commands written and not answered yet, oldest first, with when each was written.
        self.waiting: deque[tuple[float, _Settles]] = deque()
        self.broken = False
        #: The task reading replies (``read_replies``), set by whoever starts it.
        self.reader: asyncio.Task[None] | None = None
        #: Armed while commands wait: when the oldest of them would be overdue.
        self._watch: asyncio.TimerHandle | None = None
        self._overdue = False

    async def send(self, batch: list[tuple[bytes, _Settles]]) -> None:
        if self.broken or not self.conn.is_connected:  # never let redis-py connect it again under us
            self.broken = True
            raise StoreUnavailable("the publisher's connection is gone")
        now = self.loop.time()
        if self._watch is None:
            self._watch = self.loop.call_at(now + TIMEOUT_S, self._check_overdue)
        self.waiting.extend((now, done) for _, done in batch)  # before writing: replies can come at once
        try:
            await self.conn.send_packed_command([command for command, _ in batch], check_health=False)
        except BaseException:
            self.broken = True  # redis-py has closed it; the reader fails what waits
            raise

    def _check_overdue(self) -> None:
        self._watch = None
        if not self.waiting:
            return
        due = self.waiting[0][0] + TIMEOUT_S
        if due > self.loop.time():
            self._watch = self.loop.call_at(due, self._check_overdue)
        elif self.reader is not None and not self.reader.done():
            self._overdue = True
            self.broken = True
            self.reader.cancel()

    async def read_replies(self) -> None:
        error: BaseException = StoreUnavailable("the publisher's connection was closed")
        try:
            while True:
                try:
                    reply: Any = await self.conn.read_response(timeout=math.inf)
                except redis_errors.ResponseError as exc:  # an error reply fails its own command only
                    reply = refusal(exc)
                    log.warning("event=bus_command_refused reply=%s", reply.code)
                    if reply.code == "NOSCRIPT":
                        self.broken = True  # the script cache was flushed: the next pipe loads it again
                _, done = self.waiting.popleft()
                if not done.done():
                    if isinstance(reply, CommandRefused):
                        done.set_exception(reply)
                    else:
                        done.set_result(reply)
                if self.broken and not self.waiting:
                    return  # retired, and every command it carried has its answer
        except IndexError:
            error = StoreUnavailable("a reply nobody waited for")
        except redis_errors.ConnectionError:
            pass  # closed by Redis or by us: the error above
        except asyncio.CancelledError:
            error = StoreUnavailable("TimeoutError" if self._overdue else "closed")
            if not self._overdue:
                raise
        except Exception as exc:
            error = StoreUnavailable(type(exc).__name__)
        finally:
            self.broken = True
            if self._watch is not None:
                self._watch.cancel()
                self._watch = None
            waiting, self.waiting = self.waiting, deque()
            for _, done in waiting:
                if not done.done():
                    done.set_exception(error)
            with contextlib.suppress(Exception):
                await self.conn.disconnect(nowait=True)


#: Redis's error codes of the replies redis-py raises as their own classes (it drops the code from
#: the message of these); any other error reply keeps its code as the message's first word.
_ERROR_CODES: tuple[tuple[type[Exception], str], ...] = (
    (redis_errors.NoScriptError, "NOSCRIPT"),
    (redis_errors.ReadOnlyError, "READONLY"),
    (redis_errors.OutOfMemoryError, "OOM"),
    (redis_errors.BusyLoadingError, "LOADING"),
    (redis_errors.NoPermissionError, "NOPERM"),
)


def refusal(error: redis_errors.ResponseError) -> CommandRefused:
    """A pipelined command's error reply as ``CommandRefused``, with Redis's code."""
    for kind, code in _ERROR_CODES:
        if isinstance(error, kind):
            return CommandRefused(f"{code} {error}")
    return CommandRefused(str(error))
