"""A deliberately malicious broker cannot intercept a call unnoticed (DESIGN.md section 4).

``MaliciousRelays`` is the hub's real relays with their relay step replaced: after the hub's own checks it
alters what it passes on. Peers holding the link key seal their offers, answers and candidates
(docs/protocol.md 7.7), so the relay can only alter, strip, replay, re-number, re-type or
re-address ciphertext, swap in a clear description of its own, inject candidates in clear,
or make up a peer. Real aiortc peers (``broker.client.broker_client``) must detect every such attack every
time, or ignore it where it can do no harm; through the honest relay they connect every time,
sealed, with equal safety codes on both sides. The clear path of an older peer (descriptions
in clear with a MAC) is attacked too.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection

from broker.client.broker_client import BrokerClient
from broker.client.peers import PeerLink
from broker.signaling.protocol import Answer, Candidate, Offer, encode
from broker.signaling.relay import Relays, mailbox_key
from broker.store.bus import Envelope
from tests.client.test_client import waiting_client
from tests.conftest import RunningBroker, SessionLinks, schedule, start_broker

ROUNDS = 20
ATTACKER_FINGERPRINT = "sha-256 " + ":".join(["AB"] * 32)
#: A base64url MAC the broker made up (it does not hold the link key).
MADE_UP_MAC = "bm90IHRoZSByZWFsIGtleQ"
#: On loopback, so a peer that adds it sends nothing off this machine.
HOST_CANDIDATE = "candidate:842163049 1 udp 1677729535 127.0.0.1 9 typ host generation 0"

Relayed = Offer | Answer | Candidate


def flip(text: str, at: int = 20) -> str:
    """One base64url character changed (to another of the same low bits, so it still decodes)."""
    return text[:at] + ("B" if text[at] != "B" else "C") + text[at + 1 :]


class MaliciousRelays(Relays):
    """The broker gone bad: every relayed offer, answer and candidate passes through ``tamper``
    after the hub's own checks (so it may even change who the message is for, or its type)."""

    mode = "honest"
    saved_offers: dict[tuple[str, str], Offer]
    saved_candidates: dict[tuple[str, str], Candidate]
    #: Its own description (a real aiortc offer: its certificate's fingerprint), to swap in.
    attacker_sdp: str = ""
    #: Where "readdress" sends what was meant for someone else: (sender, recipient) -> other recipient.
    redirect: dict[tuple[str, str], str]
    #: What passed through, for the checks of the honest runs: (type, sealed, the frame passed on).
    seen: list[tuple[str, bool, bytes]]

    def tamper(self, sender: str, message: Relayed) -> Relayed:
        sealed = message.sealed is not None
        if isinstance(message, Candidate):
            return self._tamper_candidate(sender, message)
        if self.mode == "fingerprint":  # put its own certificate's fingerprint in
            if sealed:  # it cannot see inside: it swaps in its own description, with a made-up MAC
                return msgspec.structs.replace(message, sealed=None, sdp=self.attacker_sdp, mac=MADE_UP_MAC)
            sdp = re.sub(r"a=fingerprint:\S+ \S+", f"a=fingerprint:{ATTACKER_FINGERPRINT}", message.sdp or "")
            return msgspec.structs.replace(message, sdp=sdp)
        if self.mode == "strip_mac":  # authentication removed: sealed, or the MAC
            if sealed:
                return msgspec.structs.replace(message, sealed=None, sdp=self.attacker_sdp, mac=None)
            return msgspec.structs.replace(message, mac=None)
        if self.mode == "corrupt_mac":
            if sealed:
                return msgspec.structs.replace(message, sealed=flip(message.sealed or ""))
            if message.mac:
                return msgspec.structs.replace(message, mac=flip(message.mac, 0))
        if self.mode == "recount" and message.counter is not None:
            return msgspec.structs.replace(message, counter=message.counter + 1)
        if self.mode == "retype":  # an answer passed off as an offer (and the reverse)
            other = Offer if isinstance(message, Answer) else Answer
            return other(**msgspec.structs.asdict(message))
        if self.mode == "readdress" and (sender, message.to) in self.redirect:
            return msgspec.structs.replace(message, to=self.redirect[(sender, message.to)])
        if self.mode == "replay" and isinstance(message, Offer):
            return self.saved_offers.setdefault((sender, message.to), message)
        return message

    def _tamper_candidate(self, sender: str, message: Candidate) -> Candidate:
        if message.sealed is None:
            return message
        if self.mode == "corrupt_candidates":
            return msgspec.structs.replace(message, sealed=flip(message.sealed))
        if self.mode == "strip_mac":  # consistent: sealed candidates would give the real sender away
            return msgspec.structs.replace(message, sealed=None, counter=None, candidate="")
        if self.mode == "replay_candidates":  # the first one again, instead of every later one
            return self.saved_candidates.setdefault((sender, message.to), message)
        return message

    def checked(self, conn: Any, message: Any, session: Any) -> tuple[Any, ...]:
        """Every relay, on the hub's fast path and on its awaited one, goes through here."""
        checked = Relays.checked(self, conn, message, session)
        if not isinstance(message, (Offer, Answer, Candidate)):
            return checked
        bad = self.tamper(conn.peer_id, message)
        if bad is not message:
            session_id, _envelope, store, _key, keep, ttl = checked
            data = encode(msgspec.structs.replace(bad, from_=conn.peer_id, id=None, seq=None))
            checked = session_id, Envelope(bad.to, None, data), store, mailbox_key(session_id, bad.to), keep, ttl
        self.seen.append((type(message).__name__, message.sealed is not None, checked[1].data))
        return checked

    async def inject(self, session_id: str, message: Relayed) -> None:
        """A message the broker made up, delivered as if relayed."""
        await self.bus.publish(session_id, Envelope(message.to, None, encode(message)))

    async def inject_fake_offer(self, session_id: str, to: str, *, mac: str | None, sealed: str | None = None) -> None:
        """A peer the therapist never admitted, made up by the broker, offers to a client."""
        counter = time.time_ns() // 1000
        if sealed is not None:
            offer = Offer(to=to, counter=counter, sealed=sealed, from_="FAKEpeer")
        else:
            offer = Offer(to=to, sdp=self.attacker_sdp, counter=counter, mac=mac, from_="FAKEpeer")
        await self.inject(session_id, offer)


