"""The signaling wire protocol: one typed definition per message.

Every WebSocket text frame is one JSON object whose ``type`` field names one of the structs below.
``docs/protocol.md`` documents them field by field; ``tests/test_protocol_doc.py`` fails if they drift.
Client messages are decoded strictly (unknown fields and wrong types are errors). The broker never trusts
a sender field from a client: relayed messages get ``from`` overwritten with the sender's peer id.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, ClassVar, Literal, NamedTuple, get_args

import msgspec

from broker.signaling.media_message import MediaJanus as MediaJanus
from broker.signaling.wire_types import (
    MAX_MESSAGE_BYTES as MAX_MESSAGE_BYTES,
)
from broker.signaling.wire_types import (
    PROTOCOL_VERSION as PROTOCOL_VERSION,
)
from broker.signaling.wire_types import (
    Agent as Agent,
)
from broker.signaling.wire_types import (
    CandidateLine as CandidateLine,
)
from broker.signaling.wire_types import (
    Counter as Counter,
)
from broker.signaling.wire_types import (
    Details as Details,
)
from broker.signaling.wire_types import (
    ErrorCode as ErrorCode,
)
from broker.signaling.wire_types import (
    Id as Id,
)
from broker.signaling.wire_types import (
    ItemId as ItemId,
)
from broker.signaling.wire_types import (
    LanguageTag as LanguageTag,
)
from broker.signaling.wire_types import (
    Mac as Mac,
)
from broker.signaling.wire_types import (
    NoteSealed as NoteSealed,
)
from broker.signaling.wire_types import (
    ResumeSecret as ResumeSecret,
)
from broker.signaling.wire_types import (
    Role as Role,
)
from broker.signaling.wire_types import (
    Sdp as Sdp,
)
from broker.signaling.wire_types import (
    Sealed as Sealed,
)
from broker.signaling.wire_types import (
    SeatState as SeatState,
)
from broker.signaling.wire_types import (
    SessionState as SessionState,
)
from broker.signaling.wire_types import (
    Token as Token,
)
from broker.signaling.wire_types import (
    Version as Version,
)

# ---------------------------------------------------------------- client -> broker


class _ClientMessage(msgspec.Struct, tag_field="type", forbid_unknown_fields=True, kw_only=True):
    #: Optional correlation id, echoed as ``ref`` in an error about this message.
    id: Id | None = None


class Hello(_ClientMessage, tag="hello"):
    protocol: int
    agent: Agent | None = None


class Join(_ClientMessage, tag="join"):
    token: Token
    #: The highest relayed ``seq`` this seat has received; what came after it is sent again.
    resume: Counter | None = None
    #: The secret ``joined.resume_secret`` gave this page: proves it is the device holding the seat.
    resume_secret: ResumeSecret | None = None


class ChecklistSubmit(_ClientMessage, tag="checklist"):
    policy_version: Version
    #: What the broker must check: the required items (others may be left out, and are not kept).
    answers: dict[ItemId, bool]
    consent_version: Version | None = None
    details: Details | None = None
    #: Every item's answer, sealed in the browser for the therapist (docs/protocol.md 7.4).
    answers_sealed: Details | None = None
    #: The client's safety plan (optional), sealed in the browser for the therapist (7.4.3).
    safety_plan: Details | None = None
    #: The language the client read the checklist and the consent in (one the practice offers).
    language: LanguageTag | None = None


class PreflightOffer(_ClientMessage, tag="preflight_offer"):
    sdp: Sdp


class Admit(_ClientMessage, tag="admit"):
    peer: Id
    #: The seat's other device to admit instead of the seat's own (``WaitingEntry.other_device.device``).
    device: Id | None = None


class Decline(_ClientMessage, tag="decline"):
    peer: Id
    #: The seat's other device to turn away, leaving the seat's own alone.
    device: Id | None = None


class Remove(_ClientMessage, tag="remove"):
    peer: Id


class AllowReturn(_ClientMessage, tag="allow_return"):
    peer: Id


class Hold(_ClientMessage, tag="hold"):
    """Private time: the broker relays nothing to or from this admitted client until ``release``."""

    peer: Id


class Release(_ClientMessage, tag="release"):
    """Ends a hold: relaying to and from the client resumes."""

    peer: Id


class Form(NamedTuple):
    """One shape of a message that has two: the fields it must carry and those it must not."""

    name: str
    required: frozenset[str]
    forbidden: frozenset[str]


@functools.cache
def _form_checks(cls: type[msgspec.Struct]) -> tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]:
    """Per form of ``cls``: the attributes that must be set and those that must not, by attribute
    name. Worked out once per class: ``msgspec.structs.fields`` resolves the type hints on every
    call (about 150 µs, and this runs on every relayed message)."""
    attribute = dict(zip(cls.__struct_encode_fields__, cls.__struct_fields__, strict=True))
    forms: tuple[Form, ...] = getattr(cls, "forms", ())
    return tuple(
        (tuple(attribute[w] for w in sorted(form.required)), tuple(attribute[w] for w in sorted(form.forbidden)))
        for form in forms
    )


class _TwoForms(_ClientMessage):
    """A relayed message sent either in clear or sealed end to end (docs/protocol.md 6 and 7.7).

    Exactly one form must fit; a field set to null counts as absent. The broker checks
    only this outer shape and passes the message on untouched.
    """

    forms: ClassVar[tuple[Form, Form]]

    def __post_init__(self) -> None:
        for required, forbidden in _form_checks(type(self)):
            if all(getattr(self, a) is not None for a in required) and all(getattr(self, a) is None for a in forbidden):
                return
        shapes = " or ".join(
            f"{form.name} (with {' and '.join(sorted(form.required))}, without {', '.join(sorted(form.forbidden))})"
            for form in self.forms
        )
        tag = str(self.__struct_config__.tag)
        raise ValueError(f"{'an' if tag[0] in 'aeiou' else 'a'} {tag} message is either {shapes}")


def message_forms(cls: type[msgspec.Struct]) -> tuple[Form, ...]:
    """The forms of a message type (none for a message with a single shape)."""
    return getattr(cls, "forms", ())


class _Description(_TwoForms):
    """An SDP offer or answer: in clear, authenticated end to end by ``counter`` and ``mac``
    (docs/protocol.md 7.2), or sealed end to end (7.7)."""

    forms: ClassVar[tuple[Form, Form]] = (
        Form("clear", frozenset({"sdp"}), frozenset({"sealed"})),
        Form("sealed", frozenset({"sealed", "counter"}), frozenset({"sdp", "mac"})),
    )

    to: Id
    sdp: Sdp | None = None
    counter: Counter | None = None
    mac: Mac | None = None
    sealed: Sealed | None = None
    #: Set by the broker on relay (ignored from clients): the sender's peer id ...
    from_: Id | None = msgspec.field(default=None, name="from")
    #: ... and the position in the recipient's relay sequence.
    seq: Counter | None = None


class Offer(_Description, tag="offer"):
    pass


class Answer(_Description, tag="answer"):
    pass


class Candidate(_TwoForms, tag="candidate"):
    """A trickled ICE candidate, in clear or sealed end to end (docs/protocol.md 7.7)."""

    forms: ClassVar[tuple[Form, Form]] = (
        Form("clear", frozenset({"candidate"}), frozenset({"sealed", "counter"})),
        Form("sealed", frozenset({"sealed", "counter"}), frozenset({"candidate", "sdp_mid", "sdp_mline_index"})),
    )

    to: Id
    #: An ICE candidate line; the empty string signals end of candidates.
    candidate: CandidateLine | None = None
    sdp_mid: Annotated[str, msgspec.Meta(max_length=64)] | None = None
    sdp_mline_index: Annotated[int, msgspec.Meta(ge=0, le=255)] | None = None
    counter: Counter | None = None
    sealed: Sealed | None = None
    from_: Id | None = msgspec.field(default=None, name="from")
    seq: Counter | None = None


class Renegotiate(_ClientMessage, tag="renegotiate"):
    """Asks the offerer of a pair for a new offer (an ICE restart)."""

    to: Id
    from_: Id | None = msgspec.field(default=None, name="from")
    seq: Counter | None = None


class Roster(_ClientMessage, tag="roster"):
    """The therapist's roster for one client, sealed end to end (docs/protocol.md 7.8).

    Sealed form only: a field of the clear forms is an unknown field, so ``bad_message``.
    The broker checks only this outer shape, as for a sealed candidate.
    """

    to: Id
    counter: Counter
    sealed: Sealed
    from_: Id | None = msgspec.field(default=None, name="from")
    seq: Counter | None = None


class WaitingNote(_ClientMessage, tag="waiting_note"):
    """A word from the therapist to a client in the checking or waiting state, sealed end to end
    with that seat's pair link key (docs/protocol.md 7.4.2): the broker passes it on unread."""

    peer: Id
    sealed: NoteSealed


