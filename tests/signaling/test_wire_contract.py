"""The connection rules of docs/protocol.md sections 2, 5 and 11 over a real WebSocket, as an
outside implementer reads them: which error, with which ``ref``, for what (issue 27's gaps)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from broker.checklist.preflight import run_preflight_client
from broker.client.broker_client import BrokerClient
from broker.signaling import session as sm
from broker.signaling.protocol import (
    ChecklistAccepted,
    Error,
    ErrorCode,
    PreflightAnswer,
    PreflightOffer,
    SessionRecord,
)
from tests.conftest import RunningBroker, schedule
from tests.signaling.test_hub import RawPeer, admitted_pair, record_of


async def frames_until_pong(peer: RawPeer, n: int) -> list[dict[str, Any]]:
    """Every frame up to the ``pong`` of ``ping n`` (sent now): the answers to what came before it."""
    await peer.send(type="ping", n=n)
    frames = []
    while True:
        frame = await peer.recv()
        frames.append(frame)
        if frame["type"] == "pong" and frame["n"] == n:
            return frames


# ---------------------------------------------------------------- ref (section 5)


async def test_an_error_about_an_undecodable_message_names_its_readable_id(broker: RunningBroker) -> None:
    """A listed type with one unknown field, or an unknown type, still has a readable ``id``: the
    error names it as ``ref``, and the message is not taken (no pong, no join)."""
    links = await schedule(broker)
    token = links.tokens[links.peers[links.client]]
    peer = await RawPeer.open(broker)
    try:
        await peer.send(type="hello", protocol=1)
        assert (await peer.recv())["type"] == "welcome"
        await peer.send(type="ping", n=1, extra=True, id="p1")
        await peer.send(type="join", token=token, bogus=1, id="j1")
        await peer.send(type="nope", id="u1")
        await peer.send(type="ping", id="not an id!")  # an id that is itself invalid names nothing
        await peer.ws.send_str('["a list", {"id": "x1"}]')
        errors = await frames_until_pong(peer, 2)
        assert [(e["type"], e.get("code"), e.get("ref")) for e in errors[:-1]] == [
            ("error", "bad_message", "p1"),
            ("error", "bad_message", "j1"),
            ("error", "bad_message", "u1"),
            ("error", "bad_message", None),
            ("error", "bad_message", None),
        ]
        await peer.send(type="join", token=token, id="j2")  # the refused join took no seat
        assert (await peer.recv_type("joined"))["peer"] == links.peers[links.client]
    finally:
        await peer.close()


# ---------------------------------------------------------------- hello and ping (sections 2 and 5)


async def test_ping_is_answered_before_hello_and_hello_must_still_come_first(broker: RunningBroker) -> None:
    links = await schedule(broker)
    peer = await RawPeer.open(broker)
    try:
        await peer.send(type="ping", n=3, id="early")
        assert await peer.recv() == {"type": "pong", "n": 3}
        await peer.send(type="join", token=links.tokens[links.peers[links.client]], id="j")
        error = await peer.recv()
        assert (error["code"], error["ref"]) == ("hello_required", "j")
        await peer.send(type="hello", protocol=1)
        assert (await peer.recv())["type"] == "welcome"
    finally:
        await peer.close()


async def test_a_second_hello_is_a_bad_message_before_and_after_joining(broker: RunningBroker) -> None:
    links = await schedule(broker)
    peer = await RawPeer.open(broker)
    try:
        await peer.send(type="hello", protocol=1)
        assert (await peer.recv())["type"] == "welcome"
        await peer.send(type="hello", protocol=1, id="h2")
        error = await peer.recv()
        assert (error["code"], error["ref"]) == ("bad_message", "h2")
        await peer.send(type="join", token=links.tokens[links.peers[links.client]])
        assert (await peer.recv_type("joined"))["role"] == "client"
        await peer.send(type="hello", protocol=1, id="h3")
        error = await peer.recv_type("error")
        assert (error["code"], error["ref"]) == ("bad_message", "h3")
    finally:
        await peer.close()


# ---------------------------------------------------------------- roles (section 5, `not_allowed`)


async def test_a_message_of_the_other_role_is_not_allowed_and_changes_nothing(broker: RunningBroker) -> None:
    """Client-only messages from the therapist, therapist-only ones from a client: ``not_allowed``
    (section 11: the role cannot do this), whatever the seat's state or the message's target."""
    links, therapist, client = await admitted_pair(broker)
    try:
        before = await record_of(broker, links.session)
        client_only = {
            "preflight_offer": {"sdp": "v=0\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n"},
            "checklist": {"policy_version": "v", "answers": {}},
        }
        for kind, fields in client_only.items():
            await therapist.send_raw(json.dumps({"type": kind, **fields, "id": f"t-{kind}"}))
            error = await therapist.expect(Error, where=lambda m, kind=kind: m.ref == f"t-{kind}")
            assert error.code is ErrorCode.NOT_ALLOWED, kind
        therapist_only = {
            "admit": {"peer": "nobody12"},
            "decline": {"peer": client.peer_id, "device": "nobody12"},
            "remove": {"peer": therapist.peer_id},
            "allow_return": {"peer": client.peer_id},
            "end": {},
        }
        for kind, fields in therapist_only.items():
            await client.send_raw(json.dumps({"type": kind, **fields, "id": f"c-{kind}"}))
            error = await client.expect(Error, where=lambda m, kind=kind: m.ref == f"c-{kind}")
            assert error.code is ErrorCode.NOT_ALLOWED, kind
        assert await record_of(broker, links.session) == before
    finally:
        await client.close()
        await therapist.close()


# ---------------------------------------------------------------- the pre-flight (section 9)


async def test_a_checklist_sent_before_the_preflight_is_done_is_held_then_accepted(broker: RunningBroker) -> None:
    """The page may send its checklist while the pre-flight still runs (here: as soon as the answer
    came, before any ping): the broker holds it until its own result is recorded, then judges it."""
    links = await schedule(broker)
    client = BrokerClient(links.client)
    await client.connect()
    sent: list[asyncio.Future[ChecklistAccepted]] = []

    async def exchange(offer_sdp: str) -> str:
        reply = await client.request(PreflightOffer(sdp=offer_sdp), PreflightAnswer, timeout=30.0)
        sent.append(asyncio.ensure_future(client.submit_checklist(details={"location": "home", "contact": "a friend"})))
        return reply.sdp

    try:
        report = await run_preflight_client(exchange, [])
        assert report.connected
        accepted = await asyncio.wait_for(sent[0], timeout=20.0)
        assert accepted.summary["all_required_met"] is True
        assert accepted.summary["network"]["connected"] is True
    finally:
        await client.close()


# ---------------------------------------------------------------- the session record (sections 3 and 10)


async def test_the_record_shows_the_therapists_seat_admitted_from_its_first_connection(
    broker: RunningBroker,
) -> None:
    _, therapist, client = await admitted_pair(broker)
    try:
        await therapist.end()
        record = (await therapist.expect(SessionRecord)).record
        seats = {seat["role"]: seat for seat in record["seats"]}
        assert isinstance(seats["therapist"]["admitted_at"], int)
        assert seats["therapist"]["admitted_at"] <= seats["client"]["admitted_at"] <= record["ended"]
        assert record["started"] == seats["client"]["admitted_at"]  # the call began with the first client
    finally:
        await client.close()
        await therapist.close()


def test_a_therapist_reconnecting_keeps_the_time_the_seat_was_first_admitted() -> None:
    session = sm.new_session("s", now=100, starts=100, duration_s=3600, clients=1)
    seat = session.therapist().id
    sm.connect(session, seat, "c1", now=120)
    sm.connect(session, seat, "c2", now=300)
    assert session.therapist().admitted_at == 120
    assert session.live_at is None  # live only once a client is admitted
