"""What crosses the Redis bus between processes: channel names, and how a message is framed and sealed.

A bus message is this process's random id, then either one sealed envelope, or relayed
envelopes: a mark and the seq Redis gave the first ("r<seq>:"), then their sealed list.
Relayed envelopes are sealed apart from other messages (their own associated data), so
neither passes for the other, and the seq travels outside the seal, as it does in the
resume buffer. The channel and sender are bound into every seal.
"""

from __future__ import annotations

import logging

import msgspec

from broker.store.bus import Envelope, Handler, pack, unpack, with_seq
from broker.store.sealing import Sealer

log = logging.getLogger("broker.bus_redis")

#: Length of a process's random id on the bus, the first bytes of each of its messages.
NODE_ID_BYTES = 8
#: After the node id, relayed messages carry "r<seq>:" (the first one's, assigned by Redis)
#: before their sealed list of envelopes; the rest follow it in order.
RELAYS_MARK = b"r"
#: How brokers before the batched relay sent a relayed message: "s<seq>:" and one sealed envelope.
#: Still read, so that during a rolling upgrade nothing from a process not yet upgraded is lost.
OLD_SEQ_MARK = b"s"

_relays_encoder = msgspec.msgpack.Encoder()
_relays_decoder = msgspec.msgpack.Decoder(list[Envelope])


def channel_of(session_id: str) -> bytes:
    """The session's channel: the same ``{session id}`` hash tag as its keys."""
    return f"b:{{{session_id}}}".encode()


def peer_channel_of(session_id: str, peer_id: str) -> bytes:
    """A peer's own channel, where its relayed messages go: subscribed by the processes holding it."""
    return f"b:{{{session_id}}}:{peer_id}".encode()


def session_of(channel: bytes) -> str | None:
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


def seal_message(sealer: Sealer, channel: bytes, node_id: bytes, envelope: Envelope) -> bytes:
    """One envelope as a bus message on the session's ``channel``."""
    return node_id + sealer.seal(_aad(channel, node_id), pack(envelope))


def seal_relays(sealer: Sealer, channel: bytes, node_id: bytes, first: int, envelopes: list[Envelope]) -> bytes:
    """Relayed envelopes (as the hub made them, seq None) as one bus message, numbered from ``first``.

    Sealed for the session's ``channel`` whichever channel carries them.
    """
    sealed = sealer.seal(_relays_aad(channel, node_id), _relays_encoder.encode(envelopes))
    return b"%s%s%d:%s" % (node_id, RELAYS_MARK, first, sealed)


def open_message(sealer: Sealer, channel: bytes, node_id: bytes, body: bytes) -> list[Envelope]:
    """The envelopes of a message from another process (``channel``: the session's; ``body``: after
    the node id): one, or relayed ones numbered on from the seq Redis gave the first.

    Raises StoreCorrupt or a msgspec or ValueError on anything else."""
    mark = body[:1]
    if mark != RELAYS_MARK and mark != OLD_SEQ_MARK:
        envelope = unpack(sealer.open(_aad(channel, node_id), body))
        if envelope.seq == 0:
            raise ValueError("a relayed message without its seq")
        return [envelope]
    number, sep, body = body[1:].partition(b":")
    if not sep or not number.isdigit() or len(number) > 19:
        raise ValueError("bad seq")
    first = int(number)
    if mark == OLD_SEQ_MARK:  # one envelope, marked relayed by seq 0 inside
        relayed = [unpack(sealer.open(_aad(channel, node_id), body))]
        if relayed[0].seq != 0:
            raise ValueError("a seq on a message that is not relayed")
    else:
        relayed = _relays_decoder.decode(sealer.open(_relays_aad(channel, node_id), body))
        if not relayed or any(e.seq is not None for e in relayed):
            raise ValueError("relayed messages get their seq from the bus message")
    for n, e in enumerate(relayed):  # decoded for this call: stamped in place
        e.to_conn = None
        e.data = with_seq(e.data, first + n)
        e.seq = first + n
    return relayed


def deliver(handlers: list[Handler], envelope: Envelope) -> None:
    """Hand an envelope to each of this process's handlers of its session; one failing stops no other."""
    for handler in list(handlers):
        try:
            handler(envelope)
        except Exception:
            log.exception("event=bus_handler_failed")
