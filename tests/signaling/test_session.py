"""Every state-machine transition, valid and invalid, without a server."""

from __future__ import annotations

import pytest

from broker.signaling import session as sm
from broker.signaling.protocol import ErrorCode, ProtocolError, Role, SeatState, SessionState

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


def join(session: sm.Session, seat: str, conn: str, device: str | None = None) -> sm.Joining:
    """A join by connection ``conn``; a device without a secret would be given ``dev-<conn>``."""
    return sm.connect(session, seat, conn, device=device, new_device=f"dev-{conn}")


def to_waiting(session: sm.Session, seat: str) -> None:
    join(session, seat, f"conn-{seat}")
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
    assert join(s, t, "c1").replaced is None
    assert s.state is SessionState.OPEN and s.therapist().state is SeatState.ADMITTED


def test_client_goes_invited_checking_waiting_admitted_and_session_goes_live() -> None:
    s = fresh()
    t, a, _ = ids(s)
    join(s, t, "ct")
    assert s.seat(a).state is SeatState.INVITED
    join(s, a, "ca")
    assert s.seat(a).state is SeatState.CHECKING
    sm.pass_checklist(s, a, {"policy_version": "v"}, "sealed")
    assert s.seat(a).state is SeatState.WAITING and s.seat(a).details == "sealed"
    sm.admit(s, t, a)
    assert s.seat(a).state is SeatState.ADMITTED and s.state is SessionState.LIVE


def test_the_device_holding_a_seat_takes_it_over_with_its_secret() -> None:
    s = fresh()
    _, a, _ = ids(s)
    first = join(s, a, "first")
    assert first.issued and first.other is None and s.seat(a).device == "dev-first"
    again = join(s, a, "second", device="dev-first")  # the same page, reconnecting
    assert again.replaced == "first" and not again.issued and again.other is None
    assert s.seat(a).conn == "second"
    assert sm.disconnect(s, a, "first") is False  # the replaced connection no longer holds it
    assert sm.disconnect(s, a, "second") is True and s.seat(a).conn is None


def test_the_therapist_seat_is_taken_over_by_its_newest_connection() -> None:
    s = fresh()
    t, _, _ = ids(s)
    join(s, t, "first")
    assert join(s, t, "second").replaced == "first" and s.seat(t).conn == "second"


def test_checklist_only_while_checking() -> None:
    s = fresh()
    t, a, b = ids(s)
    refused(ErrorCode.INVALID_STATE, sm.pass_checklist, s, a, {}, None)  # not connected yet (invited)
    to_waiting(s, a)
    refused(ErrorCode.INVALID_STATE, sm.pass_checklist, s, a, {}, None)  # already waiting
    join(s, t, "ct")
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
    join(s, a, "ca")
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
    refused(ErrorCode.DECLINED, join, s, a, "again")
    refused(ErrorCode.INVALID_STATE, sm.decline, s, t, a)
    sm.allow_return(s, t, a)
    assert s.seat(a).state is SeatState.INVITED and s.seat(a).checklist is None
    join(s, a, "again")
    assert s.seat(a).state is SeatState.CHECKING


def test_removed_client_cannot_come_back_until_allowed() -> None:
    s = fresh()
    t, a, _ = ids(s)
    to_waiting(s, a)
    sm.admit(s, t, a)
    sm.remove(s, t, a)
    assert s.seat(a).state is SeatState.REMOVED
    refused(ErrorCode.REMOVED, join, s, a, "again")
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
    join(s, a, "back", device=f"dev-conn-{a}")
    assert s.seat(a).state is SeatState.WAITING  # checklist kept, admission needed again


def test_leave_before_checklist_returns_to_checking() -> None:
    s = fresh()
    _, a, _ = ids(s)
    join(s, a, "ca")
    sm.leave(s, a)
    join(s, a, "cb", device="dev-ca")
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
    join(s, t, "ct")
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
    refused(ErrorCode.SESSION_ENDED, join, s, a, "late")
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


# ---------------------------------------------------------------- a seat's other device


def admitted_seat(s: sm.Session) -> tuple[str, str]:
    """Therapist connected, client ``a`` admitted from connection ``conn-a`` (device ``dev-conn-a``)."""
    t, a, _ = ids(s)
    join(s, t, "ct")
    to_waiting(s, a)
    sm.admit(s, t, a)
    return t, a


def test_a_join_without_the_seats_secret_does_not_take_the_seat() -> None:
    """Review finding 1: a second join with a client's token (a forwarded link) was admitted at once."""
    s = fresh()
    t, a = admitted_seat(s)
    other = join(s, a, "stranger")
    seat = s.seat(a)
    assert other.other is not None and other.issued and other.replaced is None
    assert other.state is SeatState.CHECKING  # through the checklist again, on its own
    assert seat.state is SeatState.ADMITTED and seat.conn == f"conn-{a}" and seat.device == f"dev-conn-{a}"
    assert sm.device_for(s, a, "stranger") is seat.other
    refused(ErrorCode.NOT_ADMITTED, sm.can_relay, s, a, t, "stranger")
    sm.can_relay(s, a, t, f"conn-{a}")