class Report(_ClientMessage, tag="report"):
    """A peer tells the broker it saw an interception attempt (for the audit log; content-free)."""

    event: Literal["interception_warning"]
    peer: Id
    reason: Literal[
        "missing_mac", "bad_mac", "replayed_counter", "malformed", "missing_fingerprint", "fingerprint_mismatch"
    ]


class Leave(_ClientMessage, tag="leave"):
    pass


Verification = Literal["link", "safety_code", "unverified"]


class End(_ClientMessage, tag="end"):
    #: How the therapist's side verified each peer, for the signed session record.
    verification: dict[Id, Verification] | None = None


class Ping(_ClientMessage, tag="ping"):
    n: Counter | None = None
    ack: Counter | None = None  # the highest relayed ``seq`` read: the broker may forget those (protocol.md 5)


ClientMessage = (
    Hello
    | Join
    | ChecklistSubmit
    | PreflightOffer
    | Admit
    | Decline
    | Remove
    | AllowReturn
    | Hold
    | Release
    | Offer
    | Answer
    | Candidate
    | Renegotiate
    | Roster
    | WaitingNote
    | Report
    | Leave
    | End
    | Ping
)

#: Messages the broker relays between admitted peers of one session.
RELAYED = (Offer, Answer, Candidate, Renegotiate, Roster)

