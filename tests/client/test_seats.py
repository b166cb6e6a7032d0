"""Couples, families and groups (issue 21): a key per seat, the therapist vouches for every
client pair with a roster, and private time, with real aiortc peers through a real broker.

The attacks of a client that colludes with a malicious broker are in
tests/signaling/test_colluding_client.py.
"""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from aiortc import RTCCertificate, RTCConfiguration, RTCPeerConnection

from broker.client import negotiation
from broker.client.broker_client import BrokerClient
from broker.client.peers import check_uses_certificate, new_peer_connection
from broker.crypto.link_key import b64url_encode, decode_link_key
from broker.crypto.sdp_auth import Trust, fingerprint_of
from broker.crypto.seat_keys import group_key
from broker.signaling.protocol import Roster, WaitingRoom
from tests.client.seats import three_way, wait_for, waiting
from tests.conftest import RunningBroker, schedule


async def test_three_way_call_connects_every_pair_verified_with_equal_safety_codes(broker: RunningBroker) -> None:
    call = await three_way(broker)
    try:
        keys = {call.links.link_key, *call.links.seat_keys.values()}
        assert len(keys) == 3  # the therapist's link and each client's carry different keys
        for a in call.everyone:
            for b in call.everyone:
                if a is not b:
                    link = a.links[b.peer_id]
                    assert link.trust == Trust.VERIFIED_BY_LINK and link.remote_sealed
                    assert a.safety_code(b.peer_id) == b.safety_code(a.peer_id)
        for peer in call.everyone:  # one DTLS certificate for all of a peer's connections (7.8)
            assert len({fingerprint_of(link.pc.localDescription.sdp) for link in peer.links.values()}) == 1
        first, second = call.clients
        assert first.rosters_acted >= 1 and second.rosters_acted >= 1
        assert [i for p in call.everyone for i in p.interceptions] == []
    finally:
        await call.close()


async def inbound_packets(peer: BrokerClient, other: str | None = None) -> int:
    """RTP packets ``peer`` received so far (from ``other``, or from everyone), by aiortc's getStats."""
    total = 0
    for name, link in list(peer.links.items()):
        if other is not None and name != other:
            continue
        report = await link.pc.getStats()
        total += sum(s.packetsReceived for s in report.values() if s.type == "inbound-rtp")
    return total


async def grows(peer: BrokerClient, other: str | None = None, over: float = 0.6) -> bool:
    before = await inbound_packets(peer, other)
    await asyncio.sleep(over)
    return await inbound_packets(peer, other) > before


@pytest.mark.alone
async def test_private_time_stops_all_media_to_and_from_the_held_client_and_resumes_on_the_same_connections(
    broker: RunningBroker,
) -> None:
    call = await three_way(broker, media=True)
    therapist, (held, other) = call.therapist, call.clients
    try:
        connections = {p.peer_id: dict(p.links) for p in call.everyone}
        assert await grows(held) and await grows(other, held.peer_id) and await grows(therapist, held.peer_id)
        for _ in range(2):
            await therapist.hold(held.peer_id)
            await wait_for(lambda: held.self_held and other.is_held(held.peer_id) and therapist.is_held(held.peer_id))
            await asyncio.sleep(0.3)  # what was already on the wire
            assert not await grows(held, over=1.0)  # nothing reaches the held client, from anyone
            assert not await grows(therapist, held.peer_id) and not await grows(other, held.peer_id)
            assert await grows(other, therapist.peer_id)  # the others still talk
            assert not held.send_chat(therapist.peer_id, "hello?")
            await therapist.release(held.peer_id)
            await wait_for(lambda: not held.self_held and not other.is_held(held.peer_id))
            assert await grows(held, therapist.peer_id) and await grows(held, other.peer_id)
            assert await grows(therapist, held.peer_id) and await grows(other, held.peer_id)
            assert {p.peer_id: dict(p.links) for p in call.everyone} == connections  # the same RTCPeerConnections
        assert [i for p in call.everyone for i in p.interceptions] == []
    finally:
        await call.close()


