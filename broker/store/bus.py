"""The message bus between broker processes, per session.

The hub publishes an ``Envelope`` to a session's channel; every process that
holds a connection of that session receives it and delivers it locally (a bus
may send a relayed message only where its recipient is held: ``hold_peer``). The
in-process ``LocalBus`` (embedded default, single process) and the Redis bus
(``broker.store.redis_bus``) share this interface, so the hub never knows which one
it runs on.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

import msgspec

from broker.store.base import Store

Handler = Callable[["Envelope"], None]
#: Told why a relay started with ``Bus.publish_relayed_soon`` failed (it changed nothing).
Failed = Callable[[BaseException], None]


class Envelope(msgspec.Struct, array_like=True):
    """What travels on the bus: an encoded broker message and who should get it."""

    #: Deliver to the connection holding this seat (peer id) ...
    to_peer: str | None
    #: ... or to this exact connection (a take-over notice), or to every local
    #: connection of the session when both are None.
    to_conn: str | None
    #: The broker message as encoded JSON, sent unchanged.
    data: bytes
    #: Close the receiving connection with this WebSocket code after sending.
    close: int | None = None
    #: For a relayed message: its place in the recipient's resume buffer.
    seq: int | None = None
    #: With ``to_conn``: that connection (a seat's other device, just admitted) now holds its
    #: seat, and relayed messages for the seat go to it.
    takes_seat: bool = False
    #: For a view of the session (waiting room, status, peers): the revision of the record it
    #: shows. Views published by different processes can arrive in any order; one older than
    #: what its connection was last shown is not delivered (broker.signaling.relay).
    revision: int | None = None


_envelope_encoder = msgspec.msgpack.Encoder()
_envelope_decoder = msgspec.msgpack.Decoder(Envelope)


def pack(envelope: Envelope) -> bytes:
    return _envelope_encoder.encode(envelope)


def unpack(raw: bytes) -> Envelope:
    return _envelope_decoder.decode(raw)


_NO_SEQ = b'"seq":null'


def with_seq(data: bytes, seq: int) -> bytes:
    """A relayed message, encoded with ``seq`` null, as encoded with ``seq`` set: no decode, no re-encode.

    The first ``"seq":null`` is the field itself: inside a JSON string every quote is
    escaped, so that text cannot start or end in one.
    """
    head, found, tail = data.partition(_NO_SEQ)
    if not found:
        raise ValueError("not a relayed message without its seq")
    return b'%s"seq":%d%s' % (head, seq, tail)


async def append_then_publish(
    bus: Bus, store: Store, session_id: str, envelope: Envelope, log_key: str, maxlen: int, ttl_s: float
) -> int:
    """The relay step in two calls: append to the recipient's resume buffer, then publish with the seq."""
    seq = await store.append(log_key, envelope.data, maxlen, ttl_s)
    await bus.publish(session_id, Envelope(envelope.to_peer, None, with_seq(envelope.data, seq), seq=seq))
    return seq


class Pending(Protocol):
    """Relays still on their way (``Bus.publish_relayed_soon``); settled in the order they were started."""

    def done(self) -> bool: ...

    async def wait(self) -> None:
        """Until they are settled, taken or failed (a failure goes to each relay's ``Failed``)."""
        ...


class Bus(Protocol):
    async def subscribe(self, session_id: str, handler: Handler) -> None: ...

    async def unsubscribe(self, session_id: str, handler: Handler) -> None: ...

    async def publish(self, session_id: str, envelope: Envelope) -> None: ...

    async def publish_relayed(
        self, session_id: str, envelope: Envelope, store: Store, log_key: str, maxlen: int, ttl_s: float
    ) -> int:
        """Append a relayed message (``data`` encoded with ``seq`` null) to the recipient's resume
        buffer ``log_key`` in ``store``, then publish it stamped with its sequence number; returns it."""
        ...

    def publish_relayed_soon(
        self,
        session_id: str,
        envelope: Envelope,
        store: Store,
        log_key: str,
        maxlen: int,
        ttl_s: float,
        failed: Failed,
    ) -> int | Pending | None:
        """``publish_relayed`` without waiting for it: the seq when it was done within this step;
        while it is on its way, what to wait on for it to be settled (``failed`` is called if it
        fails); or None, with nothing done, when this bus cannot (the caller then awaits
        ``publish_relayed``).

        Relays started this way from one caller keep their order, among themselves and with
        ``publish_relayed``. Nothing is allocated per relay to tell a success: that is the
        common case, and the next message's (P4 in benchmarks/)."""
        ...

    async def hold_peer(self, session_id: str, peer_id: str) -> None:
        """This process holds a connection of the peer (once per connection): relayed messages
        for it must reach this process. Done before the connection reads its resume buffer, so
        that what is relayed afterwards is not missed."""
        ...

    async def release_peer(self, session_id: str, peer_id: str) -> None:
        """A connection that ``hold_peer`` counted is gone."""
        ...

    def add_reconnect_listener(self, listener: Callable[[], Awaitable[None]]) -> None:
        """``listener`` runs after the bus lost and regained its link to other processes."""
        ...

    async def close(self) -> None: ...
