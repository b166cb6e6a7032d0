"""The mark a cancelled session leaves behind, so that its links say "cancelled" rather than "not valid".

Cancelling ends a session like ``end`` does (every key of it goes), but a client opening their
link afterwards should learn why it no longer works. The mark is one key per session
(``CANCELLED_PREFIX`` + session id) holding nothing else, kept until the session's window would
have closed; after that the link's own window answers ``token_expired`` as for any old link.
"""

from __future__ import annotations

from broker.signaling.protocol import ErrorCode, ProtocolError
from broker.store.base import CANCELLED_PREFIX, Store

#: What a link of a cancelled session answers, on its page and to ``join``.
CANCELLED_MESSAGE = "This session was cancelled by your therapist. Please contact them if you need a new appointment."


def cancelled_error() -> ProtocolError:
    return ProtocolError(ErrorCode.SESSION_CANCELLED, CANCELLED_MESSAGE)


async def mark_cancelled(store: Store, session_id: str, ttl_s: float) -> None:
    await store.put(CANCELLED_PREFIX + session_id, b"1", max(1.0, ttl_s))


async def was_cancelled(store: Store, session_id: str) -> bool:
    return await store.get(CANCELLED_PREFIX + session_id) is not None
