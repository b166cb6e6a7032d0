"""The broker's network pre-flight peer against real aiortc clients, a real coturn and Debian's Chromium."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from broker.checklist.preflight import (
    PreflightRefused,
    PreflightResult,
    PreflightService,
    run_preflight_client,
)
from broker.checklist.preflight_slots import SlotLimits
from broker.client.broker_client import BrokerClient, BrokerError
from broker.config import Config
from broker.config_check import check_config
from broker.signaling.protocol import Error, ErrorCode, Ping, Pong, PreflightAnswer, PreflightOffer
from tests.conftest import RunningBroker, schedule, start_broker

WEB_DIR = Path(__file__).resolve().parents[2] / "web"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
]


def _free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def _client_offer(
    *, audio: bool = False, video: bool = False, label: str = "preflight"
) -> tuple[RTCPeerConnection, str]:
    """A real aiortc offer; the caller closes the returned peer connection."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    if audio:
        pc.addTransceiver("audio")
    if video:
        pc.addTransceiver("video")
    pc.createDataChannel(label)
    await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp


class _Answerer:
    """answer_fn for run_preflight_client that remembers the pre-flight ids the service handed out
    (one seat of its own, in a session of its own, unless told)."""

    def __init__(self, service: PreflightService, session: str = "", seat: str = "") -> None:
        self.service = service
        self.session = session or secrets.token_hex(4)
        self.seat = seat or secrets.token_hex(4)
        self.ids: list[str] = []

    async def __call__(self, offer_sdp: str) -> str:
        preflight_id, answer_sdp = await self.service.answer(offer_sdp, self.session, self.seat)
        self.ids.append(preflight_id)
        return answer_sdp


# -- aiortc client <-> PreflightService ------------------------------------------------------------------------


async def test_success_measures_rtt_on_the_broker():
    service = PreflightService(pings=5)
    answerer = _Answerer(service)
    report = await run_preflight_client(answerer)
    result = await service.wait_result(answerer.ids[0], timeout=30)
    assert isinstance(result, PreflightResult)
    assert result.connected is True
    assert result.rtt_ms_median is not None and result.rtt_ms_median > 0
    assert result.relayed is False
    assert result.pings_sent == 5 and result.pongs_received == 5
    assert result.finished_at <= time.time()
    assert report.connected and report.pings_answered == 5 and report.relayed is False
    assert report.rtt_ms is not None
    assert service.open_peer_count() == 0 and service.active_count() == 0


async def test_result_is_given_once_and_unknown_ids_are_refused():
    service = PreflightService(pings=2)
    answerer = _Answerer(service)
    await run_preflight_client(answerer)
    assert (await service.wait_result(answerer.ids[0], timeout=30)).connected
    for preflight_id in (answerer.ids[0], "never-issued"):
        with pytest.raises(PreflightRefused) as caught:
            await service.wait_result(preflight_id, timeout=1)
        assert caught.value.code == "preflight_unknown"


async def test_untaken_result_expires_after_its_ttl():
    service = PreflightService(pings=1, result_ttl=0.2)
    answerer = _Answerer(service)
    await run_preflight_client(answerer)
    while service.active_count():  # wait for the run to finish without taking its result
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.4)
    with pytest.raises(PreflightRefused) as caught:
        await service.wait_result(answerer.ids[0], timeout=1)
    assert caught.value.code == "preflight_unknown"


@pytest.mark.parametrize("media", ["audio", "video"])
async def test_offer_with_media_is_refused(media):
    service = PreflightService()
    pc, offer = await _client_offer(**{media: True})
    try:
        assert f"m={media}" in offer
        with pytest.raises(PreflightRefused) as caught:
            await service.answer(offer, "s", "p")
        assert caught.value.code == "preflight_media_refused"
        assert service.open_peer_count() == 0 and service.active_count() == 0
    finally:
        await pc.close()


