"""Every state-machine transition, valid and invalid, without a server."""

from __future__ import annotations

import pytest

from broker import session as sm
from broker.protocol import ErrorCode, ProtocolError, Role, SeatState, SessionState

NOW = 1_800_000_000


def fresh(clients: int = 2, minors: int = 0) -> sm.Session:
    return sm.new_session("S" * 22, now=NOW, starts=NOW + 600, duration_s=3000, clients=clients, minors=minors)


def ids(session: sm.Session) -> tuple[str, str, str]:
    therapist = session.therapist().id
    a, b = (s.id for s in session.clients())
    return therapist, a, b


def refused(code: ErrorCode, step, *args) -> None:  # noqa: ANN001
    """The step raises ``code`` and leaves the record exactly as it was."""
    session = args[0]
    before = sm.copy_session(session)
    with pytest.raises(ProtocolError) as info:
        step(*args)
    assert info.value.code is code
    assert session == before


def to_waiting(session: sm.Session, seat: str) -> None:
    sm.connect(session, seat, f"conn-{seat}")
    sm.pass_checklist(session, seat, {"policy_version": "v", "all_required_met": True}, None)


def test_new_session_window_and_seats() -> None:
    s = fresh(clients=3, minors=1)
    assert s.state is SessionState.SCHEDULED
    assert s.not_before == NOW  # starts within 30 minutes: the links work from creation
    assert s.expires == NOW + 600 + 3000 + sm.DEFAULT_GRACE_S
    assert [seat.role for seat in s.seats] == [Role.THERAPIST, Role.CLIENT, Role.CLIENT, Role.CLIENT]
    assert [seat.minor for seat in s.clients()] == [True, False, False]
    assert len({seat.id for seat in s.seats}) == 4 and len({seat.token_id for seat in s.seats}) == 4


@pytest.mark.parametrize(
    "kwargs",
    [{"clients": 0}, {"clients": 16}, {"clients": 1, "minors": 2}, {"duration_s": 60}, {"starts": NOW - 100_000}],
)
def test_new_session_rejects_impossible_requests(kwargs: dict[str, int]) -> None:
    args = {"now": NOW, "starts": NOW, "duration_s": 3000, "clients": 1, **kwargs}
    with pytest.raises(ValueError):
        sm.new_session("S" * 22, **args)


def test_a_session_starts_at_most_a_year_ahead() -> None:
    """Finding 11: a start near 2^32 (or any beyond a year) is refused before any record exists."""
    year = 365 * 24 * 3600
    latest = sm.new_session("S" * 22, now=NOW, starts=NOW + year, duration_s=720 * 60, clients=1)
    assert latest.expires < 2**32
    for starts in (NOW + year + 2 * 24 * 3600, 2**32 - 1 - 3600, 2**32 - 1, 2**63):
        with pytest.raises(ValueError, match="at most a year"):
            sm.new_session("S" * 22, now=NOW, starts=starts, duration_s=3000, clients=1)


def test_therapist_connecting_opens_the_session() -> None:
    s = fresh()
    t, _, _ = ids(s)
    assert sm.connect(s, t, "c1") is None
    assert s.state is SessionState.OPEN and s.therapist().state is SeatState.ADMITTED


def test_client_goes_invited_checking_waiting_admitted_and_session_goes_live() -> None:
    s = fresh()
    t, a, _ = ids(s)
    sm.connect(s, t, "ct")
    assert s.seat(a).state is SeatState.INVITED
    sm.connect(s, a, "ca")
    assert s.seat(a).state is SeatState.CHECKING
    sm.pass_checklist(s, a, {"policy_version": "v"}, "sealed")
    assert s.seat(a).state is SeatState.WAITING and s.seat(a).details == "sealed"
    sm.admit(s, t, a)
    assert s.seat(a).state is SeatState.ADMITTED and s.state is SessionState.LIVE


def test_a_second_connection_takes_over_the_seat() -> None:
    s = fresh()
    _, a, _ = ids(s)
    sm.connect(s, a, "first")
    assert sm.connect(s, a, "second") == "first"
    assert s.seat(a).conn == "second"
    assert sm.disconnect(s, a, "first") is False  # the replaced connection no longer holds it
    assert sm.disconnect(s, a, "second") is True and s.seat(a).conn is None


def test_checklist_only_while_checking() -> None:
    s = fresh()
    t, a, b = ids(s)
    refused(ErrorCode.INVALID_STATE, sm.pass_checklist, s, a, {}, None)  # not connected yet (invited)
    to_waiting(s, a)
    refused(ErrorCode.INVALID_STATE, sm.pass_checklist, s, a, {}, None)  # already waiting
    sm.connect(s, t, "ct")
    refused(ErrorCode.INVALID_STATE, sm.pass_checklist, s, t, {}, None)  # therapists have no checklist


def test_only_the_therapist_admits_declines_removes_and_ends() -> None:
    s = fresh()
    t, a, b = ids(s)
    to_waiting(s, a)
    to_waiting(s, b)
    for step in (sm.admit, sm.decline, sm.remove, sm.allow_return):
        refused(ErrorCode.NOT_ALLOWED, step, s, b, a)
    refused(ErrorCode.NOT_ALLOWED, sm.end, s, a)
    refused(ErrorCode.NOT_ALLOWED, sm.admit, s, t, t)  # the therapist is not a client
    refused(ErrorCode.NOT_IN_SESSION, sm.admit, s, t, "nobody")


