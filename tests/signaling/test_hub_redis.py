"""The hub over Redis: what a bus outage drops is resent from the resume buffers, exactly once."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from broker.client.broker_client import BrokerClient
from broker.signaling.protocol import Candidate, Error, ErrorCode, Pong
from tests.client.test_client import waiting_client
from tests.conftest import RunningBroker, schedule, start_broker_pair
from tests.redis_server import RedisServer, redis_server  # noqa: F401 - the fixture

pytestmark = pytest.mark.redis
MESSAGES = 60


async def split_call(a: RunningBroker, b: RunningBroker) -> tuple[BrokerClient, BrokerClient]:
    """A session in call: the therapist on process A, the admitted client on process B."""
    links = await schedule(a)
    therapist = BrokerClient(links.therapist)
    await therapist.connect()
    client = await waiting_client(links, link=links.client.replace(a.url, b.url))
    await therapist.admit(client.peer_id)
    await client.wait_connected(therapist.peer_id)
    return therapist, client


async def test_messages_published_while_the_bus_reconnects_arrive_exactly_once(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    a, b = await start_broker_pair(tmp_path, redis_server.empty_database())
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        therapist, client = await split_call(a, b)
        before = a.hub.bus.reconnects

        async def send_all() -> None:
            for i in range(MESSAGES):
                frame = {"type": "candidate", "to": therapist.peer_id, "candidate": "", "sdp_mid": str(i)}
                await client.send_raw(json.dumps(frame))
                await asyncio.sleep(0.01)

        sending = asyncio.ensure_future(send_all())
        await asyncio.sleep(0.05)
        await raw.client_kill_filter(_type="pubsub")  # both processes lose their subscriptions mid-stream
        await sending
        got: list[str] = []
        for _ in range(MESSAGES):
            message = await therapist.expect(Candidate, where=lambda m: m.candidate == "", timeout=15)
            got.append(message.sdp_mid or "")
        assert a.hub.bus.reconnects > before  # the outage really happened
        assert got == [str(i) for i in range(MESSAGES)]  # all of them, in order
        assert therapist.duplicates == 0 and therapist.gaps == 0
        await client.close()
        await therapist.close()
    finally:
        await raw.aclose()
        await a.stop()
        await b.stop()


async def test_a_relay_checks_a_change_made_on_the_other_process_once_its_notice_arrived(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    """Relays check admission against a recent copy of the session record: a removal made on
    another process must count as soon as its notice (the new peer list) has arrived."""
    from broker.signaling.protocol import Error, ErrorCode, Peers

    a, b = await start_broker_pair(tmp_path, redis_server.empty_database())
    peers: list[BrokerClient] = []
    try:
        links = await schedule(a, clients=2)
        therapist = BrokerClient(links.therapist)  # on process A
        await therapist.connect()
        peers.append(therapist)
        sender = await waiting_client(links, link=links.clients[0].replace(a.url, b.url))  # on process B
        peers.append(sender)
        target = await waiting_client(links, link=links.clients[1])  # on process A
        peers.append(target)
        for client in (sender, target):
            await therapist.admit(client.peer_id)
        await sender.wait_connected(target.peer_id)
        for n in range(3):  # relays on B, so B holds a fresh copy of the record
            await sender.send_raw(
                json.dumps({"type": "candidate", "to": target.peer_id, "candidate": "", "sdp_mid": f"m{n}"})
            )
            await target.expect(Candidate, where=lambda m, n=n: m.sdp_mid == f"m{n}")
        mark = len(sender.received)
        await therapist.remove(target.peer_id)  # on process A
        await sender.expect(Peers, where=lambda m: target.peer_id not in {p.peer for p in m.peers}, since=mark)
        await sender.send_raw(json.dumps({"type": "candidate", "to": target.peer_id, "candidate": "", "id": "late"}))
        refused = await sender.expect(Error, where=lambda m: m.ref == "late")
        assert refused.code is ErrorCode.NOT_ADMITTED
    finally:
        for peer in peers:
            await peer.close()
        await a.stop()
        await b.stop()


async def test_a_relay_redis_fails_to_take_is_answered_with_its_ref(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    """Relays go to Redis without the connection waiting for them; a failure still reaches the sender."""
    a, b = await start_broker_pair(tmp_path, redis_server.empty_database())
    try:
        therapist, client = await split_call(a, b)
        warm = {"type": "candidate", "to": therapist.peer_id, "candidate": "", "sdp_mid": "warm"}
        await client.send_raw(json.dumps(warm))  # the relay record is now in process B's copy
        await therapist.expect(Candidate, where=lambda m: m.sdp_mid == "warm")

        with redis_server.client() as raw:
            raw.execute_command("CLIENT", "PAUSE", "1600", "ALL")
        held = {"type": "candidate", "to": therapist.peer_id, "candidate": "", "sdp_mid": "held", "id": "h1"}
        await client.send_raw(json.dumps(held))
        await client.send_raw(json.dumps({"type": "ping", "n": 7}))
        pong = await client.expect(Pong, where=lambda m: m.n == 7, timeout=0.8)  # not behind the relay
        assert pong.n == 7
        error = await client.expect(Error, where=lambda m: m.ref == "h1", timeout=5)
        assert error.code is ErrorCode.UNAVAILABLE
        await asyncio.sleep(0.8)  # the pause is over; the next relay goes through
        await client.send_raw(json.dumps({**warm, "sdp_mid": "after"}))
        await therapist.expect(Candidate, where=lambda m: m.sdp_mid == "after", timeout=5)
        await client.close()
        await therapist.close()
    finally:
        await a.stop()
        await b.stop()


async def test_a_relay_crosses_only_to_the_process_holding_its_recipient(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    """Each process subscribes the own channels of the peers it holds: a relay for the therapist
    on A goes to A alone, not back to B (which holds the sender) over the session's channel."""
    from broker.store.redis_bus_messages import channel_of, peer_channel_of

    a, b = await start_broker_pair(tmp_path, redis_server.empty_database())
    raw = aioredis.Redis.from_url(redis_server.url)
    spy = raw.pubsub()

    async def holders(peer: str) -> int:
        reply = await raw.execute_command("PUBSUB", "SHARDNUMSUB", peer_channel_of(therapist.session_id, peer))
        return int(reply[1])

    try:
        therapist, client = await split_call(a, b)  # the therapist on A, the client on B
        assert (await holders(therapist.peer_id), await holders(client.peer_id)) == (1, 1)
        await spy.ssubscribe(channel_of(therapist.session_id))
        await spy.get_message(timeout=1.0)  # the confirmation
        for n in range(3):
            frame = {"type": "candidate", "to": therapist.peer_id, "candidate": "", "sdp_mid": f"m{n}"}
            await client.send_raw(json.dumps(frame))
            await therapist.expect(Candidate, where=lambda m, n=n: m.sdp_mid == f"m{n}")
        assert await spy.get_message(ignore_subscribe_messages=True, timeout=0.5) is None
        await client.close()
        for _ in range(100):  # the client's process lets its channel go with its connection
            if await holders(client.peer_id) == 0:
                break
            await asyncio.sleep(0.02)
        assert (await holders(therapist.peer_id), await holders(client.peer_id)) == (1, 0)
        await therapist.close()
    finally:
        await spy.aclose()
        await raw.aclose()
        await a.stop()
        await b.stop()


