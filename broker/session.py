"""The session state machine, free of any I/O.

A ``Session`` record holds everything the broker knows about one session: its
window, its state and its seats. Every change goes through one of the
functions below, which either mutate the record consistently or raise
``ProtocolError`` and leave it untouched. The hub loads a record from the
store, applies one function atomically and saves it back, so this module can be
tested without a server, a store or a clock.

Session states: ``scheduled`` (created, therapist not yet connected) ->
``open`` (therapist has connected) -> ``live`` (a client has been admitted) ->
``ended`` (ended by the therapist or expired). Seat states are documented in
docs/protocol.md.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import msgspec

from .protocol import ErrorCode, ProtocolError, Role, SeatState, SessionState
from .tokens import INVALID_MESSAGE, TokenClaims, new_peer_id, new_token_id

#: How early before the appointment a link opens, and how long after its end it stays valid.
DEFAULT_EARLY_S = 30 * 60
DEFAULT_GRACE_S = 30 * 60
#: How far ahead a session may be scheduled; also keeps every time within an invite token's u32 fields.
MAX_AHEAD_S = 366 * 24 * 3600

MAX_SEATS = 16

#: Seats a client cannot come back to on their own.
_BARRED = (SeatState.DECLINED, SeatState.REMOVED)


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
    #: When the seat was first admitted (for the session record), else None.
    admitted_at: int | None = None


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

    def seat(self, seat_id: str) -> Seat:
        for seat in self.seats:
            if seat.id == seat_id:
                return seat
        raise ProtocolError(ErrorCode.NOT_IN_SESSION, "That peer is not in this session.")

    def therapist(self) -> Seat:
        return next(s for s in self.seats if s.role is Role.THERAPIST)

    def clients(self) -> list[Seat]:
        return [s for s in self.seats if s.role is Role.CLIENT]


def new_session(
    session_id: str,
    *,
    now: int,
    starts: int,
    duration_s: int,
    clients: int,
    minors: int = 0,
    early_s: int = DEFAULT_EARLY_S,
    grace_s: int = DEFAULT_GRACE_S,
    relay_only: bool = False,
    group_link: bool = False,
) -> Session:
    """A scheduled session with one therapist seat and ``clients`` client seats.

    With ``group_link`` the session also has one invite link for all its clients.
    """
    if not 1 <= clients <= MAX_SEATS - 1:
        raise ValueError(f"a session has 1 to {MAX_SEATS - 1} client seats")
    if not 0 <= minors <= clients:
        raise ValueError("minors must be between 0 and the number of client seats")
    if not 5 * 60 <= duration_s <= 12 * 3600:
        raise ValueError("a session lasts 5 minutes to 12 hours")
    if starts > now + MAX_AHEAD_S:
        raise ValueError("an appointment can start at most a year from now")
    expires = starts + duration_s + grace_s
    if expires <= now:
        raise ValueError("that appointment is already over")
    seats = [Seat(id=new_peer_id(), role=Role.THERAPIST, token_id=new_token_id())]
    seats += [
        Seat(id=new_peer_id(), role=Role.CLIENT, token_id=new_token_id(), minor=i < minors) for i in range(clients)
    ]
    return Session(
        id=session_id,
        state=SessionState.SCHEDULED,
        created=now,
        starts=starts,
        not_before=max(now, starts - early_s),
        expires=expires,
        seats=seats,
        ice_transport_policy="relay" if relay_only else "all",
        group_token_id=new_token_id() if group_link else None,
    )


def group_claims(session: Session) -> TokenClaims:
    """The claims of the session's group link."""
    if session.group_token_id is None:
        raise ProtocolError(ErrorCode.INVALID_STATE, "This session has no group link.")
    return TokenClaims(session.id, session.group_token_id, session.not_before, session.expires)


def claims_for(session: Session, seat: Seat) -> TokenClaims:
    """The claims of the current invite token of a seat."""
    if seat.token_id is None:
        raise ProtocolError(ErrorCode.INVALID_STATE, "That seat's link was revoked; reissue it first.")
    return TokenClaims(session.id, seat.token_id, session.not_before, session.expires)


