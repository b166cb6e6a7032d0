"""``ping.ack`` (docs/protocol.md 5): a peer's acknowledged relays leave its seat's resume buffer,
and resuming after a dropped connection still sends what was not acknowledged, once, in order.

Without it an idle call kept every offer, answer and candidate of its set-up in the broker's
memory until the session ended (issue 32: the biggest share of a session's memory)."""

from __future__ import annotations

import asyncio
import json

from broker.client.broker_client import BrokerClient
from broker.signaling.protocol import Candidate, Pong
from broker.signaling.relay import mailbox_key
from tests.conftest import RunningBroker
from tests.signaling.test_hub import admitted_pair


async def buffered(broker: RunningBroker, session: str, peer: str) -> list[int]:
    return [seq for seq, _ in await broker.hub.store.read_since(mailbox_key(session, peer), 0)]


async def settles(broker: RunningBroker, session: str, peer: str, want: list[int], within_s: float = 8.0) -> None:
    """The seat's buffer comes to hold exactly ``want`` (the trim runs as its own task)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while (seqs := await buffered(broker, session, peer)) != want:
        assert loop.time() < deadline, f"the resume buffer holds {seqs}, not {want}"
        await asyncio.sleep(0.05)


async def ping(client: BrokerClient, n: int, ack: int) -> None:
    await client.send_raw(json.dumps({"type": "ping", "n": n, "ack": ack}))
    await client.expect(Pong, where=lambda m: m.n == n)


async def candidates_to(therapist: BrokerClient, client: BrokerClient, count: int, tag: str) -> None:
    for i in range(count):
        await therapist.send_raw(json.dumps({"type": "candidate", "to": client.peer_id, "candidate": f"{tag}{i}"}))


async def test_an_acknowledged_relay_leaves_the_resume_buffer_and_no_more(broker: RunningBroker) -> None:
    links, therapist, client = await admitted_pair(broker)
    try:
        await candidates_to(therapist, client, 3, "a")
        await client.expect(Candidate, where=lambda m: m.candidate == "a2")
        read = client.last_seq
        assert read >= 3 and (await buffered(broker, links.session, client.peer_id))[-1] == read
        await ping(client, 1, read - 2)
        await settles(broker, links.session, client.peer_id, [read - 1, read])
        await ping(client, 2, read - 5)  # an older acknowledgement changes nothing
        await ping(client, 3, 10**9)  # past what it was sent: counts as the last one it was sent
        await settles(broker, links.session, client.peer_id, [])
        await candidates_to(therapist, client, 1, "b")  # numbered on, and kept until acknowledged
        await client.expect(Candidate, where=lambda m: m.candidate == "b0")
        await asyncio.sleep(0.3)
        assert await buffered(broker, links.session, client.peer_id) == [read + 1]
    finally:
        await client.close()
        await therapist.close()


async def test_a_peer_that_comes_back_after_an_ack_gets_what_it_missed_once_in_order(broker: RunningBroker) -> None:
    links, therapist, client = await admitted_pair(broker)
    try:
        await candidates_to(therapist, client, 2, "a")
        await client.expect(Candidate, where=lambda m: m.candidate == "a1")
        await ping(client, 1, client.last_seq)
        await settles(broker, links.session, client.peer_id, [])
        assert client._ws is not None
        reconnects = client.reconnects
        await client._ws.close()  # the client's network drops; it reconnects by itself and resumes
        await candidates_to(therapist, client, 3, "b")
        for i in range(3):
            await client.expect(Candidate, where=lambda m, i=i: m.candidate == f"b{i}", timeout=10)  # type: ignore[misc]
        assert client.reconnects > reconnects and client.gaps == 0 and client.duplicates == 0
    finally:
        await client.close()
        await therapist.close()


async def test_the_python_client_acknowledges_on_its_keepalive_pings(broker: RunningBroker) -> None:
    """Nothing sent by hand: after two quiet seconds the client's keep-alive ping carries ``ack``,
    and the seat's buffer empties (what the browser client does too: web/js/protocol.js)."""
    links, therapist, client = await admitted_pair(broker)
    try:
        await candidates_to(therapist, client, 2, "a")
        await client.expect(Candidate, where=lambda m: m.candidate == "a1")
        assert await buffered(broker, links.session, client.peer_id)
        await settles(broker, links.session, client.peer_id, [], within_s=15)
        await settles(broker, links.session, therapist.peer_id, [], within_s=15)
    finally:
        await client.close()
        await therapist.close()
