"""Couples, families and groups (issue 21): a key per seat, the therapist vouches for every
client pair with a roster, and private time, with real aiortc peers through a real broker.

The attacks of a client that colludes with a malicious broker are in
tests/signaling/test_colluding_client.py.
"""

from __future__ import annotations

import asyncio

from broker.client.broker_client import BrokerClient
from broker.crypto.sdp_auth import Trust, fingerprint_of
from tests.client.seats import three_way, wait_for
from tests.conftest import RunningBroker


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
