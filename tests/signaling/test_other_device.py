"""A client's link opened on another device: it waits for the therapist and never takes the seat by itself.

Review finding 1 (issue 25): a second ``join`` with a client's token was admitted at once, the
real client was closed, and the newcomer's candidates reached the therapist. Now the seat belongs
to the page that first opened it (its resume secret, memory only); any other join goes through the
checklist and the waiting room as the seat's *other device*, and the seat's holder stays in the
call until the therapist admits the newcomer. Run on the embedded store and on two brokers over Redis.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest

from broker.client.broker_client import BrokerClient
from broker.signaling.protocol import (
    Candidate,
    Declined,
    Error,
    ErrorCode,
    Joined,
    Peers,
    SeatState,
    Status,
    WaitingRoom,
)
from broker.signaling.relay import mailbox_key
from tests.client.test_client import waiting_client
from tests.conftest import RunningBroker, SessionLinks, schedule, start_broker_pair
from tests.redis_server import RedisServer, redis_server  # noqa: F401 - the fixture
from tests.signaling.test_hub import RawPeer


async def in_call(links: SessionLinks, therapist_url: str | None = None) -> tuple[BrokerClient, BrokerClient]:
    therapist = BrokerClient(links.therapist if therapist_url is None else therapist_url)
    await therapist.connect()
    client = await waiting_client(links)
    await therapist.admit(client.peer_id)
    await client.wait_connected(therapist.peer_id)
    return therapist, client


async def other_device_entry(therapist: BrokerClient, peer: str, state: SeatState) -> WaitingRoom:
    return await therapist.expect(  # type: ignore[return-value]
        WaitingRoom,
        where=lambda m: any(
            s.peer == peer and s.other_device is not None and s.other_device.state is state for s in m.seats
        ),
        timeout=15,
    )


async def test_a_forwarded_link_waits_and_the_client_stays_in_the_call(broker: RunningBroker) -> None:
    links = await schedule(broker)
    therapist, client = await in_call(links)
    stranger = BrokerClient(links.client, reconnect=False)
    try:
        joined = await stranger.connect()
        assert isinstance(joined, Joined)
        assert joined.other_device is True and joined.seat_state is SeatState.CHECKING
        assert joined.peer == client.peer_id  # the same seat, but not its holder
        room = await other_device_entry(therapist, client.peer_id, SeatState.CHECKING)
        entry = next(s for s in room.seats if s.peer == client.peer_id)
        assert entry.state is SeatState.ADMITTED and entry.connected  # the real client is untouched

        # The newcomer cannot signal as the seat, and nothing relayed to the seat reaches it.
        await stranger.send_raw(json.dumps({"type": "candidate", "to": therapist.peer_id, "candidate": "", "id": "x1"}))
        refused = await stranger.expect(Error, where=lambda m: m.ref == "x1")
        assert refused.code is ErrorCode.NOT_ADMITTED
        await therapist.send_raw(
            json.dumps({"type": "candidate", "to": client.peer_id, "candidate": "", "sdp_mid": "z"})
        )
        await client.expect(Candidate, where=lambda m: m.sdp_mid == "z")
        assert not [m for m in stranger.received if isinstance(m, Candidate)]

        # Through the checklist on its own, then the therapist sees it waiting, with its summary.
        assert (await stranger.preflight()).connected
        await stranger.submit_checklist(details={"location": "elsewhere", "contact": "someone"})
        await stranger.expect(Status, where=lambda m: m.seat_state is SeatState.WAITING)
        room = await other_device_entry(therapist, client.peer_id, SeatState.WAITING)
        other = next(s for s in room.seats if s.peer == client.peer_id).other_device
        assert other is not None and other.checklist is not None and other.checklist["all_required_met"]

        # Turned away: the newcomer goes, the client stays, and no other device may ask again ...
        await therapist.decline(client.peer_id, device=other.device)
        await stranger.expect(Declined)
        room = await therapist.expect(
            WaitingRoom, where=lambda m: m.seats[0].other_device is None and m.seats[0].other_device_declined
        )
        assert room.seats[0].state is SeatState.ADMITTED and client.final is None
        third = await RawPeer.open(broker)
        try:
            assert (await third.join(links.tokens[client.peer_id]))["code"] == "declined"
        finally:
            await third.close()
        # ... until the therapist allows it.
        await therapist.allow_return(client.peer_id)
        await therapist.expect(WaitingRoom, where=lambda m: not m.seats[0].other_device_declined)
        assert client.final is None and (await client.wait_connected(therapist.peer_id)).channel_open.is_set()
    finally:
        await stranger.close()
        await client.close()
        await therapist.close()


async def test_a_client_who_dropped_is_not_replaced_by_the_next_join(broker: RunningBroker) -> None:
    """Review finding 1: when the client dropped without ``leave``, the next join was admitted directly."""
    links = await schedule(broker)
    therapist, client = await in_call(links)
    await client.close()  # gone without a word (network lost, battery died)
    await therapist.expect(WaitingRoom, where=lambda m: not m.seats[0].connected)
    newcomer = await RawPeer.open(broker)
    try:
        joined = await newcomer.join(links.tokens[client.peer_id])
        assert joined["type"] == "joined" and joined["other_device"] is True
        assert joined["seat_state"] == "checking"
        assert not [m for m in (await drain(newcomer)) if m["type"] in ("peers", "offer", "answer", "candidate")]
        record = await broker.hub.get_session(links.session)
        assert record.seat(client.peer_id).conn is None  # the seat waits for its own device
    finally:
        await newcomer.close()
        await therapist.close()


async def raw_join(base_url: str, token: str, **extra: object) -> dict[str, object]:
    """One join on a bare WebSocket: the broker's answer (``joined`` or ``error``)."""
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(base_url + "/ws", origin=base_url) as ws:
            peer = RawPeer(ws, http)
            return await peer.join(token, **extra)