class LateVouching(BrokerClient):
    """A therapist's side that vouches to one client (``late``) only ``delay`` seconds after it
    could have: its first rosters for that client are not sent, and ``delay`` seconds after the
    first of them a fresh one is. So that client gets the other's offer before any roster."""

    late: str | None = None
    delay = 1.5
    _vouching_late = False

    async def _send(self, message: msgspec.Struct) -> None:
        if isinstance(message, Roster) and message.to == self.late and self.delay:
            if not self._vouching_late:
                self._vouching_late = True
                self._spawn(self._vouch_later())
            return
        await super()._send(message)

    async def _vouch_later(self) -> None:
        await asyncio.sleep(self.delay)
        self.delay = 0
        assert self.late is not None
        self._roster_said.pop(self.late, None)
        await self._send_rosters()

    def _send_roster_copy(self, client: str, counter: int, sealed: str) -> None:
        if client != self.late or not self.delay:
            super()._send_roster_copy(client, counter, sealed)


async def late_roster_call(running: RunningBroker, delay: float) -> tuple[LateVouching, BrokerClient, BrokerClient]:
    """A three-way call whose answering client gets its first roster ``delay`` seconds late."""
    links = await schedule(running, clients=2)
    therapist = LateVouching(links.therapist)
    therapist.delay = delay
    await therapist.connect()
    first, second = await asyncio.gather(*(waiting(link) for link in links.clients))
    offerer, answerer = sorted((first, second), key=lambda c: c.peer_id)
    therapist.late = answerer.peer_id
    for client in (first, second):
        await therapist.admit(client.peer_id)
    return therapist, offerer, answerer


async def test_an_offer_before_any_roster_waits_for_one(broker: RunningBroker) -> None:
    therapist, offerer, answerer = await late_roster_call(broker, delay=1.5)
    try:
        await wait_for(lambda: answerer.dropped.get("waiting_for_roster", 0) >= 1)
        assert offerer.peer_id not in answerer.links  # kept, not answered: no key to check it with yet
        await answerer.wait_connected(offerer.peer_id, timeout=15)
        assert answerer.links[offerer.peer_id].trust == Trust.VERIFIED_BY_LINK
        assert answerer.safety_code(offerer.peer_id) == offerer.safety_code(answerer.peer_id)
        assert offerer.interceptions == answerer.interceptions == []
    finally:
        for peer in (therapist, offerer, answerer):
            await peer.close()


