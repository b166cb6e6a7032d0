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

A client seat belongs to the device that first opened its link: that page gets a
resume secret (kept in its memory only) and comes back to the seat with it. Any
other join of the link (a second device, a forwarded link, a reload that lost the
secret) is the seat's *other device*: it goes through the checklist on its own and
waits for the therapist, who admits it (the seat moves to it and the earlier
connection is closed) or turns it away. A leaked link therefore never takes over a
seat by itself.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from broker.signaling.protocol import ErrorCode, ProtocolError, Role, SeatState, SessionState
from broker.signaling.session_state import OtherDevice as OtherDevice
from broker.signaling.session_state import Seat as Seat
from broker.signaling.session_state import Session as Session
from broker.signaling.session_state import SessionKind as SessionKind
from broker.signaling.session_state import SessionMedia as SessionMedia
from broker.signaling.tokens import INVALID_MESSAGE, TokenClaims, new_peer_id, new_token_id, node_of

#: How early before the appointment a link opens, and how long after its end it stays valid.
DEFAULT_EARLY_S = 30 * 60
DEFAULT_GRACE_S = 30 * 60
#: How far ahead a session may be scheduled; also keeps every time within an invite token's u32 fields.
MAX_AHEAD_S = 366 * 24 * 3600

MAX_SEATS = 16

#: Seats a client cannot come back to on their own.
_BARRED = (SeatState.DECLINED, SeatState.REMOVED)


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
    owner: str | None = None,
    kind: SessionKind = "individual",
    media: SessionMedia = "mesh",
) -> Session:
    """A scheduled session with one therapist seat and ``clients`` client seats.

    With ``group_link`` the session also has one invite link for all its clients.
    """
    if not 1 <= clients <= MAX_SEATS - 1:
        raise ValueError(f"a session has 1 to {MAX_SEATS - 1} client seats")
    if not 0 <= minors <= clients:
        raise ValueError("minors must be between 0 and the number of client seats")
    not_before, expires = window(now, starts, duration_s, early_s=early_s, grace_s=grace_s)
    seats = [Seat(id=new_peer_id(), role=Role.THERAPIST, token_id=new_token_id())]
    seats += [
        Seat(id=new_peer_id(), role=Role.CLIENT, token_id=new_token_id(), minor=i < minors) for i in range(clients)
    ]
    return Session(
        id=session_id,
        state=SessionState.SCHEDULED,
        created=now,
        starts=starts,
        not_before=not_before,
        expires=expires,
        seats=seats,
        ice_transport_policy="relay" if relay_only else "all",
        group_token_id=new_token_id() if group_link else None,
        owner=owner,
        seat_keys=True,
        kind=kind,
        media=media,
    )


def window(
    now: int, starts: int, duration_s: int, *, early_s: int = DEFAULT_EARLY_S, grace_s: int = DEFAULT_GRACE_S
) -> tuple[int, int]:
    """When the links of an appointment start and stop working; ValueError for a time that cannot be booked."""
    if not 5 * 60 <= duration_s <= 12 * 3600:
        raise ValueError("a session lasts 5 minutes to 12 hours")
    if starts > now + MAX_AHEAD_S:
        raise ValueError("an appointment can start at most a year from now")
    expires = starts + duration_s + grace_s
    if expires <= now:
        raise ValueError("that appointment is already over")
    return max(now, starts - early_s), expires


def reschedule(
    session: Session,
    *,
    now: int,
    starts: int,
    duration_s: int,
) -> None:
    """Move a session that has not begun to another time: its links keep working, in the new window.

    Only while nobody is connected (else ``invalid_state``): a peer already in would otherwise keep
    a window that no longer holds, and its process's end-of-session timer the old time.
    """
    _require_not_ended(session)
    if session.state is not SessionState.SCHEDULED or any(
        seat.conn is not None or (seat.other is not None and seat.other.conn is not None) for seat in session.seats
    ):
        raise ProtocolError(
            ErrorCode.INVALID_STATE,
            "Someone is connected to this session, so its time cannot change now. End it, or schedule another.",
        )
    session.not_before, session.expires = window(now, starts, duration_s)
    session.starts = starts


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


@dataclass
class Joining:
    """How a join took its seat."""

    seat: Seat
    #: Set when the connection joined as the seat's other device.
    other: OtherDevice | None
    #: A connection this join replaced (the caller tells it ``replaced`` and closes it).
    replaced: str | None
    #: True when the join gave its device the new resume secret (its digest was taken).
    issued: bool

    @property
    def state(self) -> SeatState:
        """The seat state this connection sees: its own, for another device."""
        return self.other.state if self.other is not None else self.seat.state