@pytest.mark.parametrize(
    "offer",
    [
        "",
        "hello broker",
        "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n",  # no media section at all
        "v=0\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\nthis is not sdp\r\n",
        "v=0\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\nc=IN IP4 0.0.0.0\r\n",  # no ice, no dtls
        "v=0\r\nm=text 9 RTP/AVP 0\r\n",
        "v=0\r\n" + "a=x:" + "y" * 40000 + "\r\n",
    ],
)
async def test_garbage_offer_is_refused(offer):
    service = PreflightService()
    with pytest.raises(PreflightRefused) as caught:
        await service.answer(offer, "s", "p")
    assert caught.value.code == "preflight_bad_offer"
    assert service.open_peer_count() == 0 and service.active_count() == 0


async def test_concurrency_limit_refuses_cleanly_and_a_slot_frees():
    service = PreflightService(SlotLimits(slots=1, wait_s=0), timeout=1.5, pings=2)
    stalled_pc, stalled_offer = await _client_offer()
    other_pc, other_offer = await _client_offer()
    try:
        first_id, _ = await service.answer(stalled_offer, "s1", "p1")  # never completed by its client
        assert service.active_count() == 1
        with pytest.raises(PreflightRefused) as caught:
            await service.answer(other_offer, "s2", "p2")
        assert caught.value.code == "preflight_busy"
        assert caught.value.retry_after_s is not None and caught.value.retry_after_s >= 1
        assert service.open_peer_count() == 1  # the refused offer made no peer connection
        stalled = await service.wait_result(first_id, timeout=30)
        assert stalled.connected is False
        assert service.active_count() == 0 and service.open_peer_count() == 0
        answerer = _Answerer(service)
        assert (await run_preflight_client(answerer)).connected
        assert (await service.wait_result(answerer.ids[0], timeout=30)).connected
    finally:
        await stalled_pc.close()
        await other_pc.close()


async def test_client_that_never_opens_the_channel_times_out_without_leaks():
    service = PreflightService(timeout=1.0)
    pc, offer = await _client_offer()
    try:
        preflight_id, answer_sdp = await service.answer(offer, "s", "p")
        assert "m=application" in answer_sdp and "a=candidate" in answer_sdp  # no trickle: candidates included
        result = await service.wait_result(preflight_id, timeout=30)
        assert result.connected is False and result.rtt_ms_median is None and result.pings_sent == 0
        assert service.open_peer_count() == 0
    finally:
        await pc.close()


async def test_channel_with_another_label_is_not_a_preflight():
    service = PreflightService(timeout=1.0)
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    channel = pc.createDataChannel("chat")
    seen: list[str] = []
    channel.on("message", seen.append)
    try:
        await pc.setLocalDescription(await pc.createOffer())
        preflight_id, answer_sdp = await service.answer(pc.localDescription.sdp, "s", "p")
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer_sdp, type="answer"))
        result = await service.wait_result(preflight_id, timeout=30)
        assert result.connected is False and seen == []
        assert service.open_peer_count() == 0
    finally:
        await pc.close()


async def test_close_tears_down_running_preflights():
    service = PreflightService(timeout=30.0)
    pc, offer = await _client_offer()
    try:
        preflight_id, _ = await service.answer(offer, "s1", "p1")
        assert service.open_peer_count() == 1
        await service.close()
        assert service.open_peer_count() == 0 and service.active_count() == 0
        with pytest.raises(PreflightRefused) as caught:
            await service.answer(offer, "s2", "p2")
        assert caught.value.code == "preflight_busy"
    finally:
        await pc.close()


async def test_an_offer_waits_for_a_slot_instead_of_being_refused():
    service = PreflightService(SlotLimits(slots=1, wait_s=20), timeout=1.0, pings=2)
    stalled_pc, stalled_offer = await _client_offer()
    try:
        await service.answer(stalled_offer, "s1", "p1")  # holds the only slot until its timeout
        answerer = _Answerer(service, "s2", "p2")
        report = await run_preflight_client(answerer)  # waits, then runs once the slot is free
        assert report.connected
        assert (await service.wait_result(answerer.ids[0], timeout=30)).connected
    finally:
        await stalled_pc.close()
    assert service.active_count() == 0 and service.open_peer_count() == 0


