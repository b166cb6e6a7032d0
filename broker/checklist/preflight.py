"""The network pre-flight: a short WebRTC data-channel test between the client and the broker's own aiortc peer.

The broker measures the round-trip time itself (it sends the pings and times the pongs on its own monotonic
clock) and tells from its own ICE agent whether the path went through a relay, so the page cannot fake the
result. Only data channels are accepted: an offer with audio or video is refused before any peer connection
exists. Every peer connection is torn down within `timeout` seconds, whatever happens.

Data-channel protocol (channel label "preflight", JSON text messages):
    broker -> page  {"t": "ping", "n": i}                      for i in 0..pings-1, ~60 ms apart
    page -> broker  {"t": "pong", "n": i}                      echo of each ping
    broker -> page  {"t": "done", "connected": bool, "rtt_ms": float | null, "relayed": bool}
                                                                informational; the page then closes
aiortc does not trickle ICE candidates: the page must send its offer after ICE gathering completed, and the
answer carries all of the broker's candidates.

Each offer names its session and seat: the broker's peer connections are shared out by
broker.preflight_slots (one pre-flight at a time per seat, a rate per seat, a share per session, fair waiting).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import statistics
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCIceCandidate,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.rtcconfiguration import RTCIceTransportPolicy

from broker.checklist.preflight_slots import PreflightRefused, Slot, SlotLimits, SlotScheduler

__all__ = [
    "CHANNEL_LABEL",
    "ClientPreflightReport",
    "PreflightRefused",
    "PreflightResult",
    "PreflightService",
    "run_preflight_client",
]

log = logging.getLogger(__name__)

CHANNEL_LABEL = "preflight"
MAX_OFFER_BYTES = 32 * 1024
_MAX_MESSAGE = 256  # a pong is ~20 bytes; anything bigger is ignored
_PING_SPACING = 0.06
_PONG_GRACE = 2.0  # after the last ping, how long the broker waits for outstanding pongs
_CLOSE_GRACE = 0.5  # after "done", how long the broker lets the page close first
_TEARDOWN_LIMIT = 5.0
_RESULT_TTL = 60.0
_SLOT_HINT_MARGIN = 1.0


@dataclass(frozen=True)
class PreflightResult:
    """What the broker saw itself. connected: the channel opened and at least one ping came back."""

    connected: bool
    rtt_ms_median: float | None
    relayed: bool
    finished_at: float  # time.time() when the peer connection was torn down
    pings_sent: int = 0
    pongs_received: int = 0


@dataclass
class _Run:
    pc: RTCPeerConnection
    deadline: float  # loop.time()
    channel: asyncio.Future[RTCDataChannel]
    slot: Slot
    failed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    result: asyncio.Future[PreflightResult] | None = None
    expires_at: float | None = None


def _ice_servers(servers: Iterable[Any] | None) -> list[RTCIceServer]:
    """Accept RTCIceServer objects or dicts shaped like the browser's ({urls, username, credential})."""
    out: list[RTCIceServer] = []
    for server in servers or []:
        if isinstance(server, RTCIceServer):
            out.append(server)
        else:
            out.append(
                RTCIceServer(urls=server["urls"], username=server.get("username"), credential=server.get("credential"))
            )
    return out


def _configuration(ice_servers: Iterable[Any] | None, relay_only: bool = False) -> RTCConfiguration:
    policy = RTCIceTransportPolicy.RELAY if relay_only else RTCIceTransportPolicy.ALL
    return RTCConfiguration(iceServers=_ice_servers(ice_servers), iceTransportPolicy=policy)


def check_offer(offer_sdp: str) -> None:
    """Refuse, before any peer connection exists, what is not a data-channel-only SDP offer."""
    if not isinstance(offer_sdp, str) or not offer_sdp or len(offer_sdp.encode("utf-8", "replace")) > MAX_OFFER_BYTES:
        raise PreflightRefused("preflight_bad_offer", "The network check sent an empty or oversized offer.")
    lines = [line for line in offer_sdp.replace("\r\n", "\n").split("\n") if line]
    if not lines or lines[0].strip() != "v=0" or any(len(line) < 2 or line[1] != "=" for line in lines):
        raise PreflightRefused("preflight_bad_offer", "The network check sent something that is not an SDP offer.")
    media = [line[2:].split(" ", 1)[0] for line in lines if line.startswith("m=")]
    if any(kind in ("audio", "video") for kind in media):
        raise PreflightRefused(
            "preflight_media_refused", "The network check carries no audio or video; the offer asked for some."
        )
    if media != ["application"]:
        raise PreflightRefused(
            "preflight_bad_offer", "The network check needs exactly one data channel section in its offer."
        )


