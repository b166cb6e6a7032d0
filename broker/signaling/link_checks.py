"""Which window judges an invite token, and what a token whose session is gone is told.

A token carries the window it was issued with, but a session can move to another time after its
links went out (``Hub.reschedule_session``). So a seat's own token (or the group link) is judged
by the session record's window while the record exists, and every other authentic token (revoked,
or of another seat that never was) by its own window, then ``invalid_token``, as before. Once the
record is gone the token's own window answers first, then a cancellation mark, then whatever the
broker says of a missing session (``invalid_token``, or ``session_not_found`` after a lost store).
"""

from __future__ import annotations

from collections.abc import Callable

from broker.signaling import session as sm
from broker.signaling.cancelled import cancelled_error, was_cancelled
from broker.signaling.protocol import ProtocolError
from broker.signaling.session import Session
from broker.signaling.tokens import TokenClaims, check_window
from broker.store.base import Store


def seat_for(session: Session, claims: TokenClaims, now: float) -> sm.Seat:
    """The seat a (non-group) token opens, within the session's window; the refusal it earns otherwise."""
    try:
        seat = sm.seat_for_token(session, claims.token_id)
    except ProtocolError:
        check_window(claims.not_before, claims.expires, now)
        raise
    check_window(session.not_before, session.expires, now)
    return seat


async def gone_error(
    store: Store, claims: TokenClaims, now: float, missing: Callable[[TokenClaims], ProtocolError]
) -> ProtocolError:
    """For an authentic token without a session record: its own window, a cancellation, else ``missing``."""
    check_window(claims.not_before, claims.expires, now)
    return cancelled_error() if await was_cancelled(store, claims.session_id) else missing(claims)