async def test_a_freed_slot_goes_first_to_a_seat_that_had_no_preflight_yet():
    service = PreflightService(SlotLimits(slots=1, wait_s=30), timeout=1.0, pings=1)
    often = _Answerer(service, "s1", "often")
    for _ in range(3):  # a seat that has already had several pre-flights
        assert (await run_preflight_client(often)).connected
    pcs: list[RTCPeerConnection] = []
    order: list[str] = []
    try:
        offers = {}
        for name in ("holder", "often", "fresh"):
            pc, offers[name] = await _client_offer()  # stalled: each holds its slot until the timeout
            pcs.append(pc)
        await service.answer(offers["holder"], "s2", "holder")

        async def offer(session: str, seat: str) -> None:
            await service.answer(offers[seat], session, seat)
            order.append(seat)

        tasks = []
        for session, seat in (("s1", "often"), ("s3", "fresh")):  # "often" asks first
            tasks.append(asyncio.ensure_future(offer(session, seat)))
            while service.slots.waiting_count() < len(tasks):
                await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)
    finally:
        for pc in pcs:
            await pc.close()
    assert order == ["fresh", "often"]


# -- the finding (issue 25, 4): one client link hammering offers against a real broker ----------------------------


async def _stalled_offer() -> tuple[RTCPeerConnection, str]:
    """An offer whose sender never answers the broker: each copy holds a broker peer connection until its timeout."""
    return await _client_offer()


class _Hammer:
    """Clients that each send ``per_burst`` pre-flight offers every 2 s, without waiting for replies."""

    def __init__(self, clients: list[BrokerClient], offer_sdp: str, per_burst: int) -> None:
        self.clients = clients
        self.offer_sdp = offer_sdp
        self.per_burst = per_burst
        self.sent = 0
        self.stop = asyncio.Event()

    async def run(self) -> None:
        while not self.stop.is_set():
            for client in self.clients:
                for _ in range(self.per_burst):
                    self.sent += 1
                    frame = {"type": "preflight_offer", "sdp": self.offer_sdp, "id": f"h{self.sent}"}
                    await client.send_raw(json.dumps(frame))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 2.0)

    def replies(self) -> tuple[list[PreflightAnswer], list[Error]]:
        answers = [m for c in self.clients for m in c.received if isinstance(m, PreflightAnswer)]
        errors = [m for c in self.clients for m in c.received if isinstance(m, Error) and (m.ref or "").startswith("h")]
        return answers, errors


async def _victim_run(broker: RunningBroker) -> str:
    """A client of a session of its own runs its pre-flight once (no retry) and submits its checklist:
    "ok", or the error code it got."""
    return await _one_run((await schedule(broker)).client)


async def _one_run(link: str) -> str:
    """A client runs its pre-flight once (no retry) and submits its checklist: "ok", or the error code it got."""
    client = BrokerClient(link, reconnect=False)
    await client.connect()
    try:

        async def exchange(offer_sdp: str) -> str:
            reply = await client.request(PreflightOffer(sdp=offer_sdp), PreflightAnswer, timeout=30)
            return reply.sdp  # type: ignore[union-attr]

        report = await run_preflight_client(exchange)
        if not report.connected:
            return "not_connected"
        await client.submit_checklist(details={"location": "home", "contact": "a friend"})  # the broker's record
        return "ok"
    except BrokerError as exc:
        return exc.code.value
    finally:
        await client.close()


async def _victims_while_hammered(broker: RunningBroker, hammer: _Hammer, runs: int) -> list[str]:
    hammering = asyncio.ensure_future(hammer.run())
    try:
        await asyncio.sleep(2.5)  # the hammer has filled whatever it can
        outcomes = []
        for _ in range(runs):
            outcomes.append(await _victim_run(broker))
            await asyncio.sleep(0.3)
    finally:
        hammer.stop.set()
        await hammering
    return outcomes