#: Messages only one role may send; the other role gets ``not_allowed`` (docs/protocol.md 5).
ROLE_ONLY: dict[type[msgspec.Struct], Role] = {
    ChecklistSubmit: Role.CLIENT,
    PreflightOffer: Role.CLIENT,
    Admit: Role.THERAPIST,
    Decline: Role.THERAPIST,
    Remove: Role.THERAPIST,
    AllowReturn: Role.THERAPIST,
    Hold: Role.THERAPIST,
    Release: Role.THERAPIST,
    Roster: Role.THERAPIST,
    WaitingNote: Role.THERAPIST,
    End: Role.THERAPIST,
}


# ---------------------------------------------------------------- broker -> client


class _ServerMessage(msgspec.Struct, tag_field="type", kw_only=True):
    """Every broker message; ``MediaJanus`` (media_message.py) has the same ``type`` tag field."""


class Welcome(_ServerMessage, tag="welcome"):
    protocol: int
    heartbeat_s: float
    auth_deadline_s: float
    max_message_bytes: int


class PeerInfo(msgspec.Struct, kw_only=True):
    """An admitted peer as the other admitted peers see it."""

    peer: str
    role: Role
    connected: bool
    #: True when the receiving peer makes the offers for this pair.
    you_offer: bool
    #: A client seat taken through the group link: its pair link key is the group key.
    group: bool = False
    #: The therapist put this client on hold (private time).
    held: bool = False
    #: Opaque id of the device holding a client's seat (null for the therapist); a change: drop the old one.
    device: str | None = None


class Joined(_ServerMessage, tag="joined"):
    session: str
    peer: str
    role: Role
    seat_state: SeatState
    session_state: SessionState
    starts: int
    expires: int
    minor: bool
    ice_servers: list[dict[str, Any]]
    ice_transport_policy: Literal["all", "relay"]
    #: The checklist policy for this seat (clients only), as JSON.
    policy: dict[str, Any] | None = None
    #: When joined through a group link: this seat's own invite token, to rejoin with.
    seat_token: str | None = None
    #: A new secret to present when this page joins again (memory only); null if it presented one.
    resume_secret: str | None = None
    #: This page opened a client seat that another device holds: it waits for the therapist.
    other_device: bool = False
    #: The session's links carry a key per seat (false only for sessions scheduled before seat keys).
    seat_keys: bool = False
    #: How the session's media flows (section 3): peer to peer, or through Janus (``media_janus``).
    media: Literal["mesh", "janus"] = "mesh"


class Status(_ServerMessage, tag="status"):
    """A client's own view of where it stands; sent whenever that changes."""

    seat_state: SeatState
    session_state: SessionState
    therapist_present: bool
    #: The therapist put this client on hold (private time).
    held: bool = False


class ChecklistAccepted(_ServerMessage, tag="checklist_accepted"):
    summary: dict[str, Any]


class PreflightAnswer(_ServerMessage, tag="preflight_answer"):
    sdp: str


class OtherDeviceEntry(msgspec.Struct, kw_only=True):
    """A second device that opened a client's link without that seat's resume secret."""

    #: Names it in ``admit``/``decline`` (``device`` field).
    device: str
    state: SeatState
    connected: bool
    checklist: dict[str, Any] | None = None
    details: str | None = None


class WaitingEntry(msgspec.Struct, kw_only=True):
    peer: str
    state: SeatState
    connected: bool
    minor: bool
    #: Taken through the group link: its pair link key is the group key.
    group: bool = False
    #: On hold (private time).
    held: bool = False
    #: Checklist summary once the client has passed the checklist.
    checklist: dict[str, Any] | None = None
    #: Emergency details, sealed in the client's browser for the therapist.
    details: str | None = None
    #: Another device asking for this seat (the link was opened elsewhere), if any.
    other_device: OtherDeviceEntry | None = None
    #: The therapist turned another device away; ``allow_return`` lets one ask again.
    other_device_declined: bool = False


