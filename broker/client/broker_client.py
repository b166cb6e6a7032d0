"""The Python client: one peer of a session, over the signaling protocol, with aiortc.

Used by the tests, the benchmarks and ``broker join`` (a terminal diagnostic, ``diagnostic``). It speaks only the
documented protocol (docs/protocol.md), seals every offer and answer end to end with that pair's link key
(broker/crypto/; 7.1, 7.7), checks or opens what it receives, opens a negotiated data channel ("chat") to every
admitted peer, and can send and receive audio and video. As the therapist it vouches for the clients to each other
with rosters and can put a client on hold (7.8, 7.9), and keeps the Janus credentials it is given (``janus``). When
its WebSocket drops, or the broker stops answering (an application-level ``ping`` with a deadline finds a hung one;
its ``ack`` lets the broker forget what was read, docs/protocol.md 5), it reconnects to the next broker URL it knows.

This module: its connection to the broker, the protocol's messages and its actions; the negotiation
with each peer is ``negotiation`` (its base class), the aiortc connections ``peers``, links ``links``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

import aiohttp
import msgspec

from broker.checklist.preflight import ClientPreflightReport, run_preflight_client
from broker.client.links import InviteLink, origin_of, parse_link, ws_url
from broker.client.negotiation import PeerNegotiation
from broker.client.peers import MAX_CHAT_CHARS, PeerLink
from broker.client.trace import server_type_of
from broker.crypto.link_key import decode_link_key
from broker.crypto.safety_plan import SafetyPlan, seal_safety_plan
from broker.crypto.sdp_auth import Trust
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
    Hold,
    Join,
    Joined,
    Leave,
    MediaJanus,
    Offer,
    Peers,
    Ping,
    Pong,
    PreflightAnswer,
    PreflightOffer,
    Reconnect,
    Release,
    Remove,
    Removed,
    Renegotiate,
    Roster,
    ServerMessage,
    SessionEnded,
    Status,
    Verification,
    WaitingNote,
    WaitingRoom,
    decode_server,
    encode,
)

log = logging.getLogger("broker.client")
R = TypeVar("R")

#: A broker that has sent nothing for this long is taken as hung: its socket is dropped and the seat
#: resumed on the next broker URL (docs/protocol.md, ``ping``). Also the deadline for opening a socket.
SILENCE_LIMIT_S = 5.0
#: After this long without a message the client sends a ``ping``, so a live broker always has something to say.
PING_AFTER_S = 2.0
#: The client's own keep-alive pings count up from here, so their pongs are told apart from a caller's ``ping``.
KEEPALIVE_PING_BASE = 1 << 40

#: Errors after which reconnecting with the same seat cannot help.
_FINAL_CODES = {
    ErrorCode.INVALID_TOKEN,
    ErrorCode.TOKEN_EXPIRED,
    ErrorCode.TOKEN_NOT_YET_VALID,
    ErrorCode.SESSION_ENDED,
    ErrorCode.SESSION_CANCELLED,
    ErrorCode.DECLINED,
    ErrorCode.REMOVED,
    ErrorCode.REPLACED,
    ErrorCode.UNSUPPORTED_PROTOCOL,
}


class BrokerError(Exception):
    """The broker answered with an error message."""

    def __init__(self, error: Error) -> None:
        super().__init__(f"{error.code.value}: {error.message}")
        self.code = error.code
        self.error = error


class BrokerClient(PeerNegotiation):
    """One peer of a session: its connection to the broker, the protocol's messages, its actions."""

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
        super().__init__(media=media, ice_servers=ice_servers, allow_unverified=allow_unverified)
        self.link = parse_link(link) if isinstance(link, str) else link
        self.urls = [self.link.base_url, *extra_urls]
        self.reconnect_enabled = reconnect
        self.agent = agent
        self.link_key = decode_link_key(self.link.link_key) if self.link.link_key else None
        self.received: list[ServerMessage] = []
        #: Frames from the broker refused for not fitting the protocol, by their type ("unknown" if not a server one).
        self.refused: dict[str, int] = {}
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
        self._last_heard = 0.0
        self._pings = 0
        self.token = self.link.token
        #: Given by the broker at the first join; presented on every reconnect (memory only).
        self._resume_secret: str | None = None
        #: Highest relayed ``seq`` received, and what sequence checks found.
        self.last_seq = 0
        self.duplicates = 0
        self.gaps = 0

    # ------------------------------------------------------------ life cycle

    @property
    def peer_id(self) -> str:
        assert self.joined is not None, "not joined"
        return self.joined.peer

    @property
    def session_id(self) -> str:
        assert self.joined is not None, "not joined"
        return self.joined.session

    @property
    def broker_url(self) -> str:
        """The broker URL the client is on (or trying) now."""
        return self.urls[self._url_index % len(self.urls)]

    async def connect(self, timeout: float = 10.0) -> Joined:
        """Open the WebSocket, say hello, join; keeps the connection up in the background.

        A broker URL that does not open a socket within ``SILENCE_LIMIT_S`` is passed over for the next
        one; when none does, the last error is raised."""
        self._http = aiohttp.ClientSession()
        for attempt in range(len(self.urls)):
            try:
                await self._open_socket()
                break
            except (aiohttp.ClientError, OSError, TimeoutError):
                if attempt == len(self.urls) - 1:
                    raise
                self._url_index += 1
        self._runner = asyncio.get_running_loop().create_task(self._run())
        joined = await self.expect(Joined, timeout=timeout)
        return joined  # type: ignore[return-value]

    async def close(self) -> None:
        self._closing = True
        if self._roster_timer is not None:
            self._roster_timer.cancel()
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
        """Open a socket to the current broker URL (within ``SILENCE_LIMIT_S``: a hung broker accepts the
        TCP connection and never answers the upgrade), then say hello and join."""
        assert self._http is not None
        url = self.broker_url
        async with asyncio.timeout(SILENCE_LIMIT_S):
            self._ws = await self._http.ws_connect(
                ws_url(url),
                origin=origin_of(url),
                autoping=True,
                max_msg_size=1 << 20,
                timeout=aiohttp.ClientWSTimeout(ws_close=2.0),  # leaving a hung broker: do not wait long for its answer
            )
        self._last_heard = asyncio.get_running_loop().time()
        if self.trace is not None:
            self.trace.socket("open", broker=self._url_index % len(self.urls))
        await self._send(Hello(protocol=PROTOCOL_VERSION, agent=self.agent))
        join = Join(token=self.token, resume=self.last_seq if self.joined else None, resume_secret=self._resume_secret)
        await self._send(join)

    async def _run(self) -> None:
        delay = 0.2
        while not self._closing:
            ws = self._ws
            assert ws is not None
            if await self._read(ws):
                delay = 0.2
            if self.trace is not None:
                self.trace.socket("closed", broker=self._url_index % len(self.urls))
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
                except (aiohttp.ClientError, OSError, TimeoutError):
                    continue

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> bool:
        """Handle what the broker sends until the socket closes or the broker falls silent; True if it said anything.

        Nothing for ``PING_AFTER_S``: send a ``ping``. Nothing for ``SILENCE_LIMIT_S``: the broker is hung
        (or the path to it is), so drop the socket without waiting for a close handshake it cannot answer."""
        loop = asyncio.get_running_loop()
        heard = False
        while True:
            quiet = loop.time() - self._last_heard
            if quiet >= SILENCE_LIMIT_S:
                log.info("event=broker_silent")
                await ws.close()  # after a receive deadline aiohttp closes without waiting for an answer
                return heard
            try:
                msg = await ws.receive(timeout=max(0.05, min(PING_AFTER_S, SILENCE_LIMIT_S - quiet)))
            except TimeoutError:
                if loop.time() - self._last_heard >= PING_AFTER_S and not ws.closed:
                    with contextlib.suppress(ConnectionError, aiohttp.ClientError):
                        ping = Ping(n=KEEPALIVE_PING_BASE + self._pings, ack=self.last_seq or None)
                        await ws.send_str(encode(ping).decode())
                        self._pings += 1
                continue
            if msg.type is aiohttp.WSMsgType.TEXT:
                self._last_heard = loop.time()
                heard = True
                message = self._decode(msg.data)
                if message is None:
                    continue
                if isinstance(message, Pong) and (message.n or 0) >= KEEPALIVE_PING_BASE:
                    continue  # the answer to a keep-alive: hearing it was the point
                try:
                    await self._on_message(message)
                except Exception:  # one message this client failed to handle must not stop this peer
                    log.exception("event=client_message_failed")
            elif msg.type in (aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                return heard
            else:
                self._last_heard = loop.time()

    def _decode(self, data: str) -> ServerMessage | None:
        """The one place a frame from the broker is checked: decoded with the server-message union of protocol.py
        (the definitions the page checks with, docs/contract/). A frame that does not fit is refused: counted in
        ``refused`` by type, logged by type only (never a value: the decoder's reason can quote one), and dropped."""
        try:
            return decode_server(data)
        except (msgspec.ValidationError, msgspec.DecodeError, RecursionError, UnicodeError):
            kind = server_type_of(data)
            self.refused[kind] = self.refused.get(kind, 0) + 1
            log.warning("event=server_message_refused type=%s", kind)
            return None

    async def _send(self, message: msgspec.Struct) -> None:
        if self._ws is None or self._ws.closed:
            raise ConnectionError("not connected to the broker")
        if self.trace is not None:
            self.trace.sent(message)
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
        safety_plan: SafetyPlan | None = None,
        timeout: float = 10.0,
    ) -> ChecklistAccepted:
        """Submit the checklist. By default answers every item of the seat's policy with yes.

        The broker is sent the answers it checks (every item but the recommended ones); all of
        them go to the therapist sealed with the link key (docs/protocol.md 7.4), and so does the
        safety plan, if given (7.4.3).
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
        plan = None
        if safety_plan is not None and self.link_key is not None:
            plan = seal_safety_plan(self.link_key, self.session_id, self.peer_id, safety_plan)
        recommended = {item["id"] for item in policy["items"] if item.get("level") == "recommended"}
        consent = policy.get("consent") or {}
        message = ChecklistSubmit(
            policy_version=policy_version or policy["version"],
            answers={k: v for k, v in answers.items() if k not in recommended},
            consent_version=consent_version or consent.get("version"),
            details=sealed,
            answers_sealed=answers_sealed,
            safety_plan=plan,
        )
        return await self.request(message, ChecklistAccepted, timeout)

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

    async def hold(self, peer: str) -> None:
        """Private time (therapist): put an admitted client on hold; everyone stops media with it."""
        await self._send(Hold(peer=peer))

    async def release(self, peer: str) -> None:
        """Bring a held client back: media resumes on the connections everyone kept."""
        await self._send(Release(peer=peer))

    def open_details(self, peer: str, sealed: str) -> str:
        """Therapist's side: a client's sealed emergency details (under that seat's key, 7.4)."""
        assert self.auth is not None, "not joined"
        return self.auth.open_details(peer, sealed)

    def open_checklist(self, peer: str, sealed: str) -> dict[str, bool]:
        """Therapist's side: a client's sealed checklist answers (under that seat's key, 7.4.1)."""
        assert self.auth is not None, "not joined"
        return self.auth.open_checklist(peer, sealed)

    async def send_note(self, peer: str, text: str, timeout: float = 10.0) -> None:
        """Therapist: a word to a checking or waiting client, sealed for its seat (7.4.2). Returns once
        the broker passed it on (a ``ping`` right behind it is answered after it); BrokerError if refused."""
        assert self.auth is not None, "not joined"
        mark = len(self.received)
        note_id, n = f"r{random.getrandbits(48):x}", random.getrandbits(39)  # below KEEPALIVE_PING_BASE
        await self._send(WaitingNote(peer=peer, sealed=self.auth.seal_note(peer, text), id=note_id))
        await self._send(Ping(n=n))
        got = await self.expect(
            (Pong, Error),
            where=lambda m: m.n == n if isinstance(m, Pong) else m.ref == note_id,
            timeout=timeout,
            since=mark,
        )
        if isinstance(got, Error):
            raise BrokerError(got)

    def open_note(self, sealed: str) -> str:
        """Client: the text of a ``therapist_note`` (NoteError if it does not open for this seat)."""
        assert self.auth is not None, "not joined"
        return self.auth.open_note(sealed)

    def open_safety_plan(self, peer: str, sealed: str) -> SafetyPlan:
        """Therapist's side: a client's sealed safety plan (under that seat's key, 7.4.3)."""
        assert self.auth is not None, "not joined"
        return self.auth.open_safety_plan(peer, sealed)

    async def end(self, timeout: float = 10.0) -> SessionEnded:
        """End the session for everyone, reporting how each peer was verified for the session record."""
        verification: dict[str, Verification] = {
            peer: ("link" if link.trust == Trust.VERIFIED_BY_LINK else "unverified")
            for peer, link in self.links.items()
            if link.trust is not None
        }
        await self._send(End(verification=verification or None))
        return await self.expect(SessionEnded, timeout=timeout)  # type: ignore[return-value]

    async def leave(self) -> None:
        self.final = SessionEnded(reason="ended")
        await self._send(Leave())

    def send_chat(self, peer: str, text: str) -> bool:
        """A chat message straight to the peer over the encrypted data channel (never through the broker).

        Not during private time with that peer (7.9): then nothing is sent and False returned."""
        link = self.links[peer]
        if link.paused:
            return False
        link.channel.send(json.dumps({"t": "chat", "text": text[:MAX_CHAT_CHARS]}))
        return True

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
        if self.trace is not None:
            self.trace.received(message)
        if isinstance(message, (Offer, Answer, Candidate, Renegotiate, Roster)) and message.seq is not None:
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
            self.auth = self.auth or SdpAuthenticator(
                self.link_key,
                message.session,
                message.peer,
                therapist=message.role == "therapist",
                seat_keys=message.seat_keys,
            )
        elif isinstance(message, Peers):
            await self._on_peers(message)
        elif isinstance(message, Roster):
            await self._on_roster(message.from_ or "", message.counter, message.sealed, relayed=True)
        elif isinstance(message, Status):
            self.self_held = message.held
            self._apply_holds()
        elif isinstance(message, WaitingRoom) and self.auth is not None:
            for seat in message.seats:
                self.auth.set_peer(seat.peer, role="client", group=seat.group)
        elif isinstance(message, (Offer, Answer)):
            await self._on_description(message)
        elif isinstance(message, Candidate):
            await self._on_candidate(message)
        elif isinstance(message, Renegotiate):
            peer = message.from_ or ""
            await self._on_renegotiate(peer)
        elif isinstance(message, MediaJanus):
            self.janus = message  # this seat's latest credentials for the session's Janus room
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