async def attacker_description() -> str:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.createDataChannel("chat", negotiated=True, id=0)
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


def turn_malicious(running: RunningBroker, sdp: str) -> MaliciousRelays:
    relays = running.broker.hub.relays
    relays.__class__ = MaliciousRelays
    evil: MaliciousRelays = relays  # type: ignore[assignment]
    evil.saved_offers, evil.saved_candidates, evil.redirect, evil.seen = {}, {}, {}, []
    evil.attacker_sdp = sdp
    return evil


@pytest.fixture(scope="module")
async def evil(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningBroker]:
    running = await start_broker(Path(tmp_path_factory.mktemp("evil-broker")))
    turn_malicious(running, await attacker_description())
    yield running
    await running.stop()


class OlderClient(BrokerClient):
    """A peer of before sealed signaling: it holds the link key, but sends descriptions in
    clear with a MAC (docs/protocol.md 7.2), which a current peer still accepts as verified."""

    async def _send_description(self, link: PeerLink, kind: str) -> None:
        link.sealing = False
        await super()._send_description(link, kind)


def hub_of(running: RunningBroker) -> MaliciousRelays:
    return running.broker.hub.relays  # type: ignore[return-value]


async def admitted_pair(
    running: RunningBroker, therapist_class: type[BrokerClient] = BrokerClient
) -> tuple[BrokerClient, BrokerClient]:
    hub = hub_of(running)
    mode, hub.mode = hub.mode, "honest"  # set the call up honestly, then turn
    links = await schedule(running)
    therapist = therapist_class(links.therapist)
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


async def send_sealed_candidate(sender: BrokerClient, to: str, line: str = HOST_CANDIDATE) -> None:
    """A trickled candidate, sealed as a browser seals it (Python peers put theirs in the SDP)."""
    assert sender.auth is not None
    counter, sealed = sender.auth.seal(to, "candidate", {"candidate": line, "sdp_mid": "0", "sdp_mline_index": 0})
    await sender.send_raw(json.dumps({"type": "candidate", "to": to, "counter": counter, "sealed": sealed}))