class WaitingRoom(_ServerMessage, tag="waiting_room"):
    """The therapist's view of every client seat; sent whenever one changes."""

    seats: list[WaitingEntry]


class Peers(_ServerMessage, tag="peers"):
    """The admitted peers an admitted peer should be connected to."""

    peers: list[PeerInfo]


class Declined(_ServerMessage, tag="declined"):
    pass


class Removed(_ServerMessage, tag="removed"):
    pass


class SessionEnded(_ServerMessage, tag="session_ended"):
    reason: Literal["ended", "expired", "cancelled"]


class SessionRecord(_ServerMessage, tag="session_record"):
    """Sent to the therapist as the session ends: what happened, signed by the broker (Ed25519)."""

    record: dict[str, Any]
    signature: str
    key_id: str


class TherapistNote(_ServerMessage, tag="therapist_note"):
    """The therapist's word to this waiting client, as sealed in their page (docs/protocol.md 7.4.2)."""

    sealed: str


class Pong(_ServerMessage, tag="pong"):
    n: int | None = None


class Reconnect(_ServerMessage, tag="reconnect"):
    """The broker process is going away: reconnect (to any process) after a pause."""

    reason: str
    after_ms: int


class Error(_ServerMessage, tag="error"):
    code: ErrorCode
    message: str
    #: The ``id`` of the client message this error is about, if it had one.
    ref: str | None = None
    #: When sending the same again can work after a wait: at least this many milliseconds.
    retry_after_ms: int | None = None


ServerMessage = (
    Welcome
    | Joined
    | Status
    | ChecklistAccepted
    | PreflightAnswer
    | WaitingRoom
    | Peers
    | Declined
    | Removed
    | SessionRecord
    | SessionEnded
    | TherapistNote
    | Pong
    | Reconnect
    | MediaJanus
    | Error
    | Offer
    | Answer
    | Candidate
    | Renegotiate
    | Roster
)

# ---------------------------------------------------------------- codecs

_client_decoder = msgspec.json.Decoder(ClientMessage)
_server_decoder = msgspec.json.Decoder(ServerMessage)
_encoder = msgspec.json.Encoder()


class ProtocolError(Exception):
    """A message or action the broker refuses; carries a stable code (and, for a limit, when to try again).

    ``ref`` is the ``id`` of a refused frame that could not be decoded but whose ``id`` was readable.
    """

    def __init__(
        self, code: ErrorCode, message: str, retry_after_ms: int | None = None, *, ref: str | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms
        self.ref = ref


class _IdOnly(msgspec.Struct):
    """Any JSON object, read for its ``id`` alone (other members are skipped, not checked)."""

    id: Id | None = None


_id_decoder = msgspec.json.Decoder(_IdOnly)


def readable_id(data: str | bytes) -> str | None:
    """The ``id`` of a frame the strict decoder refused, when the frame is a JSON object holding a
    valid one: the error about it then names it as ``ref``. Nothing else of the frame is accepted."""
    try:
        return _id_decoder.decode(data).id
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError, UnicodeError):
        return None


def decode_client(data: str | bytes) -> ClientMessage:
    """Decode one client frame, raising ProtocolError(bad_message) with the reason (and the
    frame's ``id`` as ``ref`` when it is readable)."""
    try:
        return _client_decoder.decode(data)
    except msgspec.ValidationError as exc:
        reason = f"Invalid message: {exc}"
    except msgspec.DecodeError:
        reason = "Invalid message: not a JSON object"
    except RecursionError:  # nesting deep enough to exhaust the decoder's stack
        reason = "Invalid message: nested too deeply"
    except UnicodeError:  # text that is not valid Unicode (a lone surrogate)
        reason = "Invalid message: not valid UTF-8 text"
    raise ProtocolError(ErrorCode.BAD_MESSAGE, reason, ref=readable_id(data))


def decode_server(data: str | bytes) -> ServerMessage:
    """Decode one broker frame (used by the Python client)."""
    return _server_decoder.decode(data)


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


def client_message_types() -> dict[str, type[msgspec.Struct]]:
    """Every client message type by its wire name (for docs and fuzzing)."""
    return {t.__struct_config__.tag: t for t in get_args(ClientMessage)}


def server_message_types() -> dict[str, type[msgspec.Struct]]:
    """Every broker message type by its wire name (for docs and fuzzing)."""
    return {t.__struct_config__.tag: t for t in get_args(ServerMessage)}
