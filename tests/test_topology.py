"""The compose topology on loopback, as processes: redis-server, coturn and two broker processes.

What deploy/compose.yaml runs, minus the TLS proxy: two ``python -m broker serve`` processes sharing
one real Redis and one server secret, both handing out short-lived TURN credentials for one real
coturn. Sessions are scheduled with ``broker session create --relay-only`` against broker A; the
therapist joins on broker A and the client on broker B, so every signaling message crosses Redis,
and with the relay-only policy every media packet crosses coturn.

- two aiortc peers (broker.client.broker_client): a relay-only pre-flight the broker itself sees relayed, then a
  call through coturn with chat both ways and a nominated relay/relay ICE pair on both sides;
- Chromium on both sides (the real join and therapist pages) decode each other's video through
  coturn; getStats() shows a selected pair whose local candidate is a relay;
- a TURN credential past its expiry gets the same pair no connection;
- a coturn with the production deny list (deploy/coturn/turnserver.conf) refuses to relay to a
  loopback peer, so the same pair gets no connection and coturn logs the refusal.

coturn allows loopback peers for the positive tests (everything here is on 127.0.0.1); the deny-list
check uses the separate coturn of tests/signaling/test_turn.py that carries the production list.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiortc import RTCPeerConnection
from playwright.async_api import Page, expect

from broker.client.broker_client import BrokerClient
from broker.client.peers import PeerLink
from broker.signaling.protocol import SeatState, Status, WaitingRoom
from broker.signaling.turn import turn_credentials
from tests.browser.conftest import NewContext, chromium, new_context, playwright, watch  # noqa: F401 - fixtures
from tests.browser.kit import RECORD_PEER_CONNECTIONS, Watch, frames_decoded, pass_checklist, wait_screen
from tests.redis_server import RedisServer, free_port, redis_server  # noqa: F401 - the fixture
from tests.signaling.test_turn import (  # noqa: F401 - the coturn fixtures
    NO_CONNECTION_WAIT,
    SECRET,
    Coturn,
    deny_list_turn,
    loopback_turn,
)
from tests.store.test_redis_cluster import REPO, BrokerProcess

pytestmark = [pytest.mark.redis, pytest.mark.alone]

DETAILS = {"location": "Topology test, 1 Loopback Lane", "contact": "Test contact, 0000"}

#: For every connected connection that receives video: its ICE policy and the selected pair's candidate types.
SELECTED_PAIRS = """async () => {
  const out = [];
  for (const pc of window.__peerConnections) {
    if (pc.connectionState !== 'connected') continue;
    const report = await pc.getStats();
    const byId = new Map();
    report.forEach((s) => byId.set(s.id, s));
    const video = [...byId.values()].some((s) => s.type === 'inbound-rtp' && s.kind === 'video');
    if (!video) continue;
    const transport = [...byId.values()].find((s) => s.type === 'transport' && s.selectedCandidatePairId);
    const pair = transport ? byId.get(transport.selectedCandidatePairId) : null;
    out.push({
      policy: pc.getConfiguration().iceTransportPolicy,
      local: pair ? byId.get(pair.localCandidateId)?.candidateType ?? null : null,
      remote: pair ? byId.get(pair.remoteCandidateId)?.candidateType ?? null : null,
      state: pair ? pair.state : null,
    });
  }
  return out;
}"""


# ---------------------------------------------------------------- the topology


@dataclass
class Topology:
    redis: RedisServer
    turn: Coturn
    a: BrokerProcess
    b: BrokerProcess
    env: dict[str, str]


@dataclass
class Scheduled:
    """A relay-only session from the CLI: therapist link on broker A, client link moved to broker B."""

    session: str
    therapist: str
    client: str
    link_key: str


@pytest.fixture(scope="module")
async def topology(
    redis_server: RedisServer,  # noqa: F811
    loopback_turn: Coturn,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Topology]:
    """Both brokers as processes, configured the way compose configures them (env only)."""
    redis_server.empty_database()
    root = tmp_path_factory.mktemp("topology")
    secret_file = root / "server.secret"
    secret_file.write_text(os.urandom(32).hex() + "\n")
    secret_file.chmod(0o600)
    env = {
        **os.environ,
        "BROKER_REDIS_URL": redis_server.url,
        "BROKER_SECRET_FILE": str(secret_file),
        "BROKER_TURN_URLS": loopback_turn.url,
        "BROKER_TURN_SECRET": SECRET,
        "BROKER_LOG_LEVEL": "warning",
        "PYTHONPATH": str(REPO),
    }
    brokers = []
    for name in ("a", "b"):
        data_dir = root / f"data-{name}"
        data_dir.mkdir(mode=0o700)
        brokers.append(BrokerProcess(name, free_port(), data_dir, env))
    try:
        for broker in brokers:
            broker.start()
        await asyncio.gather(*(broker.wait_ready() for broker in brokers))
        yield Topology(redis_server, loopback_turn, brokers[0], brokers[1], env)
    finally:
        for broker in brokers:
            broker.stop()


async def create_session(topology: Topology) -> Scheduled:
    """``broker session create --relay-only --json`` against broker A, as a practice admin runs it."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker", "session", "create", "--relay-only", "--json",
        "--data-dir", str(topology.a.data_dir),
        env=topology.env, cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode(errors="replace")[-2000:]
    created = json.loads(out)
    therapist = next(s["link"] for s in created["seats"] if s["role"] == "therapist")
    client = next(s["link"] for s in created["seats"] if s["role"] == "client")
    assert therapist.startswith(topology.a.url + "/t/") and client.startswith(topology.a.url + "/j/")
    link_key = client.split("#", 1)[1]
    return Scheduled(created["session"], therapist, topology.b.url + client[len(topology.a.url) :], link_key)


