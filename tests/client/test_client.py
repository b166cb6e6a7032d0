"""Therapist and client connect through a real broker with real aiortc peers."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiortc import RTCConfiguration, RTCPeerConnection
from aiortc.mediastreams import MediaStreamError

from broker.client.broker_client import BrokerClient
from broker.client.links import parse_link
from broker.signaling.protocol import (
    ChecklistAccepted,
    Error,
    ErrorCode,
    Peers,
    PreflightAnswer,
    SeatState,
    Status,
    WaitingRoom,
)
from tests.conftest import RunningBroker, SessionLinks, schedule


async def waiting_client(links: SessionLinks, link: str | None = None, **kwargs: object) -> BrokerClient:
    """A client who passed the pre-flight and the checklist and now waits."""
    client = BrokerClient(link or links.client, **kwargs)  # type: ignore[arg-type]
    await client.connect()
    report = await client.preflight()
    assert report.connected
    await client.submit_checklist(details={"location": "home", "contact": "a friend"})
    await client.expect(Status, where=lambda m: m.seat_state is SeatState.WAITING)
    return client


async def test_parse_link_keeps_fragment_local() -> None:
    link = parse_link("https://broker.example/base/j/TOKEN#KEY")
    assert (link.base_url, link.role, link.token, link.link_key) == (
        "https://broker.example/base",
        "client",
        "TOKEN",
        "KEY",
    )


async def test_call_connects_with_data_both_ways_and_audio(broker: RunningBroker) -> None:
    links = await schedule(broker)
    therapist = BrokerClient(links.therapist, media=True)
    await therapist.connect()
    client = await waiting_client(links, media=True)
    try:
        room = await therapist.expect(WaitingRoom, where=lambda m: m.seats[0].state is SeatState.WAITING)
        entry = room.seats[0]
        assert entry.checklist is not None and entry.checklist["all_required_met"] is True
        assert entry.details is not None  # sealed for the therapist, opaque to the broker
        await therapist.admit(entry.peer)

        t_link = await therapist.wait_connected(client.peer_id)
        c_link = await client.wait_connected(therapist.peer_id)
        therapist.send_chat(client.peer_id, "hello from the therapist")
        client.send_chat(therapist.peer_id, "hello from the client")
        assert await asyncio.wait_for(c_link.messages.get(), 10) == "hello from the therapist"
        assert await asyncio.wait_for(t_link.messages.get(), 10) == "hello from the client"

        audio = next(t for t in c_link.remote_tracks if t.kind == "audio")
        frame = await asyncio.wait_for(audio.recv(), 10)
        assert frame.sample_rate > 0

        therapist.send_media_state(client.peer_id, audio=False, video=True)
        while c_link.remote_media["audio"]:
            await asyncio.sleep(0.02)
        assert c_link.remote_media == {"audio": False, "video": True}

        assert t_link.trust == c_link.trust == "verified_by_link"
        assert therapist.safety_code(client.peer_id) == client.safety_code(therapist.peer_id)
        assert therapist.interceptions == client.interceptions == []
    finally:
        await client.close()
        await therapist.close()


async def test_nothing_is_relayed_before_admission(broker: RunningBroker) -> None:
    links = await schedule(broker)
    therapist = BrokerClient(links.therapist)
    await therapist.connect()
    client = await waiting_client(links)
    try:
        # Neither side has been told of the other, and forcing an offer is refused.
        assert not any(isinstance(m, Peers) and m.peers for m in client.received + therapist.received)
        before = len(client.received)
        await therapist.send_raw(
            '{"type":"offer","to":"' + client.peer_id + '","sdp":"v=0","counter":1,"mac":"x","id":"o1"}'
        )
        error = await therapist.expect(type(_error()), where=lambda m: m.ref == "o1")
        assert error.code.value == "not_admitted"
        await client.send_raw('{"type":"candidate","to":"' + therapist.peer_id + '","candidate":"","id":"c1"}')
        error = await client.expect(type(_error()), where=lambda m: m.ref == "c1")
        assert error.code.value == "not_admitted"
        await asyncio.sleep(0.2)
        assert not any(type(m).__name__ in ("Offer", "Candidate") for m in client.received[before:])
        assert client.links == {} and therapist.links == {}

        await therapist.admit(client.peer_id)
        await client.wait_connected(therapist.peer_id)
    finally:
        await client.close()
        await therapist.close()


async def test_checklist_is_accepted_once(broker: RunningBroker) -> None:
    links = await schedule(broker)
    client = await waiting_client(links)
    try:
        assert isinstance(client.received, list)
        assert any(isinstance(m, ChecklistAccepted) for m in client.received)
    finally:
        await client.close()


def _error():  # noqa: ANN202 - the Error struct type, via an instance
    from broker.signaling.protocol import Error, ErrorCode

    return Error(code=ErrorCode.INTERNAL, message="")


async def test_a_peer_connection_slow_to_close_does_not_hold_up_the_client(broker: RunningBroker) -> None:
    """aiortc's close can take a long while to give up, even when cancelled: the client's own
    close stops waiting for it after its bound and lets it finish by itself."""
    links = await schedule(broker)
    therapist = BrokerClient(links.therapist)
    await therapist.connect()
    client = await waiting_client(links)
    released = asyncio.Event()
    try:
        await therapist.admit(client.peer_id)
        link = await client.wait_connected(therapist.peer_id)
        real_close = link.pc.close

        async def slow_to_give_up() -> None:  # the real connection's close, once let go
            while not released.is_set():
                try:
                    await released.wait()
                except asyncio.CancelledError:
                    continue
            await real_close()

        link.pc.close = slow_to_give_up  # type: ignore[method-assign]
        closing = asyncio.ensure_future(client.close())
        await asyncio.wait({closing}, timeout=20)
        assert closing.done() and closing.exception() is None
    finally:
        released.set()
        await therapist.close()


async def test_audio_track_stops_cleanly_on_close(broker: RunningBroker) -> None:
    links = await schedule(broker)
    therapist = BrokerClient(links.therapist, media=True)
    await therapist.connect()
    client = await waiting_client(links, media=True)
    await therapist.admit(client.peer_id)
    c_link = await client.wait_connected(therapist.peer_id)
    audio = next(t for t in c_link.remote_tracks if t.kind == "audio")
    await therapist.close()
    try:
        while True:
            await asyncio.wait_for(audio.recv(), 10)
    except MediaStreamError:
        pass
    await client.close()


async def test_emergency_details_reach_only_the_therapist(broker: RunningBroker) -> None:
    from broker.store.base import session_prefix

    links = await schedule(broker)
    therapist = BrokerClient(links.therapist)
    await therapist.connect()
    client = BrokerClient(links.client)
    await client.connect()
    try:
        await client.preflight()
        canary = {"location": "canary-flat-3b-riverside", "contact": "canary-sister-0170"}
        await client.submit_checklist(details=canary)
        room = await therapist.expect(WaitingRoom, where=lambda m: m.seats[0].details is not None)
        sealed = room.seats[0].details
        opened = therapist.open_details(client.peer_id, sealed)  # under that client's seat key
        assert json.loads(opened) == canary
        store = broker.broker.store
        for key in await store.keys(session_prefix(links.session)):
            value = await store.get(key) or b""
            assert b"canary" not in value
    finally:
        await client.close()
        await therapist.close()


async def test_the_safety_plan_reaches_only_the_therapist_and_goes_with_the_session(broker: RunningBroker) -> None:
    """Issue 29: the client's safety plan is sealed like the emergency details: the broker carries
    it to the therapist in the checklist result and keeps only ciphertext; the therapist's side
    opens it with that seat's key, the other client of a couple cannot, and it ends with the session."""
    from broker.crypto.link_key import decode_link_key
    from broker.crypto.safety_plan import SafetyPlan, SafetyPlanError, open_safety_plan
    from broker.store.base import session_prefix

    links = await schedule(broker, clients=2)
    therapist = BrokerClient(links.therapist)
    await therapist.connect()
    client = BrokerClient(links.clients[0])
    await client.connect()
    try:
        await client.preflight()
        plan = SafetyPlan("canary-raining-there", False, "canary-text-first-0170")
        accepted = await client.submit_checklist(details={"location": "home", "contact": "a friend"}, safety_plan=plan)
        sealed = accepted.summary["safety_plan"]
        assert isinstance(sealed, str) and "canary" not in sealed
        room = await therapist.expect(
            WaitingRoom, where=lambda m: any(s.checklist and s.checklist.get("safety_plan") for s in m.seats)
        )
        entry = next(s for s in room.seats if s.peer == client.peer_id)
        assert entry.checklist is not None and entry.checklist["safety_plan"] == sealed
        assert therapist.open_safety_plan(client.peer_id, sealed) == plan
        other = next(peer for peer in links.seat_keys if peer != client.peer_id)
        with pytest.raises(SafetyPlanError):  # the other client of the session, given the blob
            open_safety_plan(decode_link_key(links.seat_keys[other]), links.session, client.peer_id, sealed)
        store = broker.broker.store
        keys = await store.keys(session_prefix(links.session))
        assert keys
        for key in keys:
            assert b"canary" not in (await store.get(key) or b"")
        await therapist.end()
        for _ in range(50):  # the broker tells everyone first, then forgets every key of the session
            if not await store.keys(session_prefix(links.session)):
                break
            await asyncio.sleep(0.1)
        assert await store.keys(session_prefix(links.session)) == []
    finally:
        await client.close()
        await therapist.close()