async def test_a_group_spread_over_two_processes_loses_no_relay(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    """Three peers on two processes send to each other at once: every relay arrives exactly once.
    (Relays from the recipient's own process and from the other one reached it out of order, and
    the later, lower seq was dropped as if already sent: sessions-per-process benchmark, 2026-12-06.)"""
    from tests.client.test_client import waiting_client as ready_client

    a, b = await start_broker_pair(tmp_path, redis_server.empty_database())
    try:
        links = await schedule(a, clients=2)
        therapist = BrokerClient(links.therapist)
        await therapist.connect()
        one = await ready_client(links, link=links.clients[0])
        two = await ready_client(links, link=links.clients[1].replace(a.url, b.url))
        await therapist.admit(one.peer_id)
        await therapist.admit(two.peer_id)
        await one.wait_connected(therapist.peer_id)
        await two.wait_connected(therapist.peer_id)
        peers = {"t": therapist, "o": one, "w": two}
        count = 60  # 120 frames a peer: within its burst allowance

        async def burst(sender: str, to: str) -> None:
            for i in range(count):
                frame = {"type": "candidate", "to": peers[to].peer_id, "candidate": "", "sdp_mid": f"x{sender}{to}{i}"}
                await peers[sender].send_raw(json.dumps(frame))

        await asyncio.gather(*(burst(s, r) for s in peers for r in peers if s != r))
        for r, peer in peers.items():
            want = sorted(f"x{s}{r}{i}" for s in peers if s != r for i in range(count))
            for _ in range(len(want)):
                await peer.expect(Candidate, where=lambda m, r=r: (m.sdp_mid or "")[2:3] == r, timeout=10)
            got = sorted(
                m.sdp_mid or "" for m in peer.received if isinstance(m, Candidate) and (m.sdp_mid or "")[:1] == "x"
            )
            assert got == want and peer.gaps == 0 and peer.duplicates == 0, r
        for peer in peers.values():
            await peer.close()
    finally:
        await a.stop()
        await b.stop()