def connect(
    session: Session,
    seat_id: str,
    conn: str,
    *,
    device: str | None = None,
    new_device: str = "",
    now: int | None = None,
) -> Joining:
    """A connection joins a seat.

    ``device`` is the digest of the resume secret the join presented (None without one);
    ``new_device`` the digest of a fresh secret, taken when this join needs one. The
    therapist's seat is taken over by its newest connection, and is admitted from its first
    one (at ``now``, for the session record). A client seat is resumed
    only by the device holding it (presenting its secret: a reconnect, never reset by it);
    its first join claims it; any other join becomes the seat's other device, waiting
    for the therapist, and replaces an earlier other device that was still waiting.
    """
    _require_not_ended(session)
    seat = session.seat(seat_id)
    if seat.role is Role.THERAPIST:
        previous = seat.conn
        seat.conn = conn
        seat.state = SeatState.ADMITTED
        if seat.admitted_at is None:
            seat.admitted_at = now
        if session.state is SessionState.SCHEDULED:
            session.state = SessionState.OPEN
        return Joining(seat, None, previous if previous != conn else None, issued=False)
    if seat.state is SeatState.DECLINED:
        raise ProtocolError(ErrorCode.DECLINED, "Your therapist could not let you in to this session.")
    if seat.state is SeatState.REMOVED:
        raise ProtocolError(ErrorCode.REMOVED, "You were removed from this session.")
    other = seat.other
    if device is not None and device == seat.device:
        return Joining(seat, None, _hold(seat, conn), issued=False)
    if device is not None and other is not None and device == other.device:
        previous = other.conn
        other.conn = conn
        return Joining(seat, other, previous if previous != conn else None, issued=False)
    if device is not None and device == seat.replaced_device:
        raise ProtocolError(
            ErrorCode.REPLACED, "Your therapist let you in from another device or window, so this one has stopped."
        )
    if not new_device:
        raise ValueError("a join without the seat's resume secret needs a new device digest")
    if seat.device is None:
        seat.device = new_device
        seat.device_id = new_peer_id()
        return Joining(seat, None, _hold(seat, conn), issued=True)
    if seat.others_barred:
        raise ProtocolError(
            ErrorCode.DECLINED,
            "This link is already in use on another device, and your therapist did not let a second one in.",
        )
    seat.other = OtherDevice(id=new_peer_id(), device=new_device, conn=conn)
    replaced = other.conn if other is not None else None
    return Joining(seat, seat.other, replaced, issued=True)


def _hold(seat: Seat, conn: str) -> str | None:
    """The holding device's connection takes its client seat; returns the one it replaces."""
    previous = seat.conn
    seat.conn = conn
    if seat.state is SeatState.INVITED:
        seat.state = SeatState.CHECKING
    elif seat.state is SeatState.LEFT:
        seat.state = SeatState.WAITING if seat.checklist else SeatState.CHECKING
    return previous if previous != conn else None


def device_for(session: Session, seat_id: str, conn: str | None) -> Seat | OtherDevice:
    """What a connection stands for in its seat: the seat itself (its holder), or its other device.

    ``conn`` None means the seat's holder. A connection that is neither (one replaced meanwhile)
    gets ``invalid_state``.
    """
    seat = session.seat(seat_id)
    if conn is None or seat.conn == conn:
        return seat
    if seat.other is not None and seat.other.conn == conn:
        return seat.other
    raise ProtocolError(ErrorCode.INVALID_STATE, "This window no longer holds its place in the session.")


def disconnect(session: Session, seat_id: str, conn: str) -> bool:
    """The connection went away; True if it still held the seat (or its other device's place)."""
    seat = session.seat(seat_id)
    if seat.conn == conn:
        seat.conn = None
        return True
    if seat.other is not None and seat.other.conn == conn:
        seat.other.conn = None
        return True
    return False


def held_on(session: Session) -> set[str]:
    """The nodes (broker processes) holding a connection of the session: its seats' and other devices'."""
    places: list[Seat | OtherDevice] = [*session.seats, *(s.other for s in session.seats if s.other is not None)]
    return {node for p in places if p.conn is not None and (node := node_of(p.conn)) is not None}