# ---------------------------------------------------------------- aiortc peers


async def admitted(
    scheduled: Scheduled, ice_servers: list[dict[str, Any]] | None = None, *, relayed_preflight: bool = False
) -> tuple[BrokerClient, BrokerClient]:
    """Therapist on A and client on B, pre-flight and checklist passed, client admitted.

    With ``relayed_preflight`` the pre-flight is relay-only, as the join page runs it in a relay-only
    session, and the broker's own measurement must say it went through the relay.
    """
    therapist = BrokerClient(scheduled.therapist, ice_servers=ice_servers)
    client = BrokerClient(scheduled.client, ice_servers=ice_servers)
    await therapist.connect()
    await client.connect()
    report = await client.preflight(relay_only=relayed_preflight)
    assert report.connected, "the network pre-flight through broker B did not connect"
    assert report.relayed is True or not relayed_preflight, "the broker did not see the pre-flight relayed"
    await client.submit_checklist(details=DETAILS)
    await therapist.expect(WaitingRoom, where=lambda m: any(s.state is SeatState.WAITING for s in m.seats))
    await therapist.admit(client.peer_id)
    await client.expect(Status, where=lambda m: m.seat_state is SeatState.ADMITTED)
    return therapist, client


async def close_all(*clients: BrokerClient) -> None:
    for client in clients:
        with contextlib.suppress(Exception):
            await client.close()


def local_candidate_types(pc: RTCPeerConnection) -> list[str]:
    """Every candidate this peer gathered (aiortc internals: SCTP -> DTLS -> ICE gatherer)."""
    gatherer = pc.sctp.transport.transport.iceGatherer  # type: ignore[union-attr]
    return [candidate.type for candidate in gatherer.getLocalCandidates()]


def nominated_pairs(pc: RTCPeerConnection) -> list[tuple[str, str]]:
    """(local, remote) candidate types of the nominated ICE pairs, read as broker/checklist/preflight.py reads them.

    aiortc has no candidate-pair stats, so this walks its internals; if they moved, the list is empty and
    the test fails on it rather than passing by accident.
    """
    sctp = pc.sctp
    transport = getattr(getattr(getattr(sctp, "transport", None), "transport", None), "_connection", None)
    nominated = getattr(transport, "_nominated", None) or {}
    return [(pair.local_candidate.type, pair.remote_candidate.type) for pair in list(nominated.values())]


async def chat(sender: BrokerClient, receiver: BrokerClient, text: str) -> str:
    sender.send_chat(receiver.peer_id, text)
    link: PeerLink = receiver.links[sender.peer_id]
    return await asyncio.wait_for(link.messages.get(), 10)


