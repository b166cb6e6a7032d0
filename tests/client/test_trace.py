"""The Python client's set-up trace: off by default, and when on it records how a call was set up
without anything secret or personal (broker/client/trace.py)."""

from __future__ import annotations

import asyncio
import json

from broker.client.broker_client import BrokerClient
from broker.client.trace import SetupTrace, candidate_counts
from broker.signaling.protocol import SeatState, Status
from tests.conftest import RunningBroker, schedule


def test_candidate_counts_count_by_type_and_keep_nothing_else() -> None:
    sdp = "\r\n".join(
        [
            "v=0",
            "a=candidate:1 1 udp 2130706431 192.0.2.7 40000 typ host",
            "a=candidate:2 1 udp 1694498815 198.51.100.9 40001 typ srflx raddr 192.0.2.7 rport 40000",
            "a=candidate:3 1 udp 2130706431 192.0.2.8 40002 typ host",
            "a=fingerprint:sha-256 AA:BB",
        ]
    )
    assert candidate_counts(sdp) == {"host": 2, "srflx": 1}
    assert candidate_counts(None) == {}


async def test_a_client_traces_nothing_unless_asked(broker: RunningBroker) -> None:
    links = await schedule(broker)
    client = BrokerClient(links.client)
    try:
        await client.connect()
        assert client.trace is None
    finally:
        await client.close()


async def test_the_trace_of_a_call_shows_its_steps_and_no_secret(broker: RunningBroker) -> None:
    links = await schedule(broker)
    therapist, client = BrokerClient(links.therapist), BrokerClient(links.client)
    therapist.trace, client.trace = SetupTrace(), SetupTrace()
    try:
        await therapist.connect()
        await client.connect()
        await client.preflight()
        await client.submit_checklist(details={"location": "CANARY-location", "contact": "CANARY-contact"})
        await client.expect(Status, where=lambda m: m.seat_state is SeatState.WAITING)
        await therapist.admit(client.peer_id)
        await therapist.wait_connected(client.peer_id)
        link = await client.wait_connected(therapist.peer_id)
        therapist.send_chat(client.peer_id, "CANARY-chat")
        assert await asyncio.wait_for(link.messages.get(), 10) == "CANARY-chat"
        t_steps = [(e.kind, e.what) for e in therapist.trace.events]
        c_steps = [(e.kind, e.what) for e in client.trace.events]
        assert ("sent", "offer") in t_steps and ("received", "answer") in t_steps
        assert ("received", "offer") in c_steps and ("sent", "answer") in c_steps
        assert ("state", "dtls") in t_steps and ("state", "ice") in c_steps
        assert ("state", "channel") in t_steps and ("state", "channel") in c_steps
        counts = [e.detail["remote"] for e in client.trace.events if e.what == "signaling"]
        assert any(c.get("host") for c in counts)  # the offer's candidates were counted
        text = json.dumps([therapist.trace.as_json(), client.trace.as_json()]) + "\n".join(
            therapist.trace.lines() + client.trace.lines()
        )
        local = therapist.links[client.peer_id].pc.localDescription.sdp
        secrets = [
            links.link_key,
            links.therapist.split("/t/")[1].split("#")[0],  # the tokens
            links.clients[0].split("/j/")[1].split("#")[0],
            "v=0",
            "a=fingerprint",
            "a=candidate",
            "ice-ufrag",
            local.split("a=ice-pwd:")[1].split()[0],
            "CANARY",
        ]
        assert [s for s in secrets if s in text] == []
        resume_secrets = [c._resume_secret for c in (therapist, client) if c._resume_secret]
        assert resume_secrets and [s for s in resume_secrets if s in text] == []
        await therapist.end()
    finally:
        await client.close()
        await therapist.close()