def connections_of(session: Session, seat_id: str) -> set[str]:
    """The connections holding a seat or waiting for it as its other device."""
    seat = session.seat(seat_id)
    return {c for c in (seat.conn, seat.other.conn if seat.other is not None else None) if c is not None}


def release_nodes(session: Session, dead: set[str]) -> int:
    """Connections held by dead broker processes hold nothing any more (as if each had
    disconnected); returns how many places were freed. A place that a newer connection
    took meanwhile (a peer that came back through another process) is not touched."""
    freed = 0
    for seat in session.seats:
        for place in (seat, seat.other):
            if place is not None and place.conn is not None and node_of(place.conn) in dead:
                place.conn = None
                freed += 1
    return freed


def pass_checklist(
    session: Session, seat_id: str, result: dict[str, Any], details: str | None, conn: str | None = None
) -> None:
    """A verified checklist result moves a checking client (or other device) into the waiting room."""
    _require_not_ended(session)
    seat = session.seat(seat_id)
    place = device_for(session, seat_id, conn)
    if seat.role is not Role.CLIENT or place.state is not SeatState.CHECKING:
        raise ProtocolError(
            ErrorCode.INVALID_STATE, "The checklist can only be submitted before entering the waiting room."
        )
    place.checklist = result
    place.details = details
    place.state = SeatState.WAITING


# ---------------------------------------------------------------- therapist actions


def admit(session: Session, actor_id: str, target_id: str) -> Seat:
    target = _therapist_acts_on_client(session, actor_id, target_id)
    if target.state is not SeatState.WAITING:
        raise ProtocolError(ErrorCode.INVALID_STATE, "Only a client in the waiting room can be admitted.")
    target.state = SeatState.ADMITTED
    target.held = False  # a client admitted again is not held
    session.state = SessionState.LIVE
    return target


def admit_other(session: Session, actor_id: str, target_id: str, other_id: str) -> str | None:
    """The therapist lets a seat's other device in: the seat moves to it, with its checklist.

    Returns the connection that held the seat before (closed by the caller with ``replaced``);
    that device's secret no longer opens the seat.
    """
    target = _therapist_acts_on_client(session, actor_id, target_id)
    other = _other(target, other_id)
    if other.state is not SeatState.WAITING or target.state in _BARRED:
        raise ProtocolError(ErrorCode.INVALID_STATE, "Only a device in the waiting room can be admitted.")
    previous = target.conn
    target.replaced_device = target.device
    target.device = other.device
    target.device_id = other.id
    target.conn = other.conn
    target.checklist = other.checklist
    target.details = other.details
    target.preflight = other.preflight
    target.other = None
    target.state = SeatState.ADMITTED
    target.held = False  # the seat's new device is admitted afresh: not held
    session.state = SessionState.LIVE
    return previous


def decline_other(session: Session, actor_id: str, target_id: str, other_id: str) -> str | None:
    """The therapist turns a seat's other device away; others are refused until they allow it.

    Returns its connection (told ``declined`` and closed by the caller).
    """
    target = _therapist_acts_on_client(session, actor_id, target_id)
    other = _other(target, other_id)
    target.other = None
    target.others_barred = True
    return other.conn


def mark_admitted(session: Session, seat_id: str, now: int) -> None:
    """Timestamps for the session record: first admission of the seat and of the session."""
    seat = session.seat(seat_id)
    seat.admitted_at = seat.admitted_at or now
    session.live_at = session.live_at or now


def note_target(session: Session, actor_id: str, target_id: str) -> Seat:
    """The client seat a word from the therapist may go to: one that is checking or waiting, with
    a connection to deliver it to (the word is not kept for later)."""
    target = _therapist_acts_on_client(session, actor_id, target_id)
    if target.state not in (SeatState.CHECKING, SeatState.WAITING) or target.conn is None:
        raise ProtocolError(ErrorCode.INVALID_STATE, "Only a client who is connected and waiting can be sent a note.")
    return target


def decline(session: Session, actor_id: str, target_id: str) -> Seat:
    target = _therapist_acts_on_client(session, actor_id, target_id)
    if target.state not in (SeatState.CHECKING, SeatState.WAITING):
        raise ProtocolError(ErrorCode.INVALID_STATE, "Only a client who is waiting can be declined.")
    target.state = SeatState.DECLINED
    target.held = False
    target.other = None
    return target


def remove(session: Session, actor_id: str, target_id: str) -> Seat:
    target = _therapist_acts_on_client(session, actor_id, target_id)
    if target.state in _BARRED or target.state is SeatState.INVITED:
        raise ProtocolError(ErrorCode.INVALID_STATE, "That client is not in the session.")
    target.state = SeatState.REMOVED
    target.held = False
    target.other = None
    return target