async def test_aiortc_peers_on_two_brokers_talk_through_coturn(topology: Topology) -> None:
    scheduled = await create_session(topology)
    therapist, client = await admitted(scheduled, relayed_preflight=True)
    try:
        joined = client.joined
        assert joined is not None and joined.ice_transport_policy == "relay"
        assert [server["urls"] for server in joined.ice_servers] == [[topology.turn.url]]
        assert client.peer_id not in joined.ice_servers[0]["username"], "coturn logs usernames: opaque ids only"
        assert therapist.joined is not None and therapist.joined.ice_transport_policy == "relay"

        to_client = await therapist.wait_connected(client.peer_id, timeout=20)
        to_therapist = await client.wait_connected(therapist.peer_id, timeout=20)
        assert await chat(therapist, client, "Hello from broker A") == "Hello from broker A"
        assert await chat(client, therapist, "Hello back from broker B") == "Hello back from broker B"

        for link in (to_client, to_therapist):
            assert set(local_candidate_types(link.pc)) == {"relay"}
            pairs = nominated_pairs(link.pc)
            assert pairs, "no nominated ICE pair found in aiortc's internals"
            assert all(pair == ("relay", "relay") for pair in pairs), pairs
        assert client.safety_code(therapist.peer_id) == therapist.safety_code(client.peer_id)
        assert not client.interceptions and not therapist.interceptions
    finally:
        await close_all(therapist, client)


async def assert_no_connection(therapist: BrokerClient, client: BrokerClient) -> None:
    """Signaling across the brokers works, media does not: no data channel opens on either side."""
    with pytest.raises(TimeoutError):
        await client.wait_connected(therapist.peer_id, timeout=NO_CONNECTION_WAIT)
    assert therapist.peer_id in client.links and client.peer_id in therapist.links, "the offer/answer never crossed"
    assert not therapist.links[client.peer_id].channel_open.is_set()


async def test_an_expired_turn_credential_gets_no_connection(topology: Topology) -> None:
    scheduled = await create_session(topology)
    expired = [dict(turn_credentials(SECRET, [topology.turn.url], -60))]
    therapist, client = await admitted(scheduled, ice_servers=expired)
    try:
        await assert_no_connection(therapist, client)
        for link in client.links.values():
            assert "relay" not in local_candidate_types(link.pc), "coturn allocated a relay for an expired credential"
    finally:
        await close_all(therapist, client)


async def test_the_production_deny_list_refuses_to_relay_to_loopback(
    topology: Topology,
    deny_list_turn: Coturn,  # noqa: F811
) -> None:
    scheduled = await create_session(topology)
    servers = [dict(turn_credentials(SECRET, [deny_list_turn.url], 600))]
    therapist, client = await admitted(scheduled, ice_servers=servers)
    try:
        await assert_no_connection(therapist, client)
        for link in client.links.values():
            assert set(local_candidate_types(link.pc)) == {"relay"}, "the allocation itself should succeed"
        assert "denied in the range" in deny_list_turn.log_text()
    finally:
        await close_all(therapist, client)


# ---------------------------------------------------------------- Chromium


async def relay_pairs(page: Page) -> list[dict[str, Any]]:
    """Wait until the page has a connected, video-receiving connection with a selected pair; return them all."""
    await expect(page.get_by_test_id("tile").first).to_have_attribute("data-relayed", "true")
    pairs: list[dict[str, Any]] = await page.evaluate(SELECTED_PAIRS)
    return pairs


@pytest.mark.browser
async def test_chromium_client_on_b_and_therapist_on_a_decode_video_through_coturn(
    topology: Topology,
    new_context: NewContext,  # noqa: F811
    watch: Watch,  # noqa: F811
) -> None:
    scheduled = await create_session(topology)
    watch.secrets.extend([scheduled.link_key, scheduled.therapist.split("#", 1)[1]])  # seat key, session secret
    pages = []
    for link in (scheduled.client, scheduled.therapist):
        context = await new_context()
        await context.add_init_script(RECORD_PEER_CONNECTIONS)
        page = await context.new_page()
        pages.append(page)
        await page.goto(link)
    client, therapist = pages

    await pass_checklist(client, location=DETAILS["location"], contact=DETAILS["contact"])
    await wait_screen(therapist, "dashboard")
    seat = therapist.get_by_test_id("seat")
    await expect(seat).to_have_attribute("data-state", "waiting")
    await seat.get_by_test_id("admit").click()
    await wait_screen(client, "call")
    await frames_decoded(client, 1)
    await frames_decoded(therapist, 1)

    for page in (client, therapist):
        pairs = await relay_pairs(page)
        assert pairs, "no connected peer connection receiving video"
        for pair in pairs:
            assert pair == {"policy": "relay", "local": "relay", "remote": "relay", "state": "succeeded"}, pair
    await watch.assert_clean()
