"""The wire's vocabulary: field types with their limits, error codes, roles and states.

Kept apart from the message definitions in protocol.py (which re-exports every name here)
so that each file stays readable; docs/protocol.md sections 3, 11 and 13 document them.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import msgspec

PROTOCOL_VERSION = 1

#: Largest text frame the broker accepts, in bytes.
MAX_MESSAGE_BYTES = 64 * 1024

# Field size limits (bytes or characters), generous for real SDP.
# Patterns end in \Z, not $: msgspec matches with re.search, and $ also matches before a final newline.
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+\Z")]
Token = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Sdp = Annotated[str, msgspec.Meta(max_length=48 * 1024)]
Mac = Annotated[str, msgspec.Meta(max_length=128)]
Counter = Annotated[int, msgspec.Meta(ge=0, le=2**53 - 1)]
CandidateLine = Annotated[str, msgspec.Meta(max_length=1024)]
#: base64url without padding of nonce || ciphertext || tag (docs/protocol.md 7.7): never a length
#: of 1 mod 4, and no stray bits in the last character. 65,000 keeps a sealed frame under 64 KiB.
Sealed = Annotated[
    str,
    msgspec.Meta(
        min_length=40,
        max_length=65_000,
        pattern=r"^(?:[A-Za-z0-9_\-]{4})*(?:[A-Za-z0-9_\-][AQgw]|[A-Za-z0-9_\-]{2}[AEIMQUYcgkosw048])?\Z",
    ),
]
#: A word to the waiting room sealed end to end (docs/protocol.md 7.4.2): base64url as ``Sealed``,
#: 40-2,400 characters: room for 280 characters of text even if each takes 6 bytes of JSON.
NoteSealed = Annotated[
    str,
    msgspec.Meta(
        min_length=40,
        max_length=2400,
        pattern=r"^(?:[A-Za-z0-9_\-]{4})*(?:[A-Za-z0-9_\-][AQgw]|[A-Za-z0-9_\-]{2}[AEIMQUYcgkosw048])?\Z",
    ),
]
ItemId = Annotated[str, msgspec.Meta(min_length=1, max_length=40, pattern=r"^[a-z0-9_]+\Z")]
Version = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Details = Annotated[str, msgspec.Meta(max_length=8192)]
Agent = Annotated[str, msgspec.Meta(max_length=64)]
#: A language tag as the client's pages use them (broker/i18n/catalogue.py LANGUAGE_TAG).
LanguageTag = Annotated[
    str, msgspec.Meta(max_length=12, pattern=r"^[a-z]{2,3}(-[A-Z][a-z]{3})?(-([A-Z]{2}|[0-9]{3}))?\Z")
]
#: A resume secret: 32 random bytes, base64url without padding.
ResumeSecret = Annotated[str, msgspec.Meta(min_length=43, max_length=43, pattern=r"^[A-Za-z0-9_\-]+\Z")]


class ErrorCode(str, Enum):
    """Stable error codes. Clients branch on these, never on message text."""

    BAD_MESSAGE = "bad_message"
    UNSUPPORTED_PROTOCOL = "unsupported_protocol"
    HELLO_REQUIRED = "hello_required"
    AUTH_TIMEOUT = "auth_timeout"
    ALREADY_JOINED = "already_joined"
    NOT_JOINED = "not_joined"
    INVALID_TOKEN = "invalid_token"
    NO_SEATS_LEFT = "no_seats_left"
    TOKEN_EXPIRED = "token_expired"
    TOKEN_NOT_YET_VALID = "token_not_yet_valid"
    SESSION_ENDED = "session_ended"
    SESSION_NOT_FOUND = "session_not_found"
    SESSION_CANCELLED = "session_cancelled"
    NOT_ALLOWED = "not_allowed"
    DECLINED = "declined"
    REMOVED = "removed"
    NOT_ADMITTED = "not_admitted"
    NOT_IN_SESSION = "not_in_session"
    INVALID_STATE = "invalid_state"
    NOT_OFFERER = "not_offerer"
    ON_HOLD = "on_hold"
    REPLACED = "replaced"
    TOO_MANY_REQUESTS = "too_many_requests"
    MESSAGE_TOO_BIG = "message_too_big"
    POLICY_OUTDATED = "policy_outdated"
    CHECKLIST_INCOMPLETE = "checklist_incomplete"
    CHECKLIST_UNKNOWN_ITEM = "checklist_unknown_item"
    CONSENT_OUTDATED = "consent_outdated"
    DETAILS_MISSING = "details_missing"
    DETAILS_INVALID = "details_invalid"
    PREFLIGHT_MISSING = "preflight_missing"
    PREFLIGHT_FAILED = "preflight_failed"
    PREFLIGHT_REFUSED = "preflight_refused"
    PREFLIGHT_BUSY = "preflight_busy"
    PREFLIGHT_LIMITED = "preflight_limited"
    UNAVAILABLE = "unavailable"
    JANUS_UNAVAILABLE = "janus_unavailable"
    INTERNAL = "internal"


class Role(str, Enum):
    THERAPIST = "therapist"
    CLIENT = "client"


class SeatState(str, Enum):
    """Where a seat stands in the session (see docs/protocol.md, 'Seat states')."""

    INVITED = "invited"
    CHECKING = "checking"
    WAITING = "waiting"
    ADMITTED = "admitted"
    LEFT = "left"
    DECLINED = "declined"
    REMOVED = "removed"


class SessionState(str, Enum):
    SCHEDULED = "scheduled"
    OPEN = "open"
    LIVE = "live"
    ENDED = "ended"