async def test_preflight_waits_as_the_broker_says_and_tries_again(broker: RunningBroker) -> None:
    """A seat's pre-flight still running (here one whose sender never finishes it) makes the broker refuse the
    next with preflight_limited and a retry hint; the client waits that long and runs its own."""
    links = await schedule(broker)
    client = BrokerClient(links.client)
    await client.connect()
    stalled = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        stalled.createDataChannel("preflight")
        await stalled.setLocalDescription(await stalled.createOffer())
        await client.send_raw(json.dumps({"type": "preflight_offer", "sdp": stalled.localDescription.sdp, "id": "s1"}))
        await client.expect(PreflightAnswer)
        report = await client.preflight()
        assert report.connected
        refused = [m for m in client.received if isinstance(m, Error)]
        assert [m.code for m in refused] == [ErrorCode.PREFLIGHT_LIMITED]
        assert refused[0].retry_after_ms is not None and 1000 <= refused[0].retry_after_ms <= 10_000
        await client.submit_checklist(details={"location": "home", "contact": "a friend"})  # its own run counted
    finally:
        await stalled.close()
        await client.close()


async def test_the_broker_keeps_no_checklist_answer_item_by_item(broker: RunningBroker) -> None:
    """Review (issue 25): a host holding the server secret read the client's checklist answers item by
    item. The broker now keeps only that the required items were met, the policy version and its own
    pre-flight result; each answer reaches the therapist sealed with the link key."""
    from broker.crypto.link_key import decode_link_key
    from broker.crypto.sealed_for_therapist import open_checklist
    from broker.signaling.session_records import encode_record

    links = await schedule(broker)
    therapist = BrokerClient(links.therapist)
    await therapist.connect()
    client = BrokerClient(links.client)
    try:
        await client.connect()
        assert (await client.preflight()).connected
        policy = client.joined.policy if client.joined else None
        assert policy is not None
        answers = {item["id"]: item["id"] != "headset" for item in policy["items"]}  # headset is recommended
        await client.submit_checklist(answers, details={"location": "home", "contact": "a friend"})
        room = await therapist.expect(WaitingRoom, where=lambda m: m.seats[0].state is SeatState.WAITING)
        summary = room.seats[0].checklist
        assert summary is not None and set(summary) == {
            "policy_version",
            "all_required_met",
            "network",
            "answers_sealed",
            "safety_plan",
            "language",
        }
        assert summary["safety_plan"] is None  # optional: this client set none
        assert summary["language"] is None  # optional: this client named no language (docs/protocol.md 5)
        key = decode_link_key(links.seat_keys[client.peer_id])
        opened = open_checklist(key, links.session, client.peer_id, summary["answers_sealed"])
        assert therapist.open_checklist(client.peer_id, summary["answers_sealed"]) == opened
        assert opened == answers and opened["headset"] is False
        record = await broker.hub.get_session(links.session)
        kept = encode_record(record)
        assert b"headset" not in kept and b"private_place" not in kept and b"recommended_unmet" not in kept
    finally:
        await client.close()
        await therapist.close()