def test_admit_requires_waiting() -> None:
    s = fresh()
    t, a, _ = ids(s)
    refused(ErrorCode.INVALID_STATE, sm.admit, s, t, a)  # invited
    sm.connect(s, a, "ca")
    refused(ErrorCode.INVALID_STATE, sm.admit, s, t, a)  # checking: checklist not passed
    sm.pass_checklist(s, a, {}, None)
    sm.admit(s, t, a)
    refused(ErrorCode.INVALID_STATE, sm.admit, s, t, a)  # already admitted


def test_declined_client_cannot_come_back_until_allowed() -> None:
    s = fresh()
    t, a, _ = ids(s)
    to_waiting(s, a)
    sm.decline(s, t, a)
    assert s.seat(a).state is SeatState.DECLINED
    refused(ErrorCode.DECLINED, sm.connect, s, a, "again")
    refused(ErrorCode.INVALID_STATE, sm.decline, s, t, a)
    sm.allow_return(s, t, a)
    assert s.seat(a).state is SeatState.INVITED and s.seat(a).checklist is None
    sm.connect(s, a, "again")
    assert s.seat(a).state is SeatState.CHECKING


def test_removed_client_cannot_come_back_until_allowed() -> None:
    s = fresh()
    t, a, _ = ids(s)
    to_waiting(s, a)
    sm.admit(s, t, a)
    sm.remove(s, t, a)
    assert s.seat(a).state is SeatState.REMOVED
    refused(ErrorCode.REMOVED, sm.connect, s, a, "again")
    refused(ErrorCode.INVALID_STATE, sm.remove, s, t, a)
    refused(ErrorCode.INVALID_STATE, sm.allow_return, s, t, ids(s)[2])  # never barred


def test_remove_needs_someone_present() -> None:
    s = fresh()
    t, a, _ = ids(s)
    refused(ErrorCode.INVALID_STATE, sm.remove, s, t, a)  # invited, never came


def test_leave_and_come_back_through_the_waiting_room() -> None:
    s = fresh()
    t, a, _ = ids(s)
    to_waiting(s, a)
    sm.admit(s, t, a)
    sm.leave(s, a)
    sm.disconnect(s, a, f"conn-{a}")
    assert s.seat(a).state is SeatState.LEFT
    sm.connect(s, a, "back")
    assert s.seat(a).state is SeatState.WAITING  # checklist kept, admission needed again


def test_leave_before_checklist_returns_to_checking() -> None:
    s = fresh()
    _, a, _ = ids(s)
    sm.connect(s, a, "ca")
    sm.leave(s, a)
    sm.connect(s, a, "cb")
    assert s.seat(a).state is SeatState.CHECKING


def test_revoke_and_reissue() -> None:
    s = fresh()
    t, a, _ = ids(s)
    old = s.seat(a).token_id
    assert old is not None
    sm.revoke(s, a)
    assert s.seat(a).token_id is None
    refused(ErrorCode.INVALID_TOKEN, sm.seat_for_token, s, old)
    refused(ErrorCode.INVALID_STATE, sm.claims_for, s, s.seat(a))
    sm.reissue(s, a)
    new = s.seat(a).token_id
    assert new not in (None, old)
    assert sm.seat_for_token(s, new).id == a
    refused(ErrorCode.NOT_ALLOWED, sm.revoke, s, t)


def test_relay_only_between_admitted_peers() -> None:
    s = fresh()
    t, a, b = ids(s)
    sm.connect(s, t, "ct")
    to_waiting(s, a)
    to_waiting(s, b)
    refused(ErrorCode.NOT_ADMITTED, sm.can_relay, s, a, t)  # sender waiting
    refused(ErrorCode.NOT_ADMITTED, sm.can_relay, s, t, a)  # recipient waiting
    sm.admit(s, t, a)
    sm.can_relay(s, t, a)
    sm.can_relay(s, a, t)
    refused(ErrorCode.NOT_ADMITTED, sm.can_relay, s, a, b)
    refused(ErrorCode.NOT_IN_SESSION, sm.can_relay, s, a, "stranger")
    refused(ErrorCode.NOT_IN_SESSION, sm.can_relay, s, a, a)


def test_offerer_is_the_therapist_else_the_smaller_id() -> None:
    s = fresh()
    therapist, a, b = s.therapist(), *s.clients()
    assert sm.offerer(therapist, a) == sm.offerer(a, therapist) == therapist.id
    assert sm.offerer(a, b) == sm.offerer(b, a) == min(a.id, b.id)


def test_end_and_everything_after_it_is_refused() -> None:
    s = fresh()
    t, a, _ = ids(s)
    to_waiting(s, a)
    sm.end(s, t)
    assert s.state is SessionState.ENDED
    refused(ErrorCode.SESSION_ENDED, sm.end, s, t)
    refused(ErrorCode.SESSION_ENDED, sm.admit, s, t, a)
    refused(ErrorCode.SESSION_ENDED, sm.connect, s, a, "late")
    refused(ErrorCode.SESSION_ENDED, sm.seat_for_token, s, s.seat(a).token_id)
    refused(ErrorCode.SESSION_ENDED, sm.leave, s, a)


def test_expiry() -> None:
    s = fresh()
    assert sm.expire(s, s.expires - 1) is False and s.state is SessionState.SCHEDULED
    assert sm.expire(s, s.expires) is True and s.state is SessionState.ENDED
    assert sm.expire(s, s.expires + 10) is False


def test_links_for_a_later_appointment_open_thirty_minutes_before_it() -> None:
    """A link sent days ahead works from 30 minutes before the appointment, not from when it was made."""
    day = 24 * 3600
    s = sm.new_session("S" * 22, now=NOW, starts=NOW + 2 * day, duration_s=3000, clients=1)
    assert s.not_before == NOW + 2 * day - sm.DEFAULT_EARLY_S
