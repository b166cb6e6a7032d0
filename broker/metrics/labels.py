"""The only values a metric's label may take: small fixed sets, each an enum.

A label value is never built from what a peer sent or from an id: it is one of these members,
so a metric cannot carry a session id, peer id, therapist id, token or address by construction
(tests/metrics/test_metrics.py checks every exported sample against ``ALLOWED``).
"""

from __future__ import annotations

from enum import Enum

from broker.signaling.protocol import ErrorCode


class SessionPhase(str, Enum):
    """What a session held by this process is doing (``broker_sessions``)."""

    SCHEDULED = "scheduled"  # nobody admitted and no client waiting yet (peers joining, checklists)
    WAITING = "waiting"  # a client waits in the waiting room, nobody is in the call yet
    LIVE = "live"  # a client was admitted: the call is on


class ConnectionRole(str, Enum):
    THERAPIST = "therapist"
    CLIENT = "client"
    NONE = "none"  # not joined yet


class JoinOutcome(str, Enum):
    """``ok``, or the error code a refused join was answered with."""

    OK = "ok"


#: A join's outcome label: ``ok`` or one of the wire error codes.
JOIN_OUTCOMES = (JoinOutcome.OK.value, *(code.value for code in ErrorCode))


class Decision(str, Enum):
    """The therapist's admission decisions (``broker_admissions_total``)."""

    ADMITTED = "admitted"
    DECLINED = "declined"
    REMOVED = "removed"
    ALLOWED_BACK = "allowed_back"


class RelayKind(str, Enum):
    OFFER = "offer"
    ANSWER = "answer"
    CANDIDATE = "candidate"
    RENEGOTIATE = "renegotiate"
    ROSTER = "roster"


class CloseCode(str, Enum):
    """WebSocket close codes, as the broker sent or received them; anything else is ``other``."""

    NORMAL = "1000"
    GOING_AWAY = "1001"
    NO_STATUS = "1005"
    ABNORMAL = "1006"
    POLICY = "1008"
    TOO_BIG = "1009"
    INTERNAL = "1011"
    RESTART = "1012"
    REPLACED = "4001"
    UNWELCOME = "4003"
    AUTH_TIMEOUT = "4008"
    TOO_SLOW = "4009"
    ENDED = "4010"
    FLOOD = "4029"
    OTHER = "other"

    @classmethod
    def of(cls, code: int | None) -> CloseCode:
        """The label of a close code; None (no close frame at all) counts as 1006, as browsers report it."""
        try:
            return cls(str(1006 if code is None else code))
        except ValueError:
            return cls.OTHER


class PreflightOutcome(str, Enum):
    CONNECTED = "connected"  # the data channel opened and pings came back
    FAILED = "failed"  # it ran and did not connect (or its result never came)
    BUSY = "busy"  # refused: every slot taken (preflight_busy)
    LIMITED = "limited"  # refused: the seat's own limit (preflight_limited)
    REFUSED = "refused"  # refused: a bad or media offer (preflight_refused)


class StoreOperation(str, Enum):
    """The store's operations (broker/store/base.py), as the Redis store times them."""

    GET = "get"
    PUT = "put"
    UPDATE = "update"
    DELETE_PREFIX = "delete_prefix"
    KEYS = "keys"
    INCR_WINDOW = "incr_window"
    APPEND = "append"
    READ_SINCE = "read_since"
    CLEAR_LOG = "clear_log"
    TRIM_LOG = "trim_log"


class LoginOutcome(str, Enum):
    OK = "ok"  # logged in (fully, or to set up a second factor)
    SECOND_FACTOR_REQUIRED = "second_factor_required"  # the password was right; a code or passkey is asked for
    INVALID = "invalid"  # wrong name, password, code or passkey
    THROTTLED = "throttled"  # refused by the throttle or a lockout before any check


class ThrottleLimit(str, Enum):
    """Which limit refused something (``broker_throttled_total``)."""

    WEBSOCKET_PER_ADDRESS = "websocket_per_address"  # BROKER_MAX_CONNECTIONS_PER_ADDRESS
    HTTP_PER_ADDRESS = "http_per_address"  # BROKER_MAX_HTTP_CONNECTIONS_PER_ADDRESS
    MESSAGES = "messages"  # a connection's message budget (BROKER_RATE_PER_S, BROKER_RATE_BURST)
    LOGIN = "login"  # the login throttle and lockout


class Generation(str, Enum):
    """The cyclic garbage collector's generations."""

    YOUNG = "0"
    MIDDLE = "1"
    OLD = "2"


def values(enum: type[Enum]) -> tuple[str, ...]:
    return tuple(str(member.value) for member in enum)


#: Every label name a broker metric uses, with every value it may take (the test's rule).
ALLOWED: dict[str, frozenset[str]] = {
    "state": frozenset(values(SessionPhase)),
    "role": frozenset(values(ConnectionRole)),
    "outcome": frozenset(JOIN_OUTCOMES) | frozenset(values(PreflightOutcome)) | frozenset(values(LoginOutcome)),
    "decision": frozenset(values(Decision)),
    "type": frozenset(values(RelayKind)),
    "code": frozenset(code.value for code in ErrorCode) | frozenset(values(CloseCode)),
    "operation": frozenset(values(StoreOperation)),
    "limit": frozenset(values(ThrottleLimit)),
    "generation": frozenset(values(Generation)),
}