async def test_honest_relay_connects_every_time_sealed_with_equal_safety_codes(evil: RunningBroker) -> None:
    hub = hub_of(evil)
    hub.mode = "honest"
    hub.seen.clear()
    therapist, client = await admitted_pair(evil)
    try:
        for _ in range(ROUNDS):
            old = therapist.links[client.peer_id]
            await client.renegotiate(therapist.peer_id)
            await wait_for(lambda old=old: therapist.links.get(client.peer_id) not in (None, old))
            t_link = await therapist.wait_connected(client.peer_id)
            c_link = await client.wait_connected(therapist.peer_id)
            assert t_link.trust == c_link.trust == "verified_by_link"
            assert t_link.remote_sealed and c_link.remote_sealed
            assert therapist.safety_code(client.peer_id) == client.safety_code(therapist.peer_id)
        await send_sealed_candidate(therapist, client.peer_id)
        await wait_for(lambda: any(kind == "Candidate" for kind, _, _ in hub.seen))
        assert therapist.interceptions == client.interceptions == []
        assert client.dropped == therapist.dropped == {}
        # Every description and candidate crossed the broker sealed: nothing of it in clear.
        assert len(hub.seen) >= 2 * ROUNDS + 1
        for _, sealed, frame in hub.seen:
            assert sealed and b"a=fingerprint" not in frame and b"candidate:" not in frame
    finally:
        hub.seen.clear()
        await client.close()
        await therapist.close()


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("fingerprint", "bad_mac"),  # its own description in place of the sealed one, with a made-up MAC
        ("strip_mac", "missing_mac"),  # its own description in place of the sealed one, without MAC
        ("corrupt_mac", "bad_mac"),  # the ciphertext altered
        ("recount", "bad_mac"),  # the counter in the header changed
        ("replay", "replayed_counter"),  # an old sealed offer again
    ],
)
async def test_every_tampered_offer_is_detected(evil: RunningBroker, mode: str, reason: str) -> None:
    hub = hub_of(evil)
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
            await wait_for(lambda round_=round_: len(client.interceptions) == round_ + 1)
            assert client.interceptions[-1].peer == therapist.peer_id
            assert client.interceptions[-1].reason == reason
            assert therapist.peer_id not in client.links  # the tampered connection was dropped
    finally:
        hub.mode = "honest"
        await client.close()
        await therapist.close()


@pytest.mark.parametrize("mode", ["corrupt_mac", "retype"])
async def test_tampered_answers_are_detected_by_the_offerer(evil: RunningBroker, mode: str) -> None:
    hub = hub_of(evil)
    hub.mode = mode
    therapist, client = await admitted_pair(evil)
    try:
        # Tamper only answers: the therapist (offerer) must catch each one ("retype" hands it an
        # offer made of the client's sealed answer).
        hub.tamper = lambda sender, m: MaliciousRelays.tamper(hub, sender, m) if isinstance(m, Answer) else m  # type: ignore[method-assign]
        for round_ in range(ROUNDS):
            await client.renegotiate(therapist.peer_id)
            await wait_for(lambda round_=round_: len(therapist.interceptions) == round_ + 1)
            assert therapist.interceptions[-1].reason == "bad_mac"
    finally:
        del hub.tamper
        hub.mode = "honest"
        await client.close()
        await therapist.close()


async def admitted_group(running: RunningBroker) -> tuple[SessionLinks, BrokerClient, BrokerClient, BrokerClient]:
    links = await schedule(running, clients=2)
    therapist = BrokerClient(links.therapist)
    await therapist.connect()
    one = await waiting_client(links, links.clients[0])
    two = await waiting_client(links, links.clients[1])
    await therapist.admit(one.peer_id)
    await therapist.admit(two.peer_id)
    await one.wait_connected(therapist.peer_id)
    await two.wait_connected(therapist.peer_id)
    return links, therapist, one, two


async def test_a_sealed_offer_re_addressed_to_another_peer_does_not_open(evil: RunningBroker) -> None:
    """In a group the broker hands the therapist's offer for one client to another."""
    hub = hub_of(evil)
    _, therapist, one, two = await admitted_group(evil)
    try:
        # Only the therapist's messages for one: the clients' own pair may still be trickling
        # candidates to each other, and two's own re-addressed back to it would muddle the count.
        hub.redirect = {(therapist.peer_id, one.peer_id): two.peer_id}
        hub.mode = "readdress"
        for round_ in range(ROUNDS):
            await one.renegotiate(therapist.peer_id)
            await wait_for(lambda round_=round_: len(two.interceptions) == round_ + 1)
            assert two.interceptions[-1].peer == therapist.peer_id
            assert two.interceptions[-1].reason == "bad_mac"
        assert one.interceptions == []
    finally:
        hub.mode = "honest"
        hub.redirect = {}
        for peer in (two, one, therapist):
            await peer.close()


