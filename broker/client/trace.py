"""An optional trace of how a client's calls were set up: its signaling frames and its connections' states.

Off by default: a client records nothing until a caller gives it a ``SetupTrace`` (``client.trace``,
before ``connect``). Made to find a rare failed set-up (tests/store/test_cross_broker_soak.py): when a
call does not connect, the trace of both sides says which frame was missing or which state stuck.

It keeps only what says how a set-up went: message types, ``seq`` and counters, opaque peer ids, error
codes, seat states, connection states, timestamps, and how many ICE candidates each description
carried, by type. Never an SDP body, a candidate line, a token, a resume secret, a link key, a
sealed payload or anything a person wrote.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from broker.signaling.protocol import Error, Peers, Status, server_message_types

if TYPE_CHECKING:
    from broker.client.peers import PeerLink


class _TypeOnly(msgspec.Struct):
    """Any JSON object, read for its ``type`` alone (other members are skipped, not checked)."""

    type: str | None = None


_type_decoder = msgspec.json.Decoder(_TypeOnly)
_SERVER_TYPES = frozenset(server_message_types())


def server_type_of(data: str | bytes) -> str:
    """The ``type`` of a frame the broker sent, for logs: one of the server messages' names, else "unknown"."""
    try:
        kind = _type_decoder.decode(data).type
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError, UnicodeError):
        return "unknown"
    return kind if kind in _SERVER_TYPES else "unknown"


#: What a frame may show of itself in the trace (all content-free); anything else is left out.
_FIELDS = ("peer", "to", "from_", "seq", "counter", "n")


@dataclass(frozen=True)
class TraceEvent:
    """One thing that happened: ``at`` seconds after the trace began."""

    at: float
    kind: str  # "sent", "received", "socket", or "state"
    what: str  # the message type, or which state changed ("ice", "dtls", "connection", ...)
    detail: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        details = " ".join(f"{k}={v}" for k, v in self.detail.items())
        return f"{self.at * 1000:9.1f} ms  {self.kind:<8} {self.what:<12} {details}".rstrip()


def message_type(message: msgspec.Struct) -> str:
    """The message's wire type (its tag)."""
    return str(type(message).__struct_config__.tag)


def candidate_counts(sdp: str | None) -> dict[str, int]:
    """How many ICE candidates a description carries, by type (host, srflx, relay, ...): counts only."""
    counts: Counter[str] = Counter()
    for line in (sdp or "").splitlines():
        if line.startswith("a=candidate:"):
            words = line.split()
            kind = words[words.index("typ") + 1] if "typ" in words[:-1] else "unknown"
            counts[kind] += 1
    return dict(counts)


class SetupTrace:
    """The content-free record of one client's signaling and connection states, in order."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self.started = clock()
        self.events: list[TraceEvent] = []

    def _add(self, kind: str, what: str, **detail: Any) -> None:
        self.events.append(TraceEvent(round(self._clock() - self.started, 4), kind, what, detail))

    def socket(self, what: str, **detail: Any) -> None:
        """The WebSocket to a broker opened or closed (``broker`` is the index of its URL, never the URL)."""
        self._add("socket", what, **detail)

    def sent(self, message: msgspec.Struct) -> None:
        self._add("sent", message_type(message), **self._fields(message))

    def received(self, message: msgspec.Struct) -> None:
        self._add("received", message_type(message), **self._fields(message))

    def _fields(self, message: msgspec.Struct) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for name in _FIELDS:
            value = getattr(message, name, None)
            if value is not None:
                found[name.rstrip("_")] = value
        if getattr(message, "sealed", None) is not None:
            found["sealed"] = True
        if isinstance(message, Peers):
            found["peers"] = ",".join(
                f"{p.peer}:{'on' if p.connected else 'off'}{':offer' if p.you_offer else ''}" for p in message.peers
            )
        elif isinstance(message, Status):
            found["seat"] = message.seat_state.value
        elif isinstance(message, Error):
            found["code"] = message.code.value
        return found

    def watch(self, link: PeerLink) -> None:
        """Record the states of a new peer-to-peer connection as they change: signaling (with the
        candidate counts of each description), ICE gathering and connection, DTLS, the data channel."""
        pc, peer = link.pc, link.peer
        self._add("state", "link", peer=peer, offerer=link.offerer)

        watched: list[Any] = []

        def watch_dtls() -> None:
            """The data channel's DTLS transport; with BUNDLE it becomes the first media section's
            once the descriptions are set, so it is looked for again at each signaling change."""
            dtls = pc.sctp.transport if pc.sctp is not None else None
            if dtls is None or any(dtls is seen for seen in watched):
                return
            watched.append(dtls)

            def on_dtls() -> None:
                self._add("state", "dtls", peer=peer, state=dtls.state)

            dtls.on("statechange", on_dtls)

        @pc.on("signalingstatechange")
        def on_signaling() -> None:
            watch_dtls()
            local, remote = pc.localDescription, pc.remoteDescription
            self._add(
                "state",
                "signaling",
                peer=peer,
                state=pc.signalingState,
                local=candidate_counts(local.sdp if local else None),
                remote=candidate_counts(remote.sdp if remote else None),
            )

        @pc.on("icegatheringstatechange")
        def on_gathering() -> None:
            self._add("state", "gathering", peer=peer, state=pc.iceGatheringState)

        @pc.on("iceconnectionstatechange")
        def on_ice() -> None:
            self._add("state", "ice", peer=peer, state=pc.iceConnectionState)

        @pc.on("connectionstatechange")
        def on_connection() -> None:
            self._add("state", "connection", peer=peer, state=pc.connectionState)

        watch_dtls()

        def on_open() -> None:
            self._add("state", "channel", peer=peer, state="open")

        def on_close() -> None:
            self._add("state", "channel", peer=peer, state="closed")

        link.channel.on("open", on_open)
        link.channel.on("close", on_close)

    def lines(self) -> list[str]:
        return [event.line() for event in self.events]

    def as_json(self) -> list[dict[str, Any]]:
        return [{"at": e.at, "kind": e.kind, "what": e.what, **e.detail} for e in self.events]