async def drain(peer: RawPeer, quiet_s: float = 0.5) -> list[dict[str, object]]:
    """Every frame that arrives until nothing has for ``quiet_s``."""
    got: list[dict[str, object]] = []
    while True:
        try:
            got.append(await peer.recv(quiet_s))
        except TimeoutError:
            return got


async def admit_other_device_and_check(
    links: SessionLinks, therapist: BrokerClient, client: BrokerClient, stranger_link: str
) -> None:
    """The newcomer passes the checklist, the therapist admits it: the seat moves, the old page stops,
    and the new device connects to the therapist peer to peer."""
    stranger = await waiting_client(links, link=stranger_link)
    try:
        assert stranger.joined is not None and stranger.joined.other_device
        room = await other_device_entry(therapist, client.peer_id, SeatState.WAITING)
        other = next(s for s in room.seats if s.peer == client.peer_id).other_device
        assert other is not None
        before = await therapist.expect(Peers, where=lambda m: any(p.peer == client.peer_id for p in m.peers))
        old_device = next(p.device for p in before.peers if p.peer == client.peer_id)
        assert old_device is not None
        await therapist.admit(client.peer_id, device=other.device)
        replaced = await client.expect(Error, where=lambda m: m.code is ErrorCode.REPLACED, timeout=15)
        assert client.final is replaced
        await stranger.expect(Status, where=lambda m: m.seat_state is SeatState.ADMITTED, timeout=15)
        peers = await therapist.expect(
            Peers, where=lambda m: any(p.peer == client.peer_id and p.device != old_device for p in m.peers), timeout=15
        )
        assert next(p for p in peers.peers if p.peer == client.peer_id).device == other.device
        link = await stranger.wait_connected(therapist.peer_id, timeout=20)
        assert link.trust == "verified_by_link"
        stranger.send_chat(therapist.peer_id, "here from my phone")
        t_link = await therapist.wait_connected(client.peer_id)
        assert await asyncio.wait_for(t_link.messages.get(), 10) == "here from my phone"
        # The old page cannot come back with its secret: its seat moved.
        await client.close()
        base = links.client.split("/j/")[0]
        answer = await raw_join(base, links.tokens[client.peer_id], resume_secret=client._resume_secret)
        assert answer["type"] == "error" and answer["code"] == "replaced"
    finally:
        await stranger.close()


