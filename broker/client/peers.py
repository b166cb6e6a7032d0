"""The Python client's peer-to-peer side: one aiortc connection per admitted peer.

Signaling (what is sent and opened, and what is trusted) is the client's
(``broker_client``); this is what it drives: the connection and its negotiated data
channel ("chat"), the control messages that come over it (docs/protocol.md 7.5), and
candidates held until their connection has the peer's description.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCIceTransportPolicy,
    RTCPeerConnection,
)
from aiortc.mediastreams import MediaStreamTrack
from aiortc.sdp import candidate_from_sdp

from broker.crypto.sdp_auth import fingerprint_of, safety_code

CHAT_LABEL = "chat"
CHAT_CHANNEL_ID = 0
MAX_CHAT_CHARS = 2000
MAX_CONTROL_BYTES = 8192


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

    def safety_code(self, session_id: str) -> str | None:
        local, remote = self.pc.localDescription, self.pc.remoteDescription
        if local is None or remote is None:
            return None
        return safety_code(session_id, fingerprint_of(local.sdp), fingerprint_of(remote.sdp))

    def on_control(self, data: Any) -> None:
        """A message on the data channel: chat text or media state (docs/protocol.md 7.5); anything else is ignored."""
        if not isinstance(data, str) or len(data) > MAX_CONTROL_BYTES:
            return
        try:
            message = json.loads(data)
        except (ValueError, RecursionError):  # malformed, or nested past the parser's stack
            return
        if not isinstance(message, dict):
            return
        if message.get("t") == "chat" and isinstance(message.get("text"), str):
            self.messages.put_nowait(message["text"][:MAX_CHAT_CHARS])
        elif message.get("t") == "media":
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


def open_link(
    peer: str,
    *,
    offerer: bool,
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
    pc = RTCPeerConnection(
        RTCConfiguration(iceServers=servers, iceTransportPolicy=RTCIceTransportPolicy(ice_transport_policy))
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