async def test_tampered_sealed_candidates_are_detected_and_replayed_ones_ignored(evil: RunningBroker) -> None:
    hub = hub_of(evil)
    therapist, client = await admitted_pair(evil)
    try:
        hub.mode = "replay_candidates"  # the first sealed candidate, again and again
        for _ in range(ROUNDS + 1):
            await send_sealed_candidate(therapist, client.peer_id)
        await wait_for(lambda: client.dropped.get("candidate_replayed_counter") == ROUNDS)
        assert client.interceptions == []  # a replayed candidate can do no harm: ignored
        assert client.links[therapist.peer_id].channel_open.is_set()
        hub.mode = "corrupt_candidates"
        await send_sealed_candidate(therapist, client.peer_id)
        await wait_for(lambda: client.interceptions)
        assert [(i.peer, i.reason) for i in client.interceptions] == [(therapist.peer_id, "bad_mac")]
        assert therapist.peer_id not in client.links
    finally:
        hub.mode = "honest"
        await client.close()
        await therapist.close()


async def test_clear_candidates_the_broker_injects_are_dropped_without_a_warning(evil: RunningBroker) -> None:
    hub = hub_of(evil)
    hub.mode = "honest"
    links = await schedule(evil)
    therapist = BrokerClient(links.therapist)
    await therapist.connect()
    client = await waiting_client(links)
    try:
        fake = Candidate(
            to=client.peer_id, candidate=HOST_CANDIDATE, sdp_mid="0", sdp_mline_index=0, from_=therapist.peer_id
        )
        # Before the sealed offer (held back until it comes, then dropped) ...
        await hub.inject(links.session, fake)
        await therapist.admit(client.peer_id)
        c_link = await client.wait_connected(therapist.peer_id)
        assert client.dropped == {"clear_candidate": 1}
        # ... and after it.
        for _ in range(ROUNDS):
            await hub.inject(links.session, fake)
        await wait_for(lambda: client.dropped.get("clear_candidate") == ROUNDS + 1)
        assert client.interceptions == [] and c_link.channel_open.is_set()
        assert client.links[therapist.peer_id] is c_link
    finally:
        await client.close()
        await therapist.close()


async def test_an_older_peer_in_clear_with_a_mac_is_verified_and_still_protected(evil: RunningBroker) -> None:
    """A clear description with a valid MAC is accepted as verified by link; swapping its
    fingerprint is detected as before sealed signaling existed."""
    hub = hub_of(evil)
    hub.seen.clear()
    therapist, client = await admitted_pair(evil, OlderClient)
    try:
        c_link = client.links[therapist.peer_id]
        assert c_link.trust == "verified_by_link" and not c_link.remote_sealed and not c_link.sealing
        assert [(kind, sealed) for kind, sealed, _ in hub.seen] == [("Offer", False), ("Answer", False)]
        hub.mode = "fingerprint"
        for round_ in range(ROUNDS):
            await client.renegotiate(therapist.peer_id)
            await wait_for(lambda round_=round_: len(client.interceptions) == round_ + 1)
            assert client.interceptions[-1].reason == "bad_mac"
    finally:
        hub.mode = "honest"
        hub.seen.clear()
        await client.close()
        await therapist.close()


@pytest.mark.parametrize(
    ("mac", "sealed", "reason"),
    [(None, None, "missing_mac"), (MADE_UP_MAC, None, "bad_mac"), (None, "S3" * 40, "bad_mac")],
    ids=["no-mac", "made-up-mac", "made-up-sealed"],
)
async def test_a_fake_peer_without_the_link_key_is_detected(
    evil: RunningBroker, mac: str | None, sealed: str | None, reason: str
) -> None:
    hub = hub_of(evil)
    therapist, client = await admitted_pair(evil)
    try:
        for round_ in range(ROUNDS):
            await hub.inject_fake_offer(client.joined.session, client.peer_id, mac=mac, sealed=sealed)  # type: ignore[union-attr]
            await wait_for(lambda round_=round_: len(client.interceptions) == round_ + 1)
            assert client.interceptions[-1].peer == "FAKEpeer"
            assert client.interceptions[-1].reason == reason
            assert "FAKEpeer" not in client.links
        # The real call is untouched.
        assert client.links[therapist.peer_id].channel_open.is_set()
    finally:
        await client.close()
        await therapist.close()


async def test_detections_reach_the_audit_log_without_content(evil: RunningBroker) -> None:
    hub = hub_of(evil)
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
