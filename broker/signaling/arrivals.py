"""Arrivals: how many clients wait in each of a therapist's sessions, pushed to their dashboard.

Whenever the hub publishes a session's views it also publishes, on the bus channel of the
session's owner, the session id and how many clients wait in it now (nothing else: no peer id,
no state, no name). The dashboard's ``GET /api/arrivals`` stream (broker.http.arrivals_route)
subscribes that channel, so it hears of a client entering the waiting room at once, whichever
broker process the client's connection and the dashboard reached (the Redis bus carries the
channel between processes like a session's).
"""

from __future__ import annotations

import msgspec

from broker.signaling.protocol import SeatState
from broker.signaling.session import Session
from broker.store.bus import Bus, Envelope

#: The bus channel of a therapist's arrivals has this prefix, then the owner id (the same opaque
#: id the owner index is kept under, broker.store.base.OWNER_PREFIX).
CHANNEL_PREFIX = "arrivals:"


class ArrivalCount(msgspec.Struct):
    """What the dashboard is told about one session: its id and how many clients wait in it."""

    session: str
    waiting: int


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(ArrivalCount)


def arrivals_channel(owner: str) -> str:
    return CHANNEL_PREFIX + owner


def waiting_count(session: Session) -> int:
    """Clients connected and in the waiting room: a seat's holder, and a seat's other device
    asking to come in instead (it waits for the therapist too)."""
    count = 0
    for seat in session.clients():
        if seat.state is SeatState.WAITING and seat.conn is not None:
            count += 1
        other = seat.other
        if other is not None and other.state is SeatState.WAITING and other.conn is not None:
            count += 1
    return count


def encode_count(session: Session) -> bytes:
    return _encoder.encode(ArrivalCount(session.id, waiting_count(session)))


def decode_count(data: bytes) -> ArrivalCount:
    return _decoder.decode(data)


async def publish_count(bus: Bus, owner: str | None, session_id: str, waiting: int) -> None:
    """Tell the owner's dashboards how many clients wait in this session now (0 once it ended)."""
    if owner is not None:
        await bus.publish(
            arrivals_channel(owner), Envelope(None, None, _encoder.encode(ArrivalCount(session_id, waiting)))
        )