def test_a_client_who_dropped_without_leaving_is_not_replaced_by_a_new_join() -> None:
    """Review finding 1: the next join after a drop (no ``leave``) was admitted directly."""
    s = fresh()
    t, a = admitted_seat(s)
    assert sm.disconnect(s, a, f"conn-{a}") is True
    newcomer = join(s, a, "newcomer")
    assert newcomer.other is not None and newcomer.state is SeatState.CHECKING
    assert s.seat(a).conn is None and s.seat(a).state is SeatState.ADMITTED
    back = join(s, a, "back", device=f"dev-conn-{a}")  # the real client's page, with its secret
    assert back.other is None and back.state is SeatState.ADMITTED and not back.issued


def test_admitting_the_other_device_moves_the_seat_to_it() -> None:
    s = fresh()
    t, a = admitted_seat(s)
    other = join(s, a, "phone").other
    assert other is not None
    refused(ErrorCode.INVALID_STATE, sm.admit_other, s, t, a, other.id)  # still checking
    sm.pass_checklist(s, a, {"policy_version": "v", "all_required_met": True}, "sealed-2", "phone")
    assert other.state is SeatState.WAITING and s.seat(a).details is None
    refused(ErrorCode.INVALID_STATE, sm.admit_other, s, t, a, "not-it")
    refused(ErrorCode.NOT_ALLOWED, sm.admit_other, s, a, a, other.id)  # only the therapist
    assert sm.admit_other(s, t, a, other.id) == f"conn-{a}"
    seat = s.seat(a)
    assert seat.conn == "phone" and seat.device == "dev-phone" and seat.other is None
    assert seat.details == "sealed-2" and seat.state is SeatState.ADMITTED
    refused(ErrorCode.REPLACED, join, s, a, "old-page-back", f"dev-conn-{a}")
    assert join(s, a, "phone-again", device="dev-phone").other is None


def test_turning_the_other_device_away_bars_others_until_allowed() -> None:
    s = fresh()
    t, a = admitted_seat(s)
    other = join(s, a, "stranger").other
    assert other is not None
    assert sm.decline_other(s, t, a, other.id) == "stranger"
    seat = s.seat(a)
    assert seat.other is None and seat.others_barred and seat.state is SeatState.ADMITTED
    refused(ErrorCode.DECLINED, join, s, a, "stranger-again")
    assert join(s, a, "holder-back", device=f"dev-conn-{a}").other is None  # the holder is not barred
    sm.allow_return(s, t, a)
    assert not s.seat(a).others_barred and s.seat(a).state is SeatState.ADMITTED
    assert join(s, a, "asks-again").other is not None


def test_the_newest_other_device_replaces_an_earlier_one_and_a_secret_resumes_it() -> None:
    s = fresh()
    _, a = admitted_seat(s)
    first = join(s, a, "one").other
    assert first is not None
    second = join(s, a, "two")
    assert second.replaced == "one" and second.other is not None and second.other.id != first.id
    assert sm.disconnect(s, a, "two") is True and s.seat(a).other is not None
    back = join(s, a, "two-back", device="dev-two")
    assert back.other is s.seat(a).other and back.replaced is None and not back.issued


def test_an_other_device_that_leaves_just_goes() -> None:
    s = fresh()
    _, a = admitted_seat(s)
    join(s, a, "stranger")
    sm.leave(s, a, "stranger")
    assert s.seat(a).other is None and s.seat(a).state is SeatState.ADMITTED
    refused(ErrorCode.INVALID_STATE, sm.leave, s, a, "unknown-connection")


def test_declining_removing_and_revoking_a_seat_send_its_other_device_away_too() -> None:
    for step in ("decline", "remove", "revoke"):
        s = fresh()
        t, a, _ = ids(s)
        join(s, t, "ct")
        to_waiting(s, a)
        if step == "remove":
            sm.admit(s, t, a)
        join(s, a, "stranger")
        assert s.seat(a).other is not None
        if step == "revoke":
            sm.revoke(s, a)
            assert s.seat(a).device is None and s.seat(a).conn is None
        else:
            getattr(sm, step)(s, t, a)
        assert s.seat(a).other is None


def test_allowing_a_removed_client_back_lets_any_device_claim_the_seat() -> None:
    s = fresh()
    t, a = admitted_seat(s)
    sm.remove(s, t, a)
    sm.allow_return(s, t, a)
    seat = s.seat(a)
    assert seat.device is None and seat.state is SeatState.INVITED
    claim = join(s, a, "new-phone")
    assert claim.other is None and claim.issued and s.seat(a).device == "dev-new-phone"
