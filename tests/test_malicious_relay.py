"""A deliberately malicious broker cannot intercept a call unnoticed (DESIGN.md section 4).

``MaliciousHub`` is the real hub with its relay step replaced: it rewrites DTLS
fingerprints, strips or corrupts MACs, replays an old offer, or injects a fake
peer that lacks the link key. Real aiortc peers (``broker.client``) must detect
every attack, every time; through the honest relay they connect every time with
equal safety codes on both sides.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any, AsyncIterator

import msgspec
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection

from broker.bus import Envelope
from broker.client import BrokerClient
from broker.hub import Hub
from broker.protocol import Answer, Offer, encode

from .conftest import RunningBroker, schedule, start_broker
from .test_client import waiting_client

ROUNDS = 20
ATTACKER_FINGERPRINT = "sha-256 " + ":".join(["AB"] * 32)


class MaliciousHub(Hub):
    """The broker gone bad: every relayed offer and answer passes through ``tamper``."""

    mode = "honest"
    saved_offers: dict[tuple[str, str], Offer]

    def tamper(self, sender: str, message: Offer | Answer) -> Offer | Answer:
        if self.mode == "fingerprint":
            sdp = re.sub(r"a=fingerprint:\S+ \S+", f"a=fingerprint:{ATTACKER_FINGERPRINT}", message.sdp)
            return msgspec.structs.replace(message, sdp=sdp)
        if self.mode == "strip_mac":
            return msgspec.structs.replace(message, mac=None)
        if self.mode == "corrupt_mac" and message.mac:
            flipped = ("A" if message.mac[0] != "A" else "B") + message.mac[1:]
            return msgspec.structs.replace(message, mac=flipped)
        if self.mode == "replay" and isinstance(message, Offer):
            first = self.saved_offers.setdefault((sender, message.to), message)
            return first
        return message

    def _relay_checked(self, conn: Any, message: Any, session: Any) -> tuple[Any, ...]:
        """Every relay, on the hub's fast path and on its awaited one, goes through here."""
        if isinstance(message, (Offer, Answer)):
            message = self.tamper(conn.peer_id, message)
        return Hub._relay_checked(self, conn, message, session)

    async def inject_fake_offer(self, session_id: str, to: str, *, mac: str | None) -> None:
        """A peer the therapist never admitted, made up by the broker, offers to a client."""
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.createDataChannel("chat", negotiated=True, id=0)
        await pc.setLocalDescription(await pc.createOffer())
        offer = Offer(to=to, sdp=pc.localDescription.sdp, counter=time.time_ns() // 1000, mac=mac, from_="FAKEpeer")
        await pc.close()
        await self.bus.publish(session_id, Envelope(to, None, encode(offer)))


@pytest.fixture(scope="module")
async def evil(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningBroker]:
    running = await start_broker(Path(tmp_path_factory.mktemp("evil-broker")))
    running.broker.hub.__class__ = MaliciousHub
    running.broker.hub.saved_offers = {}
    yield running
    await running.stop()


async def admitted_pair(running: RunningBroker) -> tuple[BrokerClient, BrokerClient]:
    hub: MaliciousHub = running.broker.hub  # type: ignore[assignment]
    mode, hub.mode = hub.mode, "honest"  # set the call up honestly, then turn
    links = await schedule(running)
    therapist = BrokerClient(links.therapist)
    await therapist.connect()
    client = await waiting_client(links)
    await therapist.admit(client.peer_id)
    await client.wait_connected(therapist.peer_id)
    hub.mode = mode
    return therapist, client


async def wait_for(condition: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.02)


async def test_honest_relay_connects_every_time_with_equal_safety_codes(evil: RunningBroker) -> None:
    evil.broker.hub.mode = "honest"
    therapist, client = await admitted_pair(evil)
    try:
        for _ in range(ROUNDS):
            old = therapist.links[client.peer_id]
            await client.renegotiate(therapist.peer_id)
            await wait_for(lambda: therapist.links.get(client.peer_id) not in (None, old))
            t_link = await therapist.wait_connected(client.peer_id)
            c_link = await client.wait_connected(therapist.peer_id)
            assert t_link.trust == c_link.trust == "verified_by_link"
            assert therapist.safety_code(client.peer_id) == client.safety_code(therapist.peer_id)
        assert therapist.interceptions == client.interceptions == []
    finally:
        await client.close()
        await therapist.close()


@pytest.mark.parametrize(
    ("mode", "reason"),
    [("fingerprint", "bad_mac"), ("strip_mac", "missing_mac"), ("corrupt_mac", "bad_mac"), ("replay", "replayed_counter")],
)
async def test_every_tampered_offer_is_detected(evil: RunningBroker, mode: str, reason: str) -> None:
    hub: MaliciousHub = evil.broker.hub  # type: ignore[assignment]
    hub.mode = mode
    therapist, client = await admitted_pair(evil)
    try:
        if mode == "replay":
            # The relay keeps the first offer it sees from here on and sends it again instead of new ones.
            hub.saved_offers.clear()
            await client.renegotiate(therapist.peer_id)
            await wait_for(lambda: (therapist.peer_id, client.peer_id) in hub.saved_offers)
            await client.wait_connected(therapist.peer_id)
        for round_ in range(ROUNDS):
            await client.renegotiate(therapist.peer_id)
            await wait_for(lambda: len(client.interceptions) == round_ + 1)
            assert client.interceptions[-1].peer == therapist.peer_id
            assert client.interceptions[-1].reason == reason
            assert therapist.peer_id not in client.links  # the tampered connection was dropped
    finally:
        hub.mode = "honest"
        await client.close()
        await therapist.close()


async def test_tampered_answers_are_detected_by_the_offerer(evil: RunningBroker) -> None:
    hub: MaliciousHub = evil.broker.hub  # type: ignore[assignment]
    hub.mode = "fingerprint"
    therapist, client = await admitted_pair(evil)
    try:
        # Tamper only answers: the therapist (offerer) must catch each one.
        hub.tamper = lambda sender, m: MaliciousHub.tamper(hub, sender, m) if isinstance(m, Answer) else m  # type: ignore[method-assign]
        for round_ in range(ROUNDS):
            await client.renegotiate(therapist.peer_id)
            await wait_for(lambda: len(therapist.interceptions) == round_ + 1)
            assert therapist.interceptions[-1].reason == "bad_mac"
    finally:
        del hub.tamper
        hub.mode = "honest"
        await client.close()
        await therapist.close()


@pytest.mark.parametrize("mac", [None, "bm90IHRoZSByZWFsIGtleQ"])
async def test_a_fake_peer_without_the_link_key_is_detected(evil: RunningBroker, mac: str | None) -> None:
    hub: MaliciousHub = evil.broker.hub  # type: ignore[assignment]
    therapist, client = await admitted_pair(evil)
    try:
        for round_ in range(ROUNDS):
            await hub.inject_fake_offer(client.joined.session, client.peer_id, mac=mac)  # type: ignore[union-attr]
            await wait_for(lambda: len(client.interceptions) == round_ + 1)
            assert client.interceptions[-1].peer == "FAKEpeer"
            assert client.interceptions[-1].reason == ("missing_mac" if mac is None else "bad_mac")
            assert "FAKEpeer" not in client.links
        # The real call is untouched.
        assert client.links[therapist.peer_id].channel_open.is_set()
    finally:
        await client.close()
        await therapist.close()


async def test_detections_reach_the_audit_log_without_content(evil: RunningBroker) -> None:
    hub: MaliciousHub = evil.broker.hub  # type: ignore[assignment]
    therapist, client = await admitted_pair(evil)
    try:
        session = client.joined.session  # type: ignore[union-attr]
        log_path = evil.config.audit_path

        def warnings() -> list[str]:
            lines = log_path.read_text().splitlines()
            return [line for line in lines if "interception_warning" in line and session in line]

        assert warnings() == []
        await hub.inject_fake_offer(session, client.peer_id, mac=None)
        await wait_for(lambda: client.interceptions)
        await wait_for(warnings)
        entry = json.loads(warnings()[-1])
        assert entry["actor"] == f"{session}-{client.peer_id}" and entry["outcome"] == "warning"
        # Content-free: fixed fields only, and nothing of the offer (random ids may spell "sdp" by chance,
        # so the check looks for the offer's own marks instead).
        assert set(entry) == {"actor", "event", "hash", "outcome", "prev", "seq", "session", "time"}
        for mark in ("FAKEpeer", "v=0", "a=fingerprint", "a=ice-ufrag", "\\r\\n"):
            assert mark not in warnings()[-1]
    finally:
        await client.close()
        await therapist.close()
