"""The Python client: one peer of a session, over the signaling protocol, with aiortc.

Used by the tests, the benchmarks and ``broker join`` (a terminal diagnostic).
It speaks only the documented protocol (docs/protocol.md), seals every offer
and answer end to end with the link key (broker.crypto.sdp_authenticator; docs/protocol.md 7.7),
checks or opens what it receives, opens a negotiated data
channel ("chat") to every admitted peer, and can send and receive audio and
video. When its WebSocket drops it reconnects with the same seat (to any of the
broker URLs it knows) while the peer-to-peer connections carry on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

import aiohttp
import msgspec
from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCIceTransportPolicy,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.mediastreams import AudioStreamTrack, MediaStreamTrack, VideoStreamTrack
from aiortc.sdp import candidate_from_sdp

from broker.checklist.preflight import ClientPreflightReport, run_preflight_client
from broker.crypto.link_key import decode_link_key
from broker.crypto.sdp_auth import InterceptionError, Trust, fingerprint_of, safety_code
from broker.crypto.sdp_authenticator import SdpAuthenticator
from broker.crypto.sealed_for_therapist import seal_checklist, seal_details
from broker.signaling.protocol import (
    PROTOCOL_VERSION,
    Admit,
    AllowReturn,
    Answer,
    Candidate,
    ChecklistAccepted,
    ChecklistSubmit,
    Decline,
    Declined,
    End,
    Error,
    ErrorCode,
    Hello,
    Join,
    Joined,
    Leave,
    Offer,
    Peers,
    PreflightAnswer,
    PreflightOffer,
    Reconnect,
    Remove,
    Removed,
    Renegotiate,
    Report,
    Role,
    SeatState,
    ServerMessage,
    SessionEnded,
    Verification,
    WaitingRoom,
    decode_server,
    encode,
)

log = logging.getLogger("broker.client")
R = TypeVar("R")

CHAT_LABEL = "chat"
CHAT_CHANNEL_ID = 0
MAX_CHAT_CHARS = 2000
MAX_CONTROL_BYTES = 8192

#: Errors after which reconnecting with the same seat cannot help.
_FINAL_CODES = {
    ErrorCode.INVALID_TOKEN,
    ErrorCode.TOKEN_EXPIRED,
    ErrorCode.TOKEN_NOT_YET_VALID,
    ErrorCode.SESSION_ENDED,
    ErrorCode.DECLINED,
    ErrorCode.REMOVED,
    ErrorCode.REPLACED,
    ErrorCode.UNSUPPORTED_PROTOCOL,
}


@dataclass(frozen=True)
class InviteLink:
    base_url: str
    role: str
    token: str
    link_key: str | None


def parse_link(link: str) -> InviteLink:
    """Split ``BASE/j/<token>#<link key>`` (client) or ``BASE/t/...`` (therapist)."""
    parts = urlsplit(link)
    segments = parts.path.rstrip("/").split("/")
    if len(segments) < 3 or segments[-2] not in ("j", "t") or not segments[-1]:
        raise ValueError("not an invite link: expected BASE/j/<token>#<key> or BASE/t/<token>#<key>")
    prefix = "/".join(segments[:-2])
    base = f"{parts.scheme}://{parts.netloc}{prefix}"
    role = "therapist" if segments[-2] == "t" else "client"
    return InviteLink(base, role, segments[-1], parts.fragment or None)


def ws_url(base_url: str) -> str:
    parts = urlsplit(base_url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}/ws"


def origin_of(base_url: str) -> str:
    parts = urlsplit(base_url)
    return f"{parts.scheme}://{parts.netloc}"


class BrokerError(Exception):
    """The broker answered with an error message."""

    def __init__(self, error: Error) -> None:
        super().__init__(f"{error.code.value}: {error.message}")
        self.code = error.code
        self.error = error


@dataclass(frozen=True)
class Interception:
    """An offer or answer that failed authentication: someone may be in the middle."""

    peer: str
    reason: str


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


