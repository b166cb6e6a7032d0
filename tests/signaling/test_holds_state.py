"""Private time in the state machine, without a server: who may hold whom, what a hold blocks,
when it ends, and the session's ``seat_keys`` flag in the stored record."""

from __future__ import annotations

import msgspec
import pytest

from broker.signaling import session as sm
from broker.signaling.protocol import ErrorCode, SeatState
from broker.signaling.session_records import decode_record, encode_record
from tests.signaling.test_session import NOW, fresh, ids, join, refused, to_waiting


def in_call(clients: int = 2) -> tuple[sm.Session, str, str, str]:
    """A live session: the therapist connected and two clients admitted."""
    s = fresh(clients=clients)
    therapist, a, b = ids(s)
    join(s, therapist, "conn-t")
    for client in (a, b):
        to_waiting(s, client)
        sm.admit(s, therapist, client)
    return s, therapist, a, b


def test_the_therapist_holds_and_releases_an_admitted_client() -> None:
    s, therapist, a, b = in_call()
    assert sm.hold(s, therapist, a) is True
    assert s.seat(a).held and s.seat(a).state is SeatState.ADMITTED  # still in the call
    assert not s.seat(b).held
    assert sm.hold(s, therapist, a, held=False) is True
    assert not s.seat(a).held


def test_holding_a_held_client_and_releasing_one_not_held_change_nothing() -> None:
    s, therapist, a, _ = in_call()
    before = sm.copy_session(s)
    assert sm.hold(s, therapist, a, held=False) is False
    assert s == before
    sm.hold(s, therapist, a)
    before = sm.copy_session(s)
    assert sm.hold(s, therapist, a) is False
    assert s == before


@pytest.mark.parametrize("held", [True, False])
def test_hold_and_release_refusals_change_nothing(held: bool) -> None:
    s, therapist, a, b = in_call(clients=2)
    sm.leave(s, b, "conn-" + b)  # b is no longer in the call
    refused(ErrorCode.NOT_ALLOWED, lambda *x: sm.hold(*x, held=held), s, a, b)  # a client
    refused(ErrorCode.NOT_ALLOWED, lambda *x: sm.hold(*x, held=held), s, therapist, therapist)  # the therapist
    refused(ErrorCode.NOT_IN_SESSION, lambda *x: sm.hold(*x, held=held), s, therapist, "nobody12")
    refused(ErrorCode.NOT_ADMITTED, lambda *x: sm.hold(*x, held=held), s, therapist, b)
    sm.end(s, therapist)
    refused(ErrorCode.SESSION_ENDED, lambda *x: sm.hold(*x, held=held), s, therapist, a)


def test_a_client_still_waiting_cannot_be_held() -> None:
    s = fresh(clients=2)
    therapist, a, _ = ids(s)
    join(s, therapist, "conn-t")
    to_waiting(s, a)
    refused(ErrorCode.NOT_ADMITTED, sm.hold, s, therapist, a)


def test_nothing_is_relayed_to_or_from_a_held_client() -> None:
    s, therapist, a, b = in_call()
    sm.hold(s, therapist, a)
    for sender, recipient in ((therapist, a), (a, therapist), (b, a), (a, b)):
        with pytest.raises(sm.ProtocolError) as info:
            sm.can_relay(s, sender, recipient)
        assert info.value.code is ErrorCode.ON_HOLD
    sm.can_relay(s, therapist, b)  # the others carry on
    sm.can_relay(s, b, therapist)
    sm.hold(s, therapist, a, held=False)
    sm.can_relay(s, therapist, a)
    sm.can_relay(s, a, b)


def test_admission_is_checked_before_the_hold() -> None:
    """A held sender writing to someone not in the call learns that first (the hold is no secret to them)."""
    s, therapist, a, b = in_call()
    sm.hold(s, therapist, a)
    sm.leave(s, b, "conn-" + b)
    with pytest.raises(sm.ProtocolError) as info:
        sm.can_relay(s, a, b)
    assert info.value.code is ErrorCode.NOT_ADMITTED


def _leave(s: sm.Session, therapist: str, a: str) -> None:
    sm.leave(s, a, "conn-" + a)


def _remove(s: sm.Session, therapist: str, a: str) -> None:
    sm.remove(s, therapist, a)


def _revoke(s: sm.Session, therapist: str, a: str) -> None:
    sm.revoke(s, a)


def _reissue(s: sm.Session, therapist: str, a: str) -> None:
    sm.reissue(s, a)


def _other_device(s: sm.Session, therapist: str, a: str) -> None:
    """The therapist lets the seat's other device in: the seat moves to it, admitted afresh."""
    join(s, a, "conn-second")
    other = s.seat(a).other
    assert other is not None
    sm.pass_checklist(s, a, {"policy_version": "v", "all_required_met": True}, None, conn="conn-second")
    sm.admit_other(s, therapist, a, other.id)


@pytest.mark.parametrize("ends_it", [_leave, _remove, _revoke, _reissue, _other_device])
def test_a_hold_ends_when_the_seat_leaves_the_call(ends_it) -> None:  # noqa: ANN001
    s, therapist, a, _ = in_call()
    sm.hold(s, therapist, a)
    ends_it(s, therapist, a)
    assert not s.seat(a).held


def test_a_client_who_left_while_held_comes_back_unheld() -> None:
    s, therapist, a, _ = in_call()
    sm.hold(s, therapist, a)
    sm.leave(s, a, "conn-" + a)
    join(s, a, "conn-again", device=s.seat(a).device)
    assert s.seat(a).state is SeatState.WAITING
    sm.admit(s, therapist, a)
    assert not s.seat(a).held


def test_a_dropped_connection_keeps_the_hold() -> None:
    """A held client cannot end the hold by reloading: the seat stays admitted and held."""
    s, therapist, a, _ = in_call()
    sm.hold(s, therapist, a)
    assert sm.disconnect(s, a, "conn-" + a)
    join(s, a, "conn-reload", device=s.seat(a).device)
    assert s.seat(a).held and s.seat(a).state is SeatState.ADMITTED


def test_the_hold_is_kept_in_the_stored_record() -> None:
    s, therapist, a, _ = in_call()
    sm.hold(s, therapist, a)
    assert decode_record(encode_record(s)).seat(a).held


def test_sessions_scheduled_now_have_seat_keys_and_a_record_without_the_field_has_not() -> None:
    s = fresh()
    assert s.seat_keys is True
    assert decode_record(encode_record(s)).seat_keys is True
    # A record as a broker before seat keys wrote it: the same fields, without ``seat_keys``
    # (and without ``held`` on its seats).
    old = msgspec.msgpack.decode(encode_record(s))
    del old["seat_keys"]
    for seat in old["seats"]:
        del seat["held"]
    record = decode_record(msgspec.msgpack.encode(old))
    assert record.seat_keys is False
    assert not any(seat.held for seat in record.seats)
    assert record.starts == s.starts and record.created == NOW
