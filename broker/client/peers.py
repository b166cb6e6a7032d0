"""The Python client's peer-to-peer side: one aiortc connection per admitted peer.

Signaling (what is sent and opened, and what is trusted) is the client's
(``broker_client``); this is what it drives: the connection and its negotiated data
channel ("chat"), the control messages that come over it (docs/protocol.md 7.5, and the
therapist's roster, 7.8), candidates held until their connection has the peer's
description, and pausing media for private time (7.9). Every connection of one client uses
the one DTLS certificate it is given, so its fingerprint is the same with every peer (7.8).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiortc import (
    RTCCertificate,
    RTCConfiguration,
    RTCIceServer,
    RTCIceTransportPolicy,
    RTCPeerConnection,
    RTCRtpSender,
)
from aiortc.mediastreams import MediaStreamTrack
from aiortc.sdp import candidate_from_sdp

from broker.crypto.sdp_auth import fingerprint_of, safety_code

CHAT_LABEL = "chat"
CHAT_CHANNEL_ID = 0
MAX_CHAT_CHARS = 2000
MAX_CONTROL_BYTES = 8192
#: No data-channel message of docs/protocol.md 7.5 nests deeper than a few levels.
MAX_CONTROL_NESTING = 32


def nesting(text: str) -> int:
    """How deep ``text``'s JSON arrays and objects nest at most (brackets inside strings not counted).

    Counted in one flat pass, so a hostile peer's ``[[[[...`` is refused before ``json.loads``: its
    recursion would run the process's stack to its limit, where anything else that runs then (a
    garbage collector callback) fails too."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


@dataclass(frozen=True)
class HeldCandidate:
    """A candidate (already opened if it came sealed) waiting for its connection's description."""

    line: str
    sdp_mid: str | None
    sdp_mline_index: int | None
    sealed: bool


@dataclass(eq=False)
class PeerLink:
    """The peer-to-peer connection with one other admitted peer."""

    peer: str
    pc: RTCPeerConnection
    offerer: bool
    channel: Any = None
    trust: str | None = None
    remote_tracks: list[MediaStreamTrack] = field(default_factory=list)
    messages: asyncio.Queue[str] = field(default_factory=asyncio.Queue)
    channel_open: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False
    #: We seal what we send on this connection: we offered with the link key, or the offer came sealed.
    sealing: bool = False
    #: The peer's description on this connection came sealed: clear candidates from it are dropped.
    remote_sealed: bool = False
    #: What the peer last said of its microphone and camera.
    remote_media: dict[str, bool] = field(default_factory=lambda: {"audio": True, "video": True})
    #: Our senders on this connection and the track each sends when not paused.
    local_tracks: list[tuple[RTCRtpSender, MediaStreamTrack]] = field(default_factory=list)
    #: Private time (7.9): we send no media on this connection and take none of its media or chat.
    paused: bool = False
    #: Called with (counter, sealed) for a roster that came over the chat channel (7.8).
    on_roster: Callable[[int, str], None] | None = None

    @property
    def remote_fingerprint(self) -> str | None:
        """The peer's DTLS fingerprint as its description on this connection gave it, once set."""
        remote = self.pc.remoteDescription
        return fingerprint_of(remote.sdp) if remote is not None else None

    def add_track(self, track: MediaStreamTrack) -> None:
        """Send ``track`` on this connection (not while paused: the sender then stays empty)."""
        sender = self.pc.addTrack(track)
        self.local_tracks.append((sender, track))
        if self.paused:
            sender.replaceTrack(None)

    def set_paused(self, paused: bool) -> None:
        """Stop or resume our media on this connection, on the same senders (nothing renegotiated).

        Paused: every sender is emptied (``replaceTrack(None)``: no RTP goes out, the
        transceivers and DTLS stay) and the peer's media and chat are not taken.
        Resumed: each sender gets its track back (``replaceTrack(track)``).
        """
        if paused == self.paused:
            return
        self.paused = paused
        for sender, track in self.local_tracks:
            sender.replaceTrack(None if paused else track)

    def safety_code(self, session_id: str) -> str | None:
        local, remote = self.pc.localDescription, self.pc.remoteDescription
        if local is None or remote is None:
            return None
        return safety_code(session_id, fingerprint_of(local.sdp), fingerprint_of(remote.sdp))

    def on_control(self, data: Any) -> None:
        """A message on the data channel: chat text or media state (docs/protocol.md 7.5); anything else is ignored."""
        if not isinstance(data, str) or len(data) > MAX_CONTROL_BYTES or nesting(data) > MAX_CONTROL_NESTING:
            return  # too deep for any message of 7.5: never handed to a recursive parser near its stack's end
        try:
            message = json.loads(data)
        except (ValueError, RecursionError):  # malformed, or nested past the parser's stack
            return
        if not isinstance(message, dict):
            return
        kind = message.get("t")
        if kind == "roster":
            counter, sealed = message.get("counter"), message.get("sealed")
            if (
                isinstance(counter, int)
                and not isinstance(counter, bool)
                and isinstance(sealed, str)
                and self.on_roster
            ):
                self.on_roster(counter, sealed)
            return
        if self.paused:
            return  # private time: nothing from this peer is shown
        if kind == "chat" and isinstance(message.get("text"), str):
            self.messages.put_nowait(message["text"][:MAX_CHAT_CHARS])
        elif kind == "media":
            self.remote_media = {
                "audio": message.get("audio") is not False,
                "video": message.get("video") is not False,
            }

    async def add_candidate(self, held: HeldCandidate) -> None:
        """Give the connection a candidate once it has the peer's description; a line aiortc cannot read is dropped."""
        line = held.line
        if not line:
            return
        try:
            candidate = candidate_from_sdp(line.split(":", 1)[1] if line.startswith("candidate:") else line)
        except (ValueError, IndexError, AssertionError):  # aiortc asserts on lines it cannot parse
            return
        candidate.sdpMid = held.sdp_mid
        candidate.sdpMLineIndex = held.sdp_mline_index
        with contextlib.suppress(Exception):
            await self.pc.addIceCandidate(candidate)

    async def close(self) -> None:
        self.closed = True
        # Not wait_for: on a timeout it waits for the cancelled close to end, and aiortc's
        # close can take a long while to give up. A close that is late goes on by itself.
        closing = asyncio.ensure_future(self.pc.close())
        closing.add_done_callback(_consume)
        await asyncio.wait({closing}, timeout=5.0)