@pytest_asyncio.fixture(loop_scope="session")
async def default_broker(tmp_path: Path) -> AsyncIterator[RunningBroker]:
    """A broker of its own, with the default pre-flight limits (the hammering must not touch other tests);
    its group sessions are all peer to peer (a pre-flight is the same either way)."""
    running = await start_broker(tmp_path / "data", mesh_max_participants=16)
    yield running
    await running.stop()


async def test_a_hammering_seat_cannot_keep_another_sessions_client_out(default_broker: RunningBroker) -> None:
    """Before the fix, 4 offers every 2 s from one seat kept every other session at preflight_busy."""
    attacker_links = await schedule(default_broker)
    attacker = BrokerClient(attacker_links.client, reconnect=False)
    await attacker.connect()
    stalled_pc, offer = await _stalled_offer()
    try:
        hammer = _Hammer([attacker], offer, per_burst=4)
        outcomes = await _victims_while_hammered(default_broker, hammer, runs=12)
        await asyncio.sleep(0.5)  # the last burst's replies
        answers, errors = hammer.replies()
    finally:
        await attacker.close()
        await stalled_pc.close()
    assert outcomes == ["ok"] * 12
    # The hammering seat ran one pre-flight at a time, and was told why and when to come back.
    assert 1 <= len(answers) <= 6  # at most its rate per minute (the test takes well under one)
    assert len(answers) + len(errors) == hammer.sent
    assert errors and {e.code for e in errors} == {ErrorCode.PREFLIGHT_LIMITED}
    assert all(e.retry_after_ms is not None and 0 < e.retry_after_ms <= 61_000 for e in errors)
    assert any("already running" in e.message for e in errors)


async def test_a_practices_busy_minute_never_sees_preflight_busy(default_broker: RunningBroker) -> None:
    """The default limits fit a practice's normal load: eight clients of eight sessions and a family of six in
    one session all start their checklist at the same moment, and each pre-flight runs at its first offer."""
    singles = [(await schedule(default_broker)).client for _ in range(8)]
    family = (await schedule(default_broker, clients=6)).clients
    outcomes = await asyncio.gather(*(_one_run(link) for link in singles + family))
    assert outcomes == ["ok"] * 14


async def test_hammering_from_every_seat_of_a_group_session_leaves_slots_for_others(
    default_broker: RunningBroker,
) -> None:
    attacker_links = await schedule(default_broker, clients=8)
    attackers = [BrokerClient(link, reconnect=False) for link in attacker_links.clients]
    for client in attackers:
        await client.connect()
    stalled_pc, offer = await _stalled_offer()
    try:
        hammer = _Hammer(attackers, offer, per_burst=2)
        outcomes = await _victims_while_hammered(default_broker, hammer, runs=12)
        await asyncio.sleep(0.5)
        answers, errors = hammer.replies()
    finally:
        for client in attackers:
            await client.close()
        await stalled_pc.close()
    assert outcomes == ["ok"] * 12
    assert answers and errors
    assert {e.code for e in errors} <= {ErrorCode.PREFLIGHT_LIMITED, ErrorCode.PREFLIGHT_BUSY}
    assert all(e.retry_after_ms is not None and e.retry_after_ms > 0 for e in errors)


async def test_a_ping_is_answered_while_a_preflight_waits_for_a_slot(tmp_path: Path) -> None:
    """A wait for a pre-flight slot can last seconds; the connection's next frames are read meanwhile.
    Before, the page's ``ping`` waited behind the offer, and a client takes a broker silent for 5 s
    as hung: a page queueing for a slot dropped its connection and started over."""
    running = await start_broker(tmp_path / "data", preflight_slots=1, preflight_wait_s=6)
    first = BrokerClient((await schedule(running)).client, reconnect=False)
    second = BrokerClient((await schedule(running)).client, reconnect=False)
    stalled_pc, offer = await _stalled_offer()
    try:
        await first.connect()
        await second.connect()
        await first.request(PreflightOffer(sdp=offer), PreflightAnswer)  # holds the only slot
        waiting = asyncio.ensure_future(second.request(PreflightOffer(sdp=offer), PreflightAnswer, timeout=15))
        await asyncio.sleep(0.5)
        assert not waiting.done()
        started = time.monotonic()
        pong = await second.request(Ping(n=7), Pong, timeout=4)
        assert pong.n == 7 and time.monotonic() - started < 1.0 and not waiting.done()
        with pytest.raises(BrokerError) as caught:
            await waiting
        assert caught.value.code is ErrorCode.PREFLIGHT_BUSY
    finally:
        await first.close()
        await second.close()
        await stalled_pc.close()
        await running.stop()