def allow_return(session: Session, actor_id: str, target_id: str) -> Seat:
    """Lets a declined or removed client come back (through the checklist again, from any device),
    or, for a seat whose other device was turned away, lets another device ask again."""
    target = _therapist_acts_on_client(session, actor_id, target_id)
    if target.state in _BARRED:
        _reset(target)
        return target
    if target.others_barred:
        target.others_barred = False
        return target
    raise ProtocolError(ErrorCode.INVALID_STATE, "That client was not declined or removed.")


def revoke(session: Session, seat_id: str) -> Seat:
    """The seat's link stops working at once; a connection holding it is dropped by the caller."""
    _require_not_ended(session)
    seat = session.seat(seat_id)
    if seat.role is Role.THERAPIST:
        raise ProtocolError(
            ErrorCode.NOT_ALLOWED, "The therapist's own link cannot be revoked; end the session instead."
        )
    seat.token_id = None
    seat.claimed = False
    _reset(seat)
    return seat


def reissue(session: Session, seat_id: str) -> Seat:
    """A fresh link for a client seat; any earlier link of it stops working."""
    seat = revoke(session, seat_id)
    seat.token_id = new_token_id()
    return seat


def leave(session: Session, seat_id: str, conn: str | None = None) -> Seat | OtherDevice:
    """A peer leaves on purpose. A client may come back later through the waiting room.

    An other device that leaves simply goes: the seat is not its to leave. Returns what left.
    """
    _require_not_ended(session)
    seat = session.seat(seat_id)
    place = device_for(session, seat_id, conn)
    if place is seat.other:
        seat.other = None
        return place
    if seat.role is Role.CLIENT and seat.state not in _BARRED:
        seat.state = SeatState.LEFT
        seat.held = False
    return seat


def hold(session: Session, actor_id: str, target_id: str, *, held: bool = True) -> bool:
    """The therapist puts an admitted client on hold (``held``) or brings them back (private
    time, docs/protocol.md 3). True when that changed the seat: holding a held client, or
    releasing one that is not held, changes nothing and is not an error."""
    target = _therapist_acts_on_client(session, actor_id, target_id)
    if target.state is not SeatState.ADMITTED:
        raise ProtocolError(ErrorCode.NOT_ADMITTED, "That client is not in the call.")
    if target.held is held:
        return False
    target.held = held
    return True


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


def can_relay(session: Session, sender_id: str, recipient_id: str, conn: str | None = None) -> None:
    """Both ends must be admitted seats of this session, different, and neither on hold; with
    ``conn``, the sending connection must be the one holding its seat (never a seat's other device)."""
    sender = session.seat(sender_id)
    if sender.state is not SeatState.ADMITTED or (conn is not None and sender.conn != conn):
        raise ProtocolError(ErrorCode.NOT_ADMITTED, "You have not been admitted yet.")
    if recipient_id == sender_id:
        raise ProtocolError(ErrorCode.NOT_IN_SESSION, "A message cannot be sent to oneself.")
    recipient = session.seat(recipient_id)
    if recipient.state is not SeatState.ADMITTED:
        raise ProtocolError(ErrorCode.NOT_ADMITTED, "That peer has not been admitted.")
    if sender.held:
        raise ProtocolError(ErrorCode.ON_HOLD, "Your therapist is talking with someone privately; nothing is sent.")
    if recipient.held:
        raise ProtocolError(ErrorCode.ON_HOLD, "That peer is on hold; nothing is sent to them until released.")


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


def _reset(seat: Seat) -> None:
    """A client seat as if its link had never been opened: any device may claim it again."""
    seat.state = SeatState.INVITED
    seat.held = False
    seat.checklist = None
    seat.details = None
    seat.preflight = None
    seat.conn = None
    seat.device = None
    seat.device_id = None
    seat.replaced_device = None
    seat.other = None
    seat.others_barred = False


def _other(seat: Seat, other_id: str) -> OtherDevice:
    if seat.other is None or seat.other.id != other_id:
        raise ProtocolError(ErrorCode.INVALID_STATE, "That device is no longer waiting for this seat.")
    return seat.other


def is_over(session: Session) -> bool:
    """The session has ended: its record is about to be deleted, and its links answer as if it were."""
    return session.state is SessionState.ENDED


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