async def test_a_peers_deeply_nested_control_message_is_ignored(broker: RunningBroker) -> None:
    """A peer's data-channel message nested 8,000 deep must not break the client's handler."""
    links = await schedule(broker)
    therapist = BrokerClient(links.therapist)
    await therapist.connect()
    client = await waiting_client(links)
    try:
        await therapist.admit(client.peer_id)
        t_link = await therapist.wait_connected(client.peer_id)
        c_link = await client.wait_connected(therapist.peer_id)
        t_link.channel.send("[" * 8000)
        therapist.send_chat(client.peer_id, "still here")
        assert await asyncio.wait_for(c_link.messages.get(), 10) == "still here"
    finally:
        await client.close()
        await therapist.close()


async def test_two_requests_for_a_fresh_offer_at_once_still_end_in_one_working_call(broker: RunningBroker) -> None:
    """The offerer asked twice in a row (two ``renegotiate``, or a ``peers`` and a ``renegotiate``) starts a
    connection for each; only the newest may send its offer. An offer from a connection already replaced
    paired the answerer with a connection that was gone, and the call never came back."""
    links = await schedule(broker)
    therapist = BrokerClient(links.therapist)
    await therapist.connect()
    client = await waiting_client(links)
    try:
        await therapist.admit(client.peer_id)
        await therapist.wait_connected(client.peer_id)
        await client.wait_connected(therapist.peer_id)
        first = therapist.links[client.peer_id]
        await asyncio.gather(client.renegotiate(therapist.peer_id), client.renegotiate(therapist.peer_id))
        t_link = None
        async with asyncio.timeout(20):
            while t_link is None or t_link is first:
                t_link = await therapist.wait_connected(client.peer_id)
                await asyncio.sleep(0.05)
            c_link = await client.wait_connected(therapist.peer_id)
        therapist.send_chat(client.peer_id, "after two requests")
        assert await asyncio.wait_for(c_link.messages.get(), 10) == "after two requests"
    finally:
        await client.close()
        await therapist.close()


async def test_a_session_cancelled_while_away_is_final_and_the_client_stops_reconnecting(broker: RunningBroker) -> None:
    """Back from a dropped connection to a session the therapist cancelled meanwhile, the client is
    answered ``session_cancelled`` and takes it as final: no reconnecting to a session that is gone."""
    links = await schedule(broker)
    client = BrokerClient(links.client, agent="test-client")
    await client.connect()
    try:
        broker.hub.accepting = False  # the client cannot rejoin until the session is cancelled
        try:
            for conn in list(broker.hub.connections.by_id.values()):
                if conn.peer_id == client.peer_id:
                    await conn.transport.close(1012, "")
            await broker.hub.cancel_session(links.session)
        finally:
            broker.hub.accepting = True
        for _ in range(200):
            if client.final is not None:
                break
            await asyncio.sleep(0.05)
        assert isinstance(client.final, Error) and client.final.code is ErrorCode.SESSION_CANCELLED
        reconnects = client.reconnects
        await asyncio.sleep(1.5)
        assert client.reconnects == reconnects
    finally:
        await client.close()