@dataclass(frozen=True)
class _HeldCandidate:
    """A candidate (already opened if it came sealed) waiting for its connection's description."""

    line: str
    sdp_mid: str | None
    sdp_mline_index: int | None
    sealed: bool


class BrokerClient:
    def __init__(
        self,
        link: str | InviteLink,
        *,
        extra_urls: Sequence[str] = (),
        media: bool = False,
        ice_servers: list[dict[str, Any]] | None = None,
        allow_unverified: bool = False,
        reconnect: bool = True,
        agent: str = "broker.client",
    ) -> None:
        self.link = parse_link(link) if isinstance(link, str) else link
        self.urls = [self.link.base_url, *extra_urls]
        self.media = media
        self.ice_override = ice_servers
        self.allow_unverified = allow_unverified
        self.reconnect_enabled = reconnect
        self.agent = agent
        self.link_key = decode_link_key(self.link.link_key) if self.link.link_key else None
        self.joined: Joined | None = None
        self.auth: SdpAuthenticator | None = None
        self.links: dict[str, PeerLink] = {}
        self.interceptions: list[Interception] = []
        self.received: list[ServerMessage] = []
        self.reconnects = 0
        self.final: ServerMessage | None = None
        self._consumed: set[int] = set()
        self._changed = asyncio.Condition()
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._runner: asyncio.Task[None] | None = None
        self._url_index = 0
        self._closing = False
        self._connected = asyncio.Event()
        self._pending_candidates: dict[str, list[_HeldCandidate]] = {}
        #: Signaling dropped without a warning, by why (content-free): clear candidates from a
        #: peer whose description came sealed, replayed sealed candidates, ...
        self.dropped: dict[str, int] = {}
        self.token = self.link.token
        #: Given by the broker at the first join; presented on every reconnect (memory only).
        self._resume_secret: str | None = None
        #: The device holding each peer's seat, as the last ``peers`` said.
        self._devices: dict[str, str | None] = {}
        self._offers_to: dict[str, bool] = {}
        #: Highest relayed ``seq`` received, and what sequence checks found.
        self.last_seq = 0
        self.duplicates = 0
        self.gaps = 0
        self._tasks: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------ life cycle

    @property
    def peer_id(self) -> str:
        assert self.joined is not None, "not joined"
        return self.joined.peer

    @property
    def session_id(self) -> str:
        assert self.joined is not None, "not joined"
        return self.joined.session

    async def connect(self, timeout: float = 10.0) -> Joined:
        """Open the WebSocket, say hello, join; keeps the connection up in the background."""
        self._http = aiohttp.ClientSession()
        await self._open_socket()
        self._runner = asyncio.get_running_loop().create_task(self._run())
        joined = await self.expect(Joined, timeout=timeout)
        return joined  # type: ignore[return-value]

    async def close(self) -> None:
        self._closing = True
        if self._runner:
            self._runner.cancel()
            with contextlib.suppress(BaseException):
                await self._runner
        for link in list(self.links.values()):
            await self._close_link(link)
        if self._ws is not None:
            await self._ws.close()
        if self._http is not None:
            await self._http.close()
        for task in list(self._tasks):
            task.cancel()

    async def __aenter__(self) -> BrokerClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _open_socket(self) -> None:
        assert self._http is not None
        url = self.urls[self._url_index % len(self.urls)]
        self._ws = await self._http.ws_connect(
            ws_url(url), origin=origin_of(url), autoping=True, heartbeat=20.0, max_msg_size=1 << 20
        )
        await self._send(Hello(protocol=PROTOCOL_VERSION, agent=self.agent))
        await self._send(
            Join(token=self.token, resume=self.last_seq if self.joined else None, resume_secret=self._resume_secret)
        )

    async def _run(self) -> None:
        delay = 0.2
        while not self._closing:
            ws = self._ws
            assert ws is not None
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.TEXT:
                    delay = 0.2
                    try:
                        await self._on_message(decode_server(msg.data))
                    except Exception:  # one bad message must not stop this peer
                        log.exception("event=client_message_failed")
                elif msg.type in (aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSE):
                    break
            if self._closing or self.final is not None or not self.reconnect_enabled:
                return
            # Connection lost: reconnect with the same seat, cycling through the broker URLs.
            while not self._closing:
                await asyncio.sleep(delay * (1 + random.random() / 2))
                delay = min(delay * 2, 5.0)
                self._url_index += 1
                try:
                    await self._open_socket()
                    self.reconnects += 1
                    log.info("event=reconnected")
                    break
                except (aiohttp.ClientError, OSError):
                    continue

    async def _send(self, message: msgspec.Struct) -> None:
        if self._ws is None or self._ws.closed:
            raise ConnectionError("not connected to the broker")
        await self._ws.send_str(encode(message).decode())

    async def send_raw(self, text: str) -> None:
        """Send a frame as is (tests of the broker's input checks)."""
        assert self._ws is not None
        await self._ws.send_str(text)

    # ------------------------------------------------------------ waiting for messages

    async def expect(
        self,
        kind: type | tuple[type, ...],
        where: Callable[[Any], bool] = lambda m: True,
        timeout: float = 10.0,
        since: int = 0,
    ) -> ServerMessage:
        """The first not-yet-consumed message of a type (and condition), waiting for it if needed."""
        found: list[ServerMessage] = []

        def find() -> bool:
            for i in range(since, len(self.received)):
                m = self.received[i]
                if i not in self._consumed and isinstance(m, kind) and where(m):
                    self._consumed.add(i)
                    found.append(m)
                    return True
            return False

        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(find), timeout)
        return found[0]

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def request(self, message: msgspec.Struct, reply: type[R], timeout: float = 10.0) -> R:
        """Send a message and wait for its reply type, raising BrokerError on an error about it."""
        mark = len(self.received)
        message_id = f"r{random.getrandbits(48):x}"
        message = msgspec.structs.replace(message, id=message_id)
        await self._send(message)
        got = await self.expect(
            (reply, Error),
            where=lambda m: not isinstance(m, Error) or m.ref == message_id,
            timeout=timeout,
            since=mark,
        )
        if isinstance(got, Error):
            raise BrokerError(got)
        return cast(R, got)  # expect() returned an instance of ``reply`` or Error

    async def wait_connected(self, peer: str, timeout: float = 15.0) -> PeerLink:
        """Wait until the data channel with ``peer`` is open."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            link = self.links.get(peer)
            if link is not None and link.channel_open.is_set():
                return link
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise TimeoutError(f"no data channel with {peer}")
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), min(remaining, 0.25))

    # ------------------------------------------------------------ actions

    async def preflight(self, relay_only: bool | None = None, *, attempts: int = 3) -> ClientPreflightReport:
        """The network pre-flight, over the path the call will use (relay only if the session says so).

        When the broker is busy or this seat is at its pre-flight limit, waits as the error's ``retry_after_ms``
        says (up to a minute) and tries again, ``attempts`` tries in all; then raises BrokerError."""
        if relay_only is None:
            relay_only = bool(self.joined and self.joined.ice_transport_policy == "relay")

        async def exchange(offer_sdp: str) -> str:
            # The broker may keep an offer waiting for a free slot (preflight_wait_s) before it answers.
            reply = await self.request(PreflightOffer(sdp=offer_sdp), PreflightAnswer, timeout=30.0)
            return reply.sdp

        tries = 1
        while True:
            try:
                return await run_preflight_client(exchange, self._ice_servers(), relay_only=relay_only)
            except BrokerError as exc:
                wait_ms = exc.error.retry_after_ms
                limited = exc.code in (ErrorCode.PREFLIGHT_BUSY, ErrorCode.PREFLIGHT_LIMITED)
                if tries >= attempts or not limited or wait_ms is None or wait_ms > 60_000:
                    raise
                tries += 1
                await asyncio.sleep(wait_ms / 1000)

    async def submit_checklist(
        self,
        answers: dict[str, bool] | None = None,
        *,
        policy_version: str | None = None,
        consent_version: str | None = None,
        details: dict[str, str] | None = None,
    ) -> ChecklistAccepted:
        """Submit the checklist. By default answers every item of the seat's policy with yes.

        The broker is sent the answers it checks (every item but the recommended ones); all of
        them go to the therapist sealed with the link key (docs/protocol.md 7.4).
        """
        assert self.joined is not None and self.joined.policy is not None
        policy = self.joined.policy
        if answers is None:
            answers = {item["id"]: True for item in policy["items"]}
        sealed = None
        if details is not None and self.link_key is not None:
            sealed = seal_details(self.link_key, self.session_id, self.peer_id, msgspec.json.encode(details).decode())
        answers_sealed = None
        if self.link_key is not None:
            answers_sealed = seal_checklist(self.link_key, self.session_id, self.peer_id, answers)
        recommended = {item["id"] for item in policy["items"] if item.get("level") == "recommended"}
        consent = policy.get("consent") or {}
        message = ChecklistSubmit(
            policy_version=policy_version or policy["version"],
            answers={k: v for k, v in answers.items() if k not in recommended},
            consent_version=consent_version or consent.get("version"),
            details=sealed,
            answers_sealed=answers_sealed,
        )
        return await self.request(message, ChecklistAccepted)

    async def admit(self, peer: str, device: str | None = None) -> None:
        """Let a waiting client in; with ``device``, that seat's other device instead (the seat moves to it)."""
        await self._send(Admit(peer=peer, device=device))

    async def decline(self, peer: str, device: str | None = None) -> None:
        """Turn a client away; with ``device``, only that seat's other device."""
        await self._send(Decline(peer=peer, device=device))

    async def remove(self, peer: str) -> None:
        await self._send(Remove(peer=peer))

    async def allow_return(self, peer: str) -> None:
        await self._send(AllowReturn(peer=peer))

    async def end(self) -> SessionEnded:
        """End the session for everyone, reporting how each peer was verified for the session record."""
        verification: dict[str, Verification] = {
            peer: ("link" if link.trust == Trust.VERIFIED_BY_LINK else "unverified")
            for peer, link in self.links.items()
            if link.trust is not None
        }
        await self._send(End(verification=verification or None))
        return await self.expect(SessionEnded)  # type: ignore[return-value]

    async def leave(self) -> None:
        self.final = SessionEnded(reason="ended")
        await self._send(Leave())

    def send_chat(self, peer: str, text: str) -> None:
        """A chat message straight to the peer over the encrypted data channel (never through the broker)."""
        self.links[peer].channel.send(json.dumps({"t": "chat", "text": text[:MAX_CHAT_CHARS]}))

    def send_media_state(self, peer: str, *, audio: bool, video: bool) -> None:
        """Tell the peer our microphone and camera state (shown as muted / camera off)."""
        self.links[peer].channel.send(json.dumps({"t": "media", "audio": audio, "video": video}))

    def safety_code(self, peer: str) -> str | None:
        return self.links[peer].safety_code(self.session_id)

    async def renegotiate(self, peer: str) -> None:
        """Ask the offerer of this pair for a fresh offer (an ICE restart, or a new connection)."""
        await self._send(Renegotiate(to=peer))

    # ------------------------------------------------------------ incoming

    async def _on_message(self, message: ServerMessage) -> None:
        if isinstance(message, (Offer, Answer, Candidate, Renegotiate)) and message.seq is not None:
            if message.seq <= self.last_seq:
                self.duplicates += 1
                return
            if message.seq > self.last_seq + 1 and self.last_seq:
                self.gaps += message.seq - self.last_seq - 1
            self.last_seq = message.seq
        if isinstance(message, Joined):
            if message.resume_secret is not None:
                # Proves to the broker that a later join is this same peer: kept here only, never shown.
                self._resume_secret = message.resume_secret
                message = msgspec.structs.replace(message, resume_secret=None)
            self.joined = message
            if message.seat_token:
                # Joined through a group link: come back to this same seat from now on.
                self.token = message.seat_token
            self.auth = self.auth or SdpAuthenticator(self.link_key, message.session, message.peer)
        elif isinstance(message, Peers):
            await self._on_peers(message)
        elif isinstance(message, (Offer, Answer)):
            await self._on_description(message)
        elif isinstance(message, Candidate):
            await self._on_candidate(message)
        elif isinstance(message, Renegotiate):
            peer = message.from_ or ""
            if self._offers_to.get(peer):
                link = self.links.get(peer)
                if link is not None:
                    await self._close_link(link)
                self._spawn(self._start_offer(peer))
        elif isinstance(message, Reconnect):
            if self._ws is not None:
                await self._ws.close()
        elif isinstance(message, SessionEnded):
            self.final = message
        elif isinstance(message, Error) and message.code in _FINAL_CODES:
            self.final = message
        elif isinstance(message, (Declined, Removed)):
            self.final = message
        self.received.append(message)
        await self._notify()

    async def _on_peers(self, message: Peers) -> None:
        wanted = {p.peer: p for p in message.peers}
        self._offers_to = {p.peer: p.you_offer for p in message.peers}
        for peer, link in list(self.links.items()):
            if peer not in wanted:
                await self._close_link(link)
            elif peer in self._devices and self._devices[peer] != wanted[peer].device:
                await self._close_link(link)  # the seat moved to another device: never keep the old one
        self._devices = {p.peer: p.device for p in message.peers}
        for info in message.peers:
            current = self.links.get(info.peer)
            healthy = (
                current is not None and not current.closed and current.pc.connectionState not in ("failed", "closed")
            )
            if info.you_offer and info.connected and not healthy:
                if current is not None:
                    await self._close_link(current)
                self._spawn(self._start_offer(info.peer))

    async def _start_offer(self, peer: str) -> None:
        assert self.auth is not None
        link = self._new_link(peer, offerer=True)
        link.sealing = self.auth.has_link_key
        pc = link.pc
        if self.media:
            pc.addTrack(AudioStreamTrack())
            pc.addTrack(VideoStreamTrack())
        else:
            pc.addTransceiver("audio", direction="recvonly")
            pc.addTransceiver("video", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        await self._send_description(link, "offer")

    async def _send_description(self, link: PeerLink, kind: str) -> None:
        """Our description, sealed end to end when this connection seals, else in clear with a MAC."""
        assert self.auth is not None
        sdp = link.pc.localDescription.sdp
        cls = Offer if kind == "offer" else Answer
        if link.sealing:
            counter, sealed = self.auth.seal(link.peer, kind, {"sdp": sdp})
            await self._send(cls(to=link.peer, counter=counter, sealed=sealed))
        else:
            counter, mac = self.auth.sign(link.peer, kind, sdp)
            await self._send(cls(to=link.peer, sdp=sdp, counter=counter, mac=mac))

    def _dropped(self, peer: str, why: str) -> None:
        self.dropped[why] = self.dropped.get(why, 0) + 1
        log.info("event=signal_dropped peer=%s why=%s", peer, why)

    async def _intercepted(self, peer: str, reason: str) -> None:
        self.interceptions.append(Interception(peer, reason))
        log.warning("event=interception_warning peer=%s reason=%s", peer, reason)
        with contextlib.suppress(ConnectionError, ValueError, msgspec.ValidationError):
            await self._send(Report(event="interception_warning", peer=peer, reason=reason))  # type: ignore[arg-type]
        link = self.links.get(peer)
        if link is not None:
            await self._close_link(link)

    async def _on_description(self, message: Offer | Answer) -> None:
        assert self.auth is not None
        peer = message.from_ or ""
        kind = "offer" if isinstance(message, Offer) else "answer"
        sealed = message.sealed is not None
        try:
            if message.sealed is not None:
                if not self.auth.has_link_key:
                    self._dropped(peer, "sealed_without_link_key")
                    return
                sdp = str(self.auth.unseal(peer, kind, message.counter, message.sealed)["sdp"])
                trust = Trust.VERIFIED_BY_LINK
            else:
                sdp = message.sdp or ""
                trust = self.auth.verify(
                    peer, kind, message.counter, sdp, message.mac, allow_unverified=self.allow_unverified
                )
        except InterceptionError as exc:
            await self._intercepted(peer, exc.reason)
            return
        link: PeerLink | None
        if isinstance(message, Offer):
            old = self.links.get(peer)
            if old is not None:
                await self._close_link(old)
            link = self._new_link(peer, offerer=False)
            link.trust = trust
            link.remote_sealed = link.sealing = sealed  # answer the way the offer came
            await link.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            if self.media:
                link.pc.addTrack(AudioStreamTrack())
                link.pc.addTrack(VideoStreamTrack())
            await link.pc.setLocalDescription(await link.pc.createAnswer())
            await self._send_description(link, "answer")
        else:
            link = self.links.get(peer)
            if link is None or not link.offerer or link.pc.signalingState != "have-local-offer":
                return
            link.trust = trust
            link.remote_sealed = sealed
            await link.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))
        for held in self._pending_candidates.pop(peer, []):
            await self._add_candidate(peer, held)

    async def _on_candidate(self, message: Candidate) -> None:
        peer = message.from_ or ""
        if message.sealed is None:
            held = _HeldCandidate(message.candidate or "", message.sdp_mid, message.sdp_mline_index, sealed=False)
            await self._add_candidate(peer, held)
            return
        if self.auth is None or not self.auth.has_link_key:
            self._dropped(peer, "sealed_without_link_key")
            return
        try:
            fields = self.auth.unseal(peer, "candidate", message.counter, message.sealed)
        except InterceptionError as exc:
            if exc.reason == "bad_mac":  # altered or made up: only someone in the middle does that
                await self._intercepted(peer, exc.reason)
            else:  # a replayed or malformed candidate can do no harm: drop it
                self._dropped(peer, f"candidate_{exc.reason}")
            return
        line, mid, index = fields["candidate"], fields["sdp_mid"], fields["sdp_mline_index"]
        assert isinstance(line, str) and (mid is None or isinstance(mid, str))
        assert index is None or isinstance(index, int)
        await self._add_candidate(peer, _HeldCandidate(line, mid, index, sealed=True))

    async def _add_candidate(self, peer: str, held: _HeldCandidate) -> None:
        link = self.links.get(peer)
        if link is None or link.pc.remoteDescription is None:
            self._pending_candidates.setdefault(peer, []).append(held)
            return
        if link.remote_sealed and not held.sealed:
            # The peer seals: a clear candidate can only come from the broker.
            self._dropped(peer, "clear_candidate")
            return
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
            await link.pc.addIceCandidate(candidate)

    # ------------------------------------------------------------ peer connections

    def _ice_servers(self) -> list[dict[str, Any]]:
        if self.ice_override is not None:
            return self.ice_override
        return list(self.joined.ice_servers) if self.joined else []

    def _new_link(self, peer: str, *, offerer: bool) -> PeerLink:
        servers = [
            RTCIceServer(urls=s["urls"], username=s.get("username"), credential=s.get("credential"))
            for s in self._ice_servers()
        ]
        policy = self.joined.ice_transport_policy if self.joined else "all"
        pc = RTCPeerConnection(RTCConfiguration(iceServers=servers, iceTransportPolicy=RTCIceTransportPolicy(policy)))
        link = PeerLink(peer, pc, offerer)
        channel = pc.createDataChannel(CHAT_LABEL, negotiated=True, id=CHAT_CHANNEL_ID)
        link.channel = channel

        @channel.on("open")
        def on_open() -> None:
            link.channel_open.set()
            self._spawn(self._notify())

        @channel.on("message")
        def on_message(data: Any) -> None:
            # Control messages of docs/protocol.md section 7.5: chat text and media state.
            if not isinstance(data, str) or len(data) > MAX_CONTROL_BYTES:
                return
            try:
                message = json.loads(data)
            except (ValueError, RecursionError):  # malformed, or nested past the parser's stack
                return
            if not isinstance(message, dict):
                return
            if message.get("t") == "chat" and isinstance(message.get("text"), str):
                link.messages.put_nowait(message["text"][:MAX_CHAT_CHARS])
            elif message.get("t") == "media":
                link.remote_media = {
                    "audio": message.get("audio") is not False,
                    "video": message.get("video") is not False,
                }

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            link.remote_tracks.append(track)
            self._spawn(self._notify())

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            await self._notify()

        self.links[peer] = link
        return link

    async def _close_link(self, link: PeerLink) -> None:
        link.closed = True
        if self.links.get(link.peer) is link:
            del self.links[link.peer]
        # Not wait_for: on a timeout it waits for the cancelled close to end, and aiortc's
        # close can take a long while to give up. A close that is late goes on by itself.
        closing = asyncio.ensure_future(link.pc.close())
        closing.add_done_callback(_consume)
        await asyncio.wait({closing}, timeout=5.0)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _consume(task: asyncio.Future[Any]) -> None:
    """Retrieve a background close's outcome (a failed close changes nothing for the caller)."""
    if not task.cancelled():
        task.exception()