def _path_relayed(pc: RTCPeerConnection) -> bool:
    """Whether the connection can only have gone through a TURN relay: every candidate the page
    gave is a relay one (its relay-only policy, or a network that left it nothing else), or every
    one of the broker's own is.

    From aiortc's public API only (docs/security.md 3.6): it does not tell which candidate pair
    ICE selected (the W3C ``RTCIceTransport.getSelectedCandidatePair()``), so a pair ICE chose
    through a relay although other candidates existed reads as not relayed. "Relayed" is never
    said of a path that was not.
    """
    sctp = pc.sctp
    if sctp is None:
        return False
    ice = sctp.transport.transport
    return _all_relay(ice.getRemoteCandidates()) or _all_relay(ice.iceGatherer.getLocalCandidates())


def _all_relay(candidates: list[RTCIceCandidate]) -> bool:
    return bool(candidates) and all(candidate.type == "relay" for candidate in candidates)


class PreflightService:
    """Answers pre-flight offers with a short-lived aiortc peer and keeps each result until taken (or TTL)."""

    def __init__(
        self,
        limits: SlotLimits | None = None,
        ice_servers: list[Any] | None = None,
        timeout: float = 8.0,
        pings: int = 5,
        result_ttl: float = _RESULT_TTL,
    ) -> None:
        self.limits = limits or SlotLimits()
        self.ice_servers = list(ice_servers or [])
        self.timeout = timeout
        self.pings = max(1, pings)
        self.result_ttl = result_ttl
        # A slot is held from before the peer connection exists until it is torn down: about the timeout at
        # most (teardown is quick unless something is wrong), which is what a refused seat is told to wait.
        self.slots = SlotScheduler(self.limits, hold_s=timeout + _SLOT_HINT_MARGIN)
        self._runs: dict[str, _Run] = {}
        self._open: set[RTCPeerConnection] = set()
        self._closed = False

    # -- public API ------------------------------------------------------------------------------------------

    def active_count(self) -> int:
        """Pre-flights holding a slot (answering or running)."""
        return self.slots.running_count()

    def open_peer_count(self) -> int:
        """Peer connections not yet torn down; zero once every pre-flight finished."""
        return len(self._open)

    async def answer(self, offer_sdp: str, session: str, seat: str) -> tuple[str, str]:
        """Answer a data-channel-only offer from this session's seat; return (preflight_id, answer_sdp) or raise
        PreflightRefused. Waits (at most the limits' wait_s) when every slot this seat may use is taken."""
        if self._closed:
            raise PreflightRefused("preflight_busy", "The network check is not available right now.", 1.0)
        check_offer(offer_sdp)
        self._prune()
        try:
            slot = await self.slots.acquire(session, seat)
        except PreflightRefused as exc:
            level = logging.INFO if exc.code == "preflight_busy" else logging.DEBUG  # a seat's own limit: no log flood
            log.log(level, "event=preflight_refused reason=%s session=%s peer=%s", exc.code, session, seat)
            raise
        if self._closed:
            self.slots.release(slot)
            raise PreflightRefused("preflight_busy", "The network check is not available right now.", 1.0)
        loop = asyncio.get_running_loop()
        preflight_id = secrets.token_urlsafe(16)
        try:
            pc = RTCPeerConnection(configuration=_configuration(self.ice_servers))
        except BaseException:
            self.slots.release(slot)
            raise
        run = _Run(pc=pc, deadline=loop.time() + self.timeout, channel=loop.create_future(), slot=slot)
        self._runs[preflight_id] = run  # close() tears it down from now on; _teardown gives the slot back
        self._open.add(pc)
        self._watch(run)
        try:
            answer_sdp = await asyncio.wait_for(self._negotiate(pc, offer_sdp), timeout=self.timeout)
        except BaseException as exc:
            await self._teardown(run)
            self._runs.pop(preflight_id, None)
            if isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt, SystemExit)):
                raise
            log.info("preflight: offer refused (%s)", exc.__class__.__name__)
            raise PreflightRefused("preflight_bad_offer", "The network check's offer could not be used.") from None
        run.result = loop.create_future()
        run.task = asyncio.create_task(self._drive(run))
        return preflight_id, answer_sdp

    async def wait_result(self, preflight_id: str, timeout: float) -> PreflightResult:
        """Wait for a pre-flight's result and take it (a result is given once). Raises PreflightRefused
        ('preflight_unknown') for an unknown, taken or expired id, and TimeoutError when not done in time."""
        self._prune()
        run = self._runs.get(preflight_id)
        if run is None or run.result is None:
            raise PreflightRefused("preflight_unknown", "No network check with this id is waiting for its result.")
        result = await asyncio.wait_for(asyncio.shield(run.result), timeout=timeout)
        self._runs.pop(preflight_id, None)
        return result

    async def close(self) -> None:
        """Stop every running pre-flight and tear down its peer connection (broker shutdown)."""
        self._closed = True
        tasks = [run.task for run in self._runs.values() if run.task is not None and not run.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for run in list(self._runs.values()):
            await self._teardown(run)
        self._runs.clear()

    # -- internals -------------------------------------------------------------------------------------------

    def _watch(self, run: _Run) -> None:
        @run.pc.on("datachannel")
        def on_datachannel(channel: RTCDataChannel) -> None:
            if channel.label != CHANNEL_LABEL or run.channel.done():
                channel.close()
                return
            run.channel.set_result(channel)

        @run.pc.on("connectionstatechange")
        def on_state() -> None:
            if run.pc.connectionState in ("failed", "closed"):
                run.failed.set()

    async def _negotiate(self, pc: RTCPeerConnection, offer_sdp: str) -> str:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        if any(t.kind in ("audio", "video") for t in pc.getTransceivers()):  # belt and braces after check_offer
            raise ValueError("media in a pre-flight offer")
        await pc.setLocalDescription(await pc.createAnswer())  # gathers all candidates (no trickle)
        return pc.localDescription.sdp

    async def _drive(self, run: _Run) -> None:
        """Run the ping exchange, then always tear down, free the slot and publish the result."""
        loop = asyncio.get_running_loop()
        stats = _PingStats()
        try:
            remaining = max(0.0, run.deadline - loop.time())
            await asyncio.wait_for(self._exercise(run, stats), timeout=remaining)
        except (TimeoutError, ConnectionError):
            pass
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("preflight: unexpected error during the ping exchange", exc_info=True)
        finally:
            await self._teardown(run)
            result = PreflightResult(
                connected=stats.received > 0,
                rtt_ms_median=stats.median_ms(),
                relayed=stats.relayed and stats.received > 0,
                finished_at=time.time(),
                pings_sent=stats.sent,
                pongs_received=stats.received,
            )
            run.expires_at = loop.time() + self.result_ttl
            if run.result is not None and not run.result.done():
                run.result.set_result(result)
            loop.call_later(self.result_ttl + 0.1, self._prune)

    async def _exercise(self, run: _Run, stats: _PingStats) -> None:
        channel = await _first(run.channel, run.failed)
        all_back = asyncio.Event()

        @channel.on("message")
        def on_message(message: Any) -> None:
            if stats.record_pong(message):
                if stats.received == self.pings:
                    all_back.set()

        closed = asyncio.Event()
        channel.on("close", closed.set)
        for n in range(self.pings):
            if channel.readyState != "open":
                raise ConnectionError("pre-flight channel closed early")
            stats.mark_sent(n)
            channel.send(json.dumps({"t": "ping", "n": n}))
            await asyncio.sleep(_PING_SPACING)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_back.wait(), timeout=_PONG_GRACE)
        stats.relayed = relayed = _path_relayed(run.pc)
        if channel.readyState == "open":
            median = stats.median_ms()
            channel.send(
                json.dumps(
                    {
                        "t": "done",
                        "connected": stats.received > 0,
                        "rtt_ms": round(median, 1) if median is not None else None,
                        "relayed": relayed,
                    }
                )
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(closed.wait(), timeout=_CLOSE_GRACE)

    async def _teardown(self, run: _Run) -> None:
        try:
            await asyncio.wait_for(run.pc.close(), timeout=_TEARDOWN_LIMIT)
        except Exception:
            log.warning("preflight: peer connection did not close cleanly", exc_info=True)
        finally:
            self._open.discard(run.pc)
            self.slots.release(run.slot)
            if not run.channel.done():
                run.channel.cancel()

    def _prune(self) -> None:
        """Forget results nobody took within the TTL."""
        now = asyncio.get_running_loop().time()
        for preflight_id, run in list(self._runs.items()):
            if run.expires_at is not None and run.expires_at <= now:
                del self._runs[preflight_id]


class _PingStats:
    """Send times and round trips, measured on the broker's monotonic clock."""

    def __init__(self) -> None:
        self._sent_at: dict[int, float] = {}
        self._rtts: list[float] = []
        self.sent = 0
        self.relayed = False

    @property
    def received(self) -> int:
        return len(self._rtts)

    def mark_sent(self, n: int) -> None:
        self._sent_at[n] = time.monotonic()
        self.sent += 1

    def record_pong(self, message: Any) -> bool:
        """Count a well-formed pong for an outstanding ping once; ignore everything else."""
        if not isinstance(message, str) or len(message) > _MAX_MESSAGE:
            return False
        try:
            data = json.loads(message)
        except ValueError:
            return False
        if not isinstance(data, dict) or data.get("t") != "pong":
            return False
        n = data.get("n")
        if not isinstance(n, int) or isinstance(n, bool):
            return False
        sent_at = self._sent_at.pop(n, None)
        if sent_at is None:
            return False
        self._rtts.append((time.monotonic() - sent_at) * 1000.0)
        return True

    def median_ms(self) -> float | None:
        return statistics.median(self._rtts) if self._rtts else None


async def _first(future: asyncio.Future[RTCDataChannel], failed: asyncio.Event) -> RTCDataChannel:
    """The data channel, or ConnectionError as soon as the peer connection failed."""
    failure = asyncio.ensure_future(failed.wait())
    try:
        waiters: set[asyncio.Future[Any]] = {future, failure}
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        failure.cancel()
    if future.done() and not future.cancelled():
        return future.result()
    raise ConnectionError("pre-flight peer connection failed before its channel opened")


# -------------------------------------------------------------------------------------------------------------
# Python pre-flight client (used by broker.client.broker_client and the tests)


@dataclass(frozen=True)
class ClientPreflightReport:
    """What the client side saw. rtt_ms and relayed are the broker's figures, echoed for display only."""

    connected: bool
    pings_answered: int
    rtt_ms: float | None
    relayed: bool | None


async def run_preflight_client(
    answer_fn: Callable[[str], Awaitable[str]],
    ice_servers: list[Any] | None = None,
    *,
    relay_only: bool = False,
    timeout: float = 10.0,
) -> ClientPreflightReport:
    """Offer a "preflight" data channel, get the broker's answer through `answer_fn`, echo its pings.

    Errors raised by `answer_fn` (such as a refused offer) propagate; a network failure returns
    connected=False. The peer connection is always closed.
    """
    pc = RTCPeerConnection(configuration=_configuration(ice_servers, relay_only))
    channel = pc.createDataChannel(CHANNEL_LABEL, ordered=True)
    loop = asyncio.get_running_loop()
    done: asyncio.Future[dict[str, Any]] = loop.create_future()
    answered = 0

    @channel.on("message")
    def on_message(message: Any) -> None:
        nonlocal answered
        if not isinstance(message, str) or len(message) > _MAX_MESSAGE:
            return
        try:
            data = json.loads(message)
        except ValueError:
            return
        if not isinstance(data, dict):
            return
        if data.get("t") == "ping" and isinstance(data.get("n"), int) and channel.readyState == "open":
            channel.send(json.dumps({"t": "pong", "n": data["n"]}))
            answered += 1
        elif data.get("t") == "done" and not done.done():
            done.set_result(data)

    try:
        await pc.setLocalDescription(await pc.createOffer())  # aiortc gathers here, so the offer is complete
        answer_sdp = await answer_fn(pc.localDescription.sdp)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer_sdp, type="answer"))
        try:
            info = await asyncio.wait_for(done, timeout=timeout)
        except TimeoutError:
            return ClientPreflightReport(connected=False, pings_answered=answered, rtt_ms=None, relayed=None)
        rtt = info.get("rtt_ms")
        return ClientPreflightReport(
            connected=bool(info.get("connected")) and answered > 0,
            pings_answered=answered,
            rtt_ms=float(rtt) if isinstance(rtt, (int, float)) else None,
            relayed=bool(info.get("relayed")),
        )
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(pc.close(), timeout=_TEARDOWN_LIMIT)