async def test_admitting_the_other_device_moves_the_seat_to_it(broker: RunningBroker) -> None:
    links = await schedule(broker)
    therapist, client = await in_call(links)
    try:
        await admit_other_device_and_check(links, therapist, client, links.client)
    finally:
        await client.close()
        await therapist.close()


@pytest.mark.redis
async def test_admitting_the_other_device_moves_the_seat_across_processes(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    """The therapist and the seat's holder on process A, the other device on process B."""
    a, b = await start_broker_pair(tmp_path, redis_server.empty_database())
    try:
        links = await schedule(a)
        therapist, client = await in_call(links)
        try:
            await admit_other_device_and_check(links, therapist, client, links.client.replace(a.url, b.url))
        finally:
            await client.close()
            await therapist.close()
    finally:
        await a.stop()
        await b.stop()


async def test_a_seat_in_the_waiting_room_gets_no_relayed_signaling(broker: RunningBroker) -> None:
    """Review finding 5: an admitted client left, rejoined with ``resume: 0`` into the waiting room,
    and still received the therapist's earlier offer (fingerprint and host addresses)."""
    links = await schedule(broker)
    therapist, client = await in_call(links)
    peer = client.peer_id
    try:
        secret = client._resume_secret
        assert secret is not None
        assert await broker.broker.store.read_since(mailbox_key(links.session, peer), 0)  # the call's offer
        await client.leave()
        await therapist.expect(WaitingRoom, where=lambda m: m.seats[0].state is SeatState.LEFT)
        assert await broker.broker.store.read_since(mailbox_key(links.session, peer), 0) == []
        back = await RawPeer.open(broker)
        try:
            joined = await back.join(links.tokens[peer], resume=0, resume_secret=secret)
            assert joined["seat_state"] == "waiting" and joined["other_device"] is False
            frames = await drain(back)
            assert not [m for m in frames if m["type"] in ("offer", "answer", "candidate", "renegotiate")]
            assert [m for m in frames if m["type"] == "status"]
        finally:
            await back.close()
    finally:
        await client.close()
        await therapist.close()


async def test_removing_a_client_empties_its_seats_resume_buffer(broker: RunningBroker) -> None:
    links = await schedule(broker)
    therapist, client = await in_call(links)
    try:
        assert await broker.broker.store.read_since(mailbox_key(links.session, client.peer_id), 0)
        await therapist.remove(client.peer_id)
        await therapist.expect(WaitingRoom, where=lambda m: m.seats[0].state is SeatState.REMOVED)
        assert await broker.broker.store.read_since(mailbox_key(links.session, client.peer_id), 0) == []
    finally:
        await client.close()
        await therapist.close()


def audit_events(broker: RunningBroker, session: str, event: str) -> list[dict[str, object]]:
    lines = broker.config.audit_path.read_text().splitlines()
    return [entry for line in lines if (entry := json.loads(line)).get("event") == event and session in line]


async def test_a_client_leaving_is_one_seat_left_audit_entry_and_its_other_device_none(broker: RunningBroker) -> None:
    """A leave (the quick exit sends the same one) is an ordinary audit event with opaque ids only;
    an other device that goes was never the seat's, so it records nothing."""
    links = await schedule(broker)
    therapist, client = await in_call(links)
    try:
        stranger = BrokerClient(links.client, reconnect=False)
        await stranger.connect()
        await other_device_entry(therapist, client.peer_id, SeatState.CHECKING)
        await stranger.leave()
        await therapist.expect(WaitingRoom, where=lambda m: m.seats[0].other_device is None)
        assert audit_events(broker, links.session, "seat_left") == []
        await client.leave()
        await therapist.expect(WaitingRoom, where=lambda m: m.seats[0].state is SeatState.LEFT)
        for _ in range(50):
            if entries := audit_events(broker, links.session, "seat_left"):
                break
            await asyncio.sleep(0.05)
        assert [(e["actor"], e["outcome"]) for e in entries] == [(f"{links.session}-{client.peer_id}", "ok")]
    finally:
        await client.close()
        await therapist.close()