async def test_the_slots_are_configured_and_checked(tmp_path: Path) -> None:
    problems = check_config(Config(data_dir=tmp_path, preflight_slots=0, preflight_wait_s=-1))
    assert any("preflight_slots" in p for p in problems) and any("preflight_wait_s" in p for p in problems)
    running = await start_broker(tmp_path / "data", preflight_slots=1, preflight_wait_s=0)
    first = BrokerClient((await schedule(running)).client, reconnect=False)
    second = BrokerClient((await schedule(running)).client, reconnect=False)
    stalled_pc, offer = await _stalled_offer()
    try:
        await first.connect()
        await second.connect()
        await first.request(PreflightOffer(sdp=offer), PreflightAnswer)  # holds the only slot
        with pytest.raises(BrokerError) as caught:
            await second.request(PreflightOffer(sdp=offer), PreflightAnswer)
        assert caught.value.code is ErrorCode.PREFLIGHT_BUSY
        assert caught.value.error.retry_after_ms is not None and 1000 <= caught.value.error.retry_after_ms <= 10_000
    finally:
        await first.close()
        await second.close()
        await stalled_pc.close()
        await running.stop()


# -- through a TURN relay (real coturn on loopback) -------------------------------------------------------------


@pytest.fixture(scope="module")
def turn_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    if shutil.which("turnserver") is None:
        pytest.fail("coturn (turnserver) is not installed; the test command must install it")
    workdir = tmp_path_factory.mktemp("turn")
    secret = secrets.token_hex(16)
    proc: subprocess.Popen[bytes] | None = None
    for _attempt in range(3):  # a port found free may be taken by another process before coturn binds it
        port = _free_port(socket.SOCK_DGRAM)
        relay_low = 40000 + secrets.randbelow(20000)
        proc = _start_turnserver(workdir, port, secret, relay_low)
        if proc is not None:
            break
    if proc is None:
        pytest.fail("turnserver did not answer a STUN binding request (three ports tried)")
    username = f"{int(time.time()) + 600}:preflight-test"
    credential = base64.b64encode(hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()).decode()
    try:
        yield {"urls": f"turn:127.0.0.1:{port}?transport=udp", "username": username, "credential": credential}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _start_turnserver(workdir: Path, port: int, secret: str, relay_low: int) -> subprocess.Popen[bytes] | None:
    """coturn on ``port``, once it answers a STUN binding request (within 20 s); None if it does not."""
    proc = subprocess.Popen(
        [
            "turnserver",
            "-n",
            "--listening-ip=127.0.0.1",
            "--relay-ip=127.0.0.1",
            f"--listening-port={port}",
            "--use-auth-secret",
            f"--static-auth-secret={secret}",
            "--realm=test",
            "--no-tls",
            "--no-dtls",
            "--no-cli",
            "--fingerprint",
            "--allow-loopback-peers",
            f"--min-port={relay_low}",
            f"--max-port={relay_low + 50}",
            f"--userdb={workdir / f'turndb-{port}.sqlite'}",
            f"--pidfile={workdir / f'turn-{port}.pid'}",
            "--no-stdout-log",
            f"--log-file={workdir / 'turn.log'}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while not _answers_stun(port):  # bound is not yet serving: wait for a STUN binding answer
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            return None
        time.sleep(0.05)
    return proc


def _answers_stun(port: int) -> bool:
    """Whether the TURN server answers a STUN Binding request (RFC 8489: type 1, no attributes)."""
    transaction = secrets.token_bytes(12)
    request = (1).to_bytes(2, "big") + (0).to_bytes(2, "big") + (0x2112A442).to_bytes(4, "big") + transaction
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.2)
        sock.sendto(request, ("127.0.0.1", port))
        try:
            reply = sock.recv(2048)
        except OSError:
            return False
    return reply[8:20] == transaction


def _udp_port_taken(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


async def test_relayed_path_is_detected_by_the_broker(turn_server):
    service = PreflightService(pings=3)
    answerer = _Answerer(service)
    report = await run_preflight_client(answerer, ice_servers=[turn_server], relay_only=True)
    result = await service.wait_result(answerer.ids[0], timeout=30)
    assert result.connected is True and result.relayed is True
    assert result.rtt_ms_median is not None
    assert report.relayed is True
    assert service.open_peer_count() == 0


# -- Chromium running web/js/preflight.js ---------------------------------------------------------------------

_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>pre-flight test</title></head>
<body>pre-flight test</body></html>"""


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def preflight_site() -> AsyncIterator[tuple[str, PreflightService]]:
    """web/ at /static/ plus POST /preflight answering through a real PreflightService."""
    service = PreflightService(pings=5)

    async def page(_: web.Request) -> web.Response:
        return web.Response(text=_PAGE, content_type="text/html")

    async def offer(request: web.Request) -> web.Response:
        body = await request.json()
        try:
            preflight_id, answer_sdp = await service.answer(body["sdp"], "page", secrets.token_hex(4))
        except PreflightRefused as exc:
            return web.json_response({"error": exc.code}, status=409)
        return web.json_response({"preflight_id": preflight_id, "sdp": answer_sdp})

    app = web.Application()
    app.router.add_get("/", page)
    app.router.add_post("/preflight", offer)
    app.router.add_static("/static/", WEB_DIR)
    runner = web.AppRunner(app)
    await runner.setup()
    port = _free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}", service
    finally:
        await service.close()
        await runner.cleanup()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def browser():
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


_TRACK_PEERS = """() => {
  const Native = window.RTCPeerConnection;
  window.createdPeers = [];
  window.RTCPeerConnection = class extends Native {
    constructor(config) { super(config); window.createdPeers.push(this); }
  };
}"""

_RUN_IN_PAGE = """async () => {
  const { runPreflight } = await import("/static/js/preflight.js");
  let preflightId = null;
  const sendOffer = async (sdp) => {
    const response = await fetch("/preflight", {
      method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ sdp }),
    });
    const body = await response.json();
    if (!response.ok) throw new Error(body.error);
    preflightId = body.preflight_id;
    return body.sdp;
  };
  const report = await runPreflight(sendOffer, { iceServers: [] });
  return { report, preflightId };
}"""


@pytest.mark.browser
async def test_chromium_preflight_against_the_broker(browser, preflight_site):
    base_url, service = preflight_site
    context = await browser.new_context()
    try:
        page = await context.new_page()
        await page.goto(base_url + "/")
        await page.evaluate(_TRACK_PEERS)
        outcome = await page.evaluate(_RUN_IN_PAGE)
        closed_after = await page.evaluate(
            """async () => { const { runPreflight } = await import("/static/js/preflight.js");
                 try { await runPreflight(async () => { throw new Error("refused"); }); return "resolved"; }
                 catch (e) { return e.message; } }"""
        )
        peer_states = await page.evaluate("() => window.createdPeers.map((pc) => pc.signalingState)")
    finally:
        await context.close()
    result = await service.wait_result(outcome["preflightId"], timeout=30)
    assert result.connected is True
    assert result.rtt_ms_median is not None and result.rtt_ms_median > 0
    assert result.relayed is False and result.pongs_received == 5
    report = outcome["report"]
    assert report["connected"] is True and report["pings"] == 5 and report["reason"] is None
    assert json.dumps(report)
    assert closed_after == "refused"
    assert peer_states == ["closed", "closed"]  # closed on success and when the broker refused
    assert service.open_peer_count() == 0
