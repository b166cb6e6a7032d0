"""Frames of a real session fit the generated schema: two Python peers (broker/client/) through
a real broker, every frame recorded where the broker reads and writes it."""

from __future__ import annotations

import json
from collections.abc import Awaitable
from typing import Any

import pytest

from broker.client.broker_client import BrokerClient
from broker.contract.messages import CLIENT_MESSAGE, SERVER_MESSAGE
from broker.signaling.connections import Connection, Transport
from broker.signaling.protocol import Error, Pong, SeatState, SessionEnded, WaitingRoom
from tests.conftest import RunningBroker, schedule
from tests.contract.test_messages import validator


class Recorded:
    """Each frame a peer sent to the broker, and each the broker sent to a peer, as the text on the wire."""

    def __init__(self) -> None:
        self.to_broker: list[str] = []
        self.from_broker: list[str] = []


class RecordingTransport:
    def __init__(self, transport: Transport, recorded: Recorded) -> None:
        self.transport = transport
        self.recorded = recorded

    async def send_text(self, data: bytes) -> None:
        self.recorded.from_broker.append(data.decode())
        await self.transport.send_text(data)

    async def close(self, code: int, reason: str) -> None:
        await self.transport.close(code, reason)


@pytest.fixture
def recorded(broker: RunningBroker, monkeypatch: pytest.MonkeyPatch) -> Recorded:
    frames = Recorded()
    hub = broker.hub
    open_connection, receive_now = hub.open, hub.receive_now

    def recording_open(transport: Transport) -> Connection:
        return open_connection(RecordingTransport(transport, frames))

    def recording_receive(conn: Connection, text: str | bytes) -> Awaitable[None] | None:
        frames.to_broker.append(text if isinstance(text, str) else text.decode())
        return receive_now(conn, text)

    monkeypatch.setattr(hub, "open", recording_open)
    monkeypatch.setattr(hub, "receive_now", recording_receive)
    return frames


def types_of(frames: list[dict[str, Any]]) -> set[str]:
    return {str(f["type"]) for f in frames}


async def test_the_frames_of_a_whole_session_fit_the_schema(broker: RunningBroker, recorded: Recorded) -> None:
    links = await schedule(broker)
    therapist = BrokerClient(links.therapist)
    client = BrokerClient(links.client)
    try:
        await therapist.connect()
        await client.connect()
        assert (await client.preflight()).connected
        await client.submit_checklist(details={"location": "home", "contact": "a friend"})
        room = await therapist.expect(WaitingRoom, where=lambda m: m.seats[0].state is SeatState.WAITING)
        await therapist.admit(room.seats[0].peer)
        await therapist.wait_connected(client.peer_id)
        await client.wait_connected(therapist.peer_id)
        await client.send_raw('{"type":"ping","n":5,"id":"p1"}')
        await client.expect(Pong)
        await client.send_raw('{"type":"admit","peer":"' + therapist.peer_id + '","id":"x1"}')  # a refusal
        await client.expect(Error, where=lambda m: m.ref == "x1")
        await therapist.end()
        await client.expect(SessionEnded)
    finally:
        await client.close()
        await therapist.close()

    sent = [json.loads(text) for text in recorded.to_broker]
    received = [json.loads(text) for text in recorded.from_broker]
    client_schema, server_schema = validator(CLIENT_MESSAGE), validator(SERVER_MESSAGE)
    for frame in sent:
        client_schema.validate(frame)
    for frame in received:
        server_schema.validate(frame)
    assert {"hello", "join", "preflight_offer", "checklist", "admit", "offer", "answer", "ping", "end"} <= types_of(
        sent
    )
    assert {
        "welcome",
        "joined",
        "status",
        "preflight_answer",
        "checklist_accepted",
        "waiting_room",
        "peers",
        "offer",
        "answer",
        "pong",
        "error",
        "session_record",
        "session_ended",
    } <= types_of(received)
