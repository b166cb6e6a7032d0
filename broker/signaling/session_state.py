"""The record the broker keeps of one session: its window, its state and its seats.

What the store holds (sealed) and what every step of the state machine in session.py
changes; kept apart from those steps so each file stays readable. session.py re-exports
these names.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from broker.signaling.protocol import ErrorCode, ProtocolError, Role, SeatState, SessionState

#: What kind of session it is, as the therapist chose when scheduling (never who is in it).
SessionKind = Literal["individual", "couple", "family", "group"]
#: How the session's media flows: peer to peer, or through the practice's Janus (broker/janus/scheduling.py).
SessionMedia = Literal["mesh", "janus"]
SESSION_KINDS: tuple[str, ...] = ("individual", "couple", "family", "group")


class OtherDevice(msgspec.Struct, kw_only=True):
    """A device that opened a client seat's link without the seat's resume secret.

    It is never admitted as itself and never relayed to: it goes through the checklist
    and the waiting room, and the seat moves to it only when the therapist admits it.
    """

    #: Opaque id naming it in ``admit``/``decline``, so the therapist acts on the device they saw.
    id: str
    #: Digest of the resume secret it was given (tokens.resume_digest).
    device: str
    state: SeatState = SeatState.CHECKING
    conn: str | None = None
    checklist: dict[str, Any] | None = None
    details: str | None = None
    preflight: dict[str, Any] | None = None


class Seat(msgspec.Struct, kw_only=True):
    """One place in a session. ``id`` is the peer id the seat's holder signals as."""

    id: str
    role: Role
    token_id: str | None
    state: SeatState = SeatState.INVITED
    minor: bool = False
    #: Opaque id of the live connection holding this seat, if any.
    conn: str | None = None
    #: Checklist result kept for the session's life: pass/fail per item and version.
    checklist: dict[str, Any] | None = None
    #: Emergency details sealed by the client's browser for the therapist (ciphertext).
    details: str | None = None
    #: The broker's own record of this seat's network pre-flight.
    preflight: dict[str, Any] | None = None
    #: Taken through the session's group link (each seat can be taken once that way).
    claimed: bool = False
    #: On hold (private time): admitted, but nothing is relayed to or from it. Only ever set on an
    #: admitted client seat, and cleared whenever the seat stops being admitted
    #: (it leaves, is removed or declined, its link is revoked or reissued, it moves to another device).
    held: bool = False
    #: When the seat was first admitted (for the session record), else None.
    admitted_at: int | None = None
    #: Digest of the resume secret of the device holding this client seat; None until first opened.
    device: str | None = None
    #: Opaque id of that device, shown to the other peers (``peers``): when it changes, the seat
    #: moved to another device and their connection with the old one must go.
    device_id: str | None = None
    #: Digest of the device the seat was taken from when the therapist admitted another one.
    replaced_device: str | None = None
    #: Another device waiting for this seat, if any (one at a time).
    other: OtherDevice | None = None
    #: The therapist turned another device away: others are refused until they allow it again.
    others_barred: bool = False


class Session(msgspec.Struct, kw_only=True):
    id: str
    state: SessionState
    created: int
    starts: int
    not_before: int
    expires: int
    seats: list[Seat]
    ice_transport_policy: Literal["all", "relay"] = "all"
    #: One link usable by every client of a group: each use takes a free client seat.
    group_token_id: str | None = None
    #: When the first client was admitted (the call began).
    live_at: int | None = None
    #: The therapist account that scheduled it from the dashboard (an opaque id), if any: its
    #: owner index entry goes when the session ends.
    owner: str | None = None
    #: Its links carry a key per seat (docs/protocol.md 7.1). True for every session scheduled now;
    #: a record written before seat keys existed lacks the field and reads as False.
    seat_keys: bool = False
    #: Grows with every change of the record (``SessionRecords.mutate``): the views of a change carry
    #: it, so a process drops a view older than one its connection already has (``Relays``).
    revision: int = 0
    #: One-to-one, couple, family or group: shown on the therapist's dashboard, nothing more.
    kind: SessionKind = "individual"
    #: Peer to peer or through Janus: decided when it is scheduled, never switched mid-call.
    media: SessionMedia = "mesh"

    def seat(self, seat_id: str) -> Seat:
        for seat in self.seats:
            if seat.id == seat_id:
                return seat
        raise ProtocolError(ErrorCode.NOT_IN_SESSION, "That peer is not in this session.")

    def therapist(self) -> Seat:
        return next(s for s in self.seats if s.role is Role.THERAPIST)

    def clients(self) -> list[Seat]:
        return [s for s in self.seats if s.role is Role.CLIENT]
