"""A broker that sends malformed messages: the Python client refuses each in its one place (decoded
with the server-message union of broker/signaling/protocol.py), logs its type and nothing of its
content, and carries on through the checklist, admission and the call."""

from __future__ import annotations

import json
import logging

import pytest

from broker.client.broker_client import BrokerClient
from broker.signaling.connections import Connection, Transport
from broker.signaling.protocol import Joined, SeatState, Status, WaitingRoom
from tests.client.test_client import waiting_client
from tests.conftest import RunningBroker, schedule

#: Must never reach a log: it stands for whatever a broker gone bad might put in a frame.
MARKER = "leak-marker-7f3a"
PEER = "abcdEFGH"

#: What the patched broker sends before a client's first ``status``, and the type each is refused as.
MALFORMED: list[tuple[str, str]] = [
    ("status", json.dumps({"type": "status", "seat_state": "admitted", "session_state": "live"})),  # missing field
    ("status", json.dumps({"type": "status", "seat_state": MARKER, "session_state": "live", "therapist_present": 1})),
    ("peers", json.dumps({"type": "peers", "peers": [{"peer": PEER, "role": MARKER, "connected": True}]})),
    ("joined", json.dumps({"type": "joined", "session": MARKER})),  # most fields missing
    ("offer", json.dumps({"type": "offer", "to": PEER, "sdp": "v=0", "from": PEER, MARKER: 1})),  # extra field
    ("candidate", json.dumps({"type": "candidate", "to": PEER, "from": PEER, "candidate": MARKER * 100})),  # too long
    ("offer", json.dumps({"type": "offer", "to": PEER, "sdp": "v=0", "sealed": "A" * 43 + "w", "counter": 1})),  # forms
    ("error", json.dumps({"type": "error", "code": MARKER, "message": "x"})),  # not an error code
    ("unknown", json.dumps({"type": MARKER})),
    ("unknown", json.dumps([MARKER])),
    ("unknown", MARKER),
]


class MalformingTransport:
    """The broker gone bad on one connection: before the first ``status`` it writes, the frames of MALFORMED."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.sent_malformed = False

    async def send_text(self, data: bytes) -> None:
        if not self.sent_malformed and json.loads(data).get("type") == "status":
            self.sent_malformed = True
            for _kind, frame in MALFORMED:
                await self.transport.send_text(frame.encode())
        await self.transport.send_text(data)

    async def close(self, code: int, reason: str) -> None:
        await self.transport.close(code, reason)

    async def ping(self) -> None:
        await self.transport.ping()


@pytest.fixture
def malforming(broker: RunningBroker, monkeypatch: pytest.MonkeyPatch) -> list[MalformingTransport]:
    made: list[MalformingTransport] = []
    open_connection = broker.hub.open

    def malforming_open(transport: Transport) -> Connection:
        patched = MalformingTransport(transport)
        made.append(patched)
        return open_connection(patched)

    monkeypatch.setattr(broker.hub, "open", malforming_open)
    return made


def expected_refusals() -> dict[str, int]:
    counts: dict[str, int] = {}
    for kind, _frame in MALFORMED:
        counts[kind] = counts.get(kind, 0) + 1
    return counts


async def test_malformed_server_messages_are_refused_logged_by_type_and_the_call_goes_on(
    broker: RunningBroker, malforming: list[MalformingTransport], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="broker")
    links = await schedule(broker)
    therapist = BrokerClient(links.therapist, reconnect=False)
    await therapist.connect()
    client = await waiting_client(links, reconnect=False)
    try:
        assert any(t.sent_malformed for t in malforming)
        assert client.refused == expected_refusals()
        # Nothing refused was taken in: no status but the broker's own, one joined, no peers, no offer.
        assert sum(isinstance(m, Joined) for m in client.received) == 1
        assert all(m.seat_state is not SeatState.ADMITTED for m in client.received if isinstance(m, Status))
        assert client.joined is not None and client.joined.session == links.session
        assert client.last_seq == 0 and client.links == {}

        room = await therapist.expect(WaitingRoom, where=lambda m: m.seats[0].state is SeatState.WAITING)
        await therapist.admit(room.seats[0].peer)
        await client.wait_connected(therapist.peer_id)
        await therapist.wait_connected(client.peer_id)
        assert client.safety_code(therapist.peer_id) == therapist.safety_code(client.peer_id)
        assert client.interceptions == [] and client.final is None and therapist.refused == {}
    finally:
        await client.close()
        await therapist.close()

    refusals = [r.getMessage() for r in caplog.records if "event=server_message_refused" in r.getMessage()]
    assert sorted(refusals) == sorted(f"event=server_message_refused type={kind}" for kind, _ in MALFORMED)
    assert MARKER not in caplog.text, "a refused frame's content reached the log"
    assert "event=client_message_failed" not in caplog.text


def test_the_type_of_a_refused_frame_is_named_only_when_it_is_a_server_message() -> None:
    from broker.client.trace import server_type_of

    assert server_type_of('{"type":"peers","peers":7}') == "peers"
    assert server_type_of('{"type":"hello","protocol":1}') == "unknown"  # a client message, not the broker's
    assert server_type_of('{"type":7}') == "unknown"
    assert server_type_of("[1]") == "unknown"
    assert server_type_of("not json") == "unknown"