DIAGNOSTIC_DETAILS = {"location": "diagnostic test, not a real location", "contact": "diagnostic test"}


async def join_from_terminal(
    link: str, *, seconds: float, admit_all: bool, media: bool, details: dict[str, str] | None = None
) -> int:
    """``broker join``: join, pass the checklist, connect, report what happens."""
    client = BrokerClient(link, media=media, agent="broker join")
    try:
        joined = await client.connect()
    except Exception as exc:
        print(f"Could not join: {exc}")
        return 1
    print(
        f"Joined session {joined.session} as {joined.role.value} (peer {joined.peer}); seat {joined.seat_state.value}"
    )
    try:
        if joined.role is Role.CLIENT:
            report = await client.preflight()
            print(f"Network pre-flight: connected={report.connected} rtt_ms={report.rtt_ms} relayed={report.relayed}")
            try:
                await client.submit_checklist(details=details or DIAGNOSTIC_DETAILS)
            except BrokerError as exc:
                print(f"Checklist refused ({exc.code.value}): {exc.error.message}")
                return 1
            print("Checklist accepted; waiting for the therapist to admit you.")
        loop = asyncio.get_running_loop()
        end_at = loop.time() + seconds
        reported: set[str] = set()
        admitted: set[str] = set()
        while loop.time() < end_at and client.final is None:
            rooms = [m for m in client.received if isinstance(m, WaitingRoom)]
            if admit_all and joined.role is Role.THERAPIST and rooms:
                for seat in rooms[-1].seats:
                    if seat.state is SeatState.WAITING and seat.peer not in admitted:
                        admitted.add(seat.peer)
                        print(f"Admitting {seat.peer} (checklist: {seat.checklist})")
                        await client.admit(seat.peer)
            for peer, peer_link in client.links.items():
                if peer_link.channel_open.is_set() and peer not in reported:
                    reported.add(peer)
                    print(f"Connected to {peer}: safety code {client.safety_code(peer)} ({peer_link.trust})")
            for interception in client.interceptions:
                print(f"WARNING: possible interception with {interception.peer}: {interception.reason}")
            client.interceptions.clear()
            await asyncio.sleep(0.5)
        if client.final is not None:
            print(f"Session over: {type(client.final).__name__}")
        return 0
    finally:
        await client.close()