# ---------------------------------------------------------------- joining


def seat_for_token(session: Session, token_id: str) -> Seat:
    """The seat a token opens; revoked tokens look exactly like unknown ones."""
    _require_not_ended(session)
    for seat in session.seats:
        if seat.token_id is not None and seat.token_id == token_id:
            return seat
    raise invalid_token_error()


def claim_group_seat(session: Session) -> Seat:
    """A use of the group link takes the first client seat nobody has taken yet."""
    _require_not_ended(session)
    for seat in session.clients():
        if not seat.claimed and seat.token_id is not None and seat.state is SeatState.INVITED:
            seat.claimed = True
            return seat
    raise ProtocolError(
        ErrorCode.NO_SEATS_LEFT, "Every place in this group session is taken. Please contact your therapist."
    )


def connect(session: Session, seat_id: str, conn: str) -> str | None:
    """A connection takes the seat; returns the connection it replaces, if any.

    A second connection for the same seat takes over (the newest tab wins, so a
    reload or a network change never locks a person out); the caller tells the
    replaced connection and closes it.
    """
    _require_not_ended(session)
    seat = session.seat(seat_id)
    if seat.state is SeatState.DECLINED:
        raise ProtocolError(ErrorCode.DECLINED, "Your therapist could not let you in to this session.")
    if seat.state is SeatState.REMOVED:
        raise ProtocolError(ErrorCode.REMOVED, "You were removed from this session.")
    previous = seat.conn
    seat.conn = conn
    if seat.role is Role.THERAPIST:
        seat.state = SeatState.ADMITTED
        if session.state is SessionState.SCHEDULED:
            session.state = SessionState.OPEN
    elif seat.state is SeatState.INVITED:
        seat.state = SeatState.CHECKING
    elif seat.state is SeatState.LEFT:
        seat.state = SeatState.WAITING if seat.checklist else SeatState.CHECKING
    return previous if previous != conn else None


def disconnect(session: Session, seat_id: str, conn: str) -> bool:
    """The connection went away; True if it still held the seat."""
    seat = session.seat(seat_id)
    if seat.conn != conn:
        return False
    seat.conn = None
    return True


def pass_checklist(session: Session, seat_id: str, result: dict[str, Any], details: str | None) -> None:
    """A verified checklist result moves a checking client into the waiting room."""
    _require_not_ended(session)
    seat = session.seat(seat_id)
    if seat.role is not Role.CLIENT or seat.state is not SeatState.CHECKING:
        raise ProtocolError(
            ErrorCode.INVALID_STATE, "The checklist can only be submitted before entering the waiting room."
        )
    seat.checklist = result
    seat.details = details
    seat.state = SeatState.WAITING


# ---------------------------------------------------------------- therapist actions


def admit(session: Session, actor_id: str, target_id: str) -> Seat:
    target = _therapist_acts_on_client(session, actor_id, target_id)
    if target.state is not SeatState.WAITING:
        raise ProtocolError(ErrorCode.INVALID_STATE, "Only a client in the waiting room can be admitted.")
    target.state = SeatState.ADMITTED
    session.state = SessionState.LIVE
    return target


def mark_admitted(session: Session, seat_id: str, now: int) -> None:
    """Timestamps for the session record: first admission of the seat and of the session."""
    seat = session.seat(seat_id)
    seat.admitted_at = seat.admitted_at or now
    session.live_at = session.live_at or now


def decline(session: Session, actor_id: str, target_id: str) -> Seat:
    target = _therapist_acts_on_client(session, actor_id, target_id)
    if target.state not in (SeatState.CHECKING, SeatState.WAITING):
        raise ProtocolError(ErrorCode.INVALID_STATE, "Only a client who is waiting can be declined.")
    target.state = SeatState.DECLINED
    return target


def remove(session: Session, actor_id: str, target_id: str) -> Seat:
    target = _therapist_acts_on_client(session, actor_id, target_id)
    if target.state in _BARRED or target.state is SeatState.INVITED:
        raise ProtocolError(ErrorCode.INVALID_STATE, "That client is not in the session.")
    target.state = SeatState.REMOVED
    return target