def new_peer_connection(configuration: RTCConfiguration, certificate: RTCCertificate) -> RTCPeerConnection:
    """An RTCPeerConnection that uses ``certificate`` for DTLS, as a browser's ``certificates`` option does.

    aiortc has no public way to pass a certificate: its constructor calls the public classmethod
    ``RTCCertificate.generateCertificate()`` once and keeps what it returns. So for the duration of
    that synchronous constructor (no other code can run in between: no await, one thread) the
    classmethod is replaced by one returning ``certificate``, and the original is put back in a
    ``finally``. Only public names are touched; should aiortc stop calling it, the connection
    gets a fresh certificate instead, which the check below turns into an error rather than
    a silently different fingerprint.
    """
    original = inspect.getattr_static(RTCCertificate, "generateCertificate")
    RTCCertificate.generateCertificate = classmethod(lambda cls: certificate)  # type: ignore[method-assign, assignment]
    try:
        pc = RTCPeerConnection(configuration)
    finally:
        RTCCertificate.generateCertificate = original  # type: ignore[method-assign]
    return pc


def check_uses_certificate(pc: RTCPeerConnection, certificate: RTCCertificate) -> None:
    """Raise unless ``pc`` offers the fingerprint of ``certificate`` (new_peer_connection worked)."""
    local = pc.localDescription
    if local is None:
        return
    expected = {f"{f.algorithm.lower()} {f.value.upper()}" for f in certificate.getFingerprints()}
    if fingerprint_of(local.sdp) not in expected:
        raise RuntimeError("the peer connection does not use the client's DTLS certificate")


def open_link(
    peer: str,
    *,
    offerer: bool,
    certificate: RTCCertificate,
    ice_servers: list[dict[str, Any]],
    ice_transport_policy: str,
    spawn: Callable[[Awaitable[None]], None],
    notify: Callable[[], Awaitable[None]],
) -> PeerLink:
    """A new connection with ``peer`` and its negotiated chat channel; ``notify`` (run with
    ``spawn``) whenever it changes in a way someone may wait for."""
    servers = [
        RTCIceServer(urls=s["urls"], username=s.get("username"), credential=s.get("credential")) for s in ice_servers
    ]
    pc = new_peer_connection(
        RTCConfiguration(iceServers=servers, iceTransportPolicy=RTCIceTransportPolicy(ice_transport_policy)),
        certificate,
    )
    link = PeerLink(peer, pc, offerer)
    channel = pc.createDataChannel(CHAT_LABEL, negotiated=True, id=CHAT_CHANNEL_ID)
    link.channel = channel

    @channel.on("open")
    def on_open() -> None:
        link.channel_open.set()
        spawn(notify())

    channel.on("message", link.on_control)

    @pc.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        link.remote_tracks.append(track)
        spawn(notify())

    @pc.on("connectionstatechange")
    async def on_state() -> None:
        await notify()

    return link


def _consume(task: asyncio.Future[Any]) -> None:
    """Retrieve a background close's outcome (a failed close changes nothing for the caller)."""
    if not task.cancelled():
        task.exception()
