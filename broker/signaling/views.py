"""What each peer of a session should see of it now: the waiting room, its own status, its call's peers."""

from __future__ import annotations

from typing import Any

from broker.signaling import session as sm
from broker.signaling.protocol import (
    OtherDeviceEntry,
    PeerInfo,
    Peers,
    SeatState,
    Status,
    WaitingEntry,
    WaitingRoom,
    encode,
)
from broker.signaling.session import Session
from broker.store.bus import Envelope


def views_of(session: Session) -> list[Envelope]:
    """The messages that bring every peer of the session up to date, addressed for the bus, each
    with the record's revision (a view that arrives after a newer one is dropped)."""
    revision = session.revision
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
                            group=s.claimed,
                            held=s.held,
                            checklist=_summary_of(s),
                            details=s.details,
                            other_device=_other_device_entry(s.other),
                            other_device_declined=s.others_barred,
                        )
                        for s in session.clients()
                    ]
                )
            ),
            revision=revision,
        )
    ]
    for seat in session.clients():
        if seat.conn is not None:
            envelopes.append(
                Envelope(
                    seat.id,
                    None,
                    encode(
                        Status(
                            seat_state=seat.state,
                            session_state=session.state,
                            therapist_present=present,
                            held=seat.held,
                        )
                    ),
                    revision=revision,
                )
            )
        other = seat.other
        if other is not None and other.conn is not None:
            status = Status(seat_state=other.state, session_state=session.state, therapist_present=present)
            envelopes.append(Envelope(None, other.conn, encode(status), revision=revision))
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
                group=o.claimed,
                held=o.held,
                device=o.device_id,
            )
            for o in live
            if o.id != seat.id
        ]
        envelopes.append(Envelope(seat.id, None, encode(Peers(peers=peers)), revision=revision))
    return envelopes


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