def allow_return(session: Session, actor_id: str, target_id: str) -> Seat:
    """Lets a declined or removed client come back (through the checklist again)."""
    target = _therapist_acts_on_client(session, actor_id, target_id)
    if target.state not in _BARRED:
        raise ProtocolError(ErrorCode.INVALID_STATE, "That client was not declined or removed.")
    target.state = SeatState.INVITED
    target.checklist = None
    target.details = None
    return target


def revoke(session: Session, seat_id: str) -> Seat:
    """The seat's link stops working at once; a connection holding it is dropped by the caller."""
    _require_not_ended(session)
    seat = session.seat(seat_id)
    if seat.role is Role.THERAPIST:
        raise ProtocolError(ErrorCode.NOT_ALLOWED, "The therapist's own link cannot be revoked; end the session instead.")
    seat.token_id = None
    seat.claimed = False
    seat.state = SeatState.INVITED
    seat.checklist = None
    seat.details = None
    return seat


def reissue(session: Session, seat_id: str) -> Seat:
    """A fresh link for a client seat; any earlier link of it stops working."""
    seat = revoke(session, seat_id)
    seat.token_id = new_token_id()
    return seat


def leave(session: Session, seat_id: str) -> Seat:
    """A peer leaves on purpose. A client may come back later through the waiting room."""
    _require_not_ended(session)
    seat = session.seat(seat_id)
    if seat.role is Role.CLIENT and seat.state not in _BARRED:
        seat.state = SeatState.LEFT
    return seat


def end(session: Session, actor_id: str) -> None:
    _require_not_ended(session)
    if session.seat(actor_id).role is not Role.THERAPIST:
        raise ProtocolError(ErrorCode.NOT_ALLOWED, "Only the therapist can end the session.")
    session.state = SessionState.ENDED


def expire(session: Session, now: float) -> bool:
    """Ends the session if its window is over; True if it did."""
    if session.state is not SessionState.ENDED and now >= session.expires:
        session.state = SessionState.ENDED
        return True
    return False


# ---------------------------------------------------------------- relaying


def can_relay(session: Session, sender_id: str, recipient_id: str) -> None:
    """Both ends must be admitted seats of this session, and different."""
    sender = session.seat(sender_id)
    if sender.state is not SeatState.ADMITTED:
        raise ProtocolError(ErrorCode.NOT_ADMITTED, "You have not been admitted yet.")
    if recipient_id == sender_id:
        raise ProtocolError(ErrorCode.NOT_IN_SESSION, "A message cannot be sent to oneself.")
    if session.seat(recipient_id).state is not SeatState.ADMITTED:
        raise ProtocolError(ErrorCode.NOT_ADMITTED, "That peer has not been admitted.")


def offerer(a: Seat, b: Seat) -> str:
    """Which seat of a pair makes every offer: the therapist, else the smaller id.

    Decided by construction so both sides agree and offers never cross (no glare).
    """
    if a.role is Role.THERAPIST:
        return a.id
    if b.role is Role.THERAPIST:
        return b.id
    return min(a.id, b.id)


def admitted(session: Session) -> list[Seat]:
    return [s for s in session.seats if s.state is SeatState.ADMITTED]


def copy_session(session: Session) -> Session:
    return copy.deepcopy(session)


# ---------------------------------------------------------------- helpers


def invalid_token_error() -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID_TOKEN, INVALID_MESSAGE)


def _require_not_ended(session: Session) -> None:
    if session.state is SessionState.ENDED:
        raise ProtocolError(ErrorCode.SESSION_ENDED, "This session has ended.")


def _therapist_acts_on_client(session: Session, actor_id: str, target_id: str) -> Seat:
    _require_not_ended(session)
    if session.seat(actor_id).role is not Role.THERAPIST:
        raise ProtocolError(ErrorCode.NOT_ALLOWED, "Only the therapist can do that.")
    target = session.seat(target_id)
    if target.role is not Role.CLIENT:
        raise ProtocolError(ErrorCode.NOT_ALLOWED, "That can only be done to a client.")
    return target