async def test_an_early_offer_kept_too_long_is_dropped_and_the_pair_connects_when_a_roster_comes(
    broker: RunningBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(negotiation, "EARLY_SIGNAL_S", 0.5)  # 30 s in the product
    therapist, offerer, answerer = await late_roster_call(broker, delay=2.0)
    try:
        await wait_for(lambda: answerer.dropped.get("waiting_for_roster", 0) >= 1)
        await answerer.wait_connected(offerer.peer_id, timeout=15)  # asked for a fresh offer
        assert answerer.links[offerer.peer_id].trust == Trust.VERIFIED_BY_LINK
        assert offerer.interceptions == answerer.interceptions == []
    finally:
        for peer in (therapist, offerer, answerer):
            await peer.close()


async def test_a_newer_roster_without_a_client_or_with_another_fingerprint_closes_the_pair(
    broker: RunningBroker,
) -> None:
    call = await three_way(broker)
    therapist, (first, second) = call.therapist, call.clients
    try:
        vouched = therapist._fingerprints.pop(second.peer_id)  # the therapist's side no longer vouches
        await therapist._send_rosters()
        await wait_for(lambda: second.peer_id not in first.links)
        await asyncio.sleep(0.5)
        assert second.peer_id not in first.links  # and no new connection without a roster
        therapist._fingerprints[second.peer_id] = vouched
        await therapist._send_rosters()
        await first.wait_connected(second.peer_id)
        await second.wait_connected(first.peer_id)
        assert [i for p in call.everyone for i in p.interceptions] == []
        # A roster that lists the client with another fingerprint (a reloaded page) closes the pair too.
        kept = first.links[second.peer_id]
        therapist._fingerprints[second.peer_id] = "sha-256 " + ":".join(["AB"] * 32)
        await therapist._send_rosters()
        await wait_for(lambda: first.links.get(second.peer_id) is not kept)
        assert kept.closed
    finally:
        await call.close()


async def test_without_the_session_secret_the_therapist_vouches_for_nobody_and_clients_do_not_connect(
    broker: RunningBroker,
) -> None:
    """A therapist on another device (its link without the fragment): calls with it proceed unverified,
    and since nobody vouches for them, the clients never connect to each other (7.8)."""
    links = await schedule(broker, clients=2)
    therapist = BrokerClient(links.therapist.split("#")[0])
    await therapist.connect()
    clients = [BrokerClient(link, allow_unverified=True) for link in links.clients]
    try:
        for client in clients:
            await client.connect()
            assert (await client.preflight()).connected
            await client.submit_checklist(details={"location": "home", "contact": "a friend"})
            await therapist.admit(client.peer_id)
        for client in clients:
            link = await client.wait_connected(therapist.peer_id)
            assert link.trust == Trust.UNVERIFIED
        await asyncio.sleep(1.5)
        first, second = clients
        assert second.peer_id not in first.links and first.peer_id not in second.links
        assert therapist.rosters_sent == 0 and first.rosters_acted == second.rosters_acted == 0
    finally:
        for peer in (*clients, therapist):
            await peer.close()


async def test_one_certificate_for_every_connection_and_aiortc_left_as_it_was() -> None:
    """new_peer_connection gives each connection the client's certificate (7.8), and afterwards
    aiortc makes a fresh one for every other RTCPeerConnection as before."""
    certificate = RTCCertificate.generateCertificate()
    pcs = [new_peer_connection(RTCConfiguration(iceServers=[]), certificate) for _ in range(2)]
    pcs.append(RTCPeerConnection(RTCConfiguration(iceServers=[])))
    try:
        prints = []
        for pc in pcs:
            pc.createDataChannel("chat", negotiated=True, id=0)
            await pc.setLocalDescription(await pc.createOffer())
            prints.append(fingerprint_of(pc.localDescription.sdp))
        check_uses_certificate(pcs[0], certificate)
        check_uses_certificate(pcs[1], certificate)
        assert prints[0] == prints[1] != prints[2]
        with pytest.raises(RuntimeError):
            check_uses_certificate(pcs[2], certificate)
    finally:
        for pc in pcs:
            await pc.close()


async def test_a_seat_taken_through_the_group_link_is_authenticated_under_the_group_key(
    broker: RunningBroker,
) -> None:
    """The group link's fragment is the group key (7.1): the therapist's side authenticates that
    seat (``group`` in ``peers`` and ``waiting_room``) and opens its details under it."""
    links = await schedule(broker, clients=2, group_link=True)
    key = b64url_encode(group_key(decode_link_key(links.link_key), links.session))
    therapist = BrokerClient(links.therapist)
    await therapist.connect()
    client = await waiting(f"{broker.url}/j/{links.tokens['group']}#{key}")
    try:
        room = await therapist.expect(
            WaitingRoom, where=lambda m: any(s.group and s.details for s in m.seats if s.peer == client.peer_id)
        )
        sealed = next(s.details for s in room.seats if s.peer == client.peer_id)
        assert sealed is not None and f"home of {client.peer_id}" in therapist.open_details(client.peer_id, sealed)
        await therapist.admit(client.peer_id)
        link = await client.wait_connected(therapist.peer_id)
        assert link.trust == Trust.VERIFIED_BY_LINK
        assert (await therapist.wait_connected(client.peer_id)).trust == Trust.VERIFIED_BY_LINK
        assert therapist.interceptions == client.interceptions == []
    finally:
        await client.close()
        await therapist.close()
