"""A word to the waiting room over a real WebSocket (docs/protocol.md 5 ``waiting_note``, 7.4.2,
10 ``therapist_note``): the therapist's sealed note reaches that client's connection, untouched
and unreadable to the broker; every refusal delivers nothing and changes nothing.
"""

from __future__ import annotations

import json
import logging

import pytest

from broker.client.broker_client import BrokerClient, BrokerError
from broker.crypto.link_key import decode_link_key
from broker.crypto.seat_keys import seat_key
from broker.crypto.waiting_note import NoteError, open_note, seal_note
from broker.signaling.protocol import Error, ErrorCode, SeatState, Status, TherapistNote
from tests.client.test_client import waiting_client
from tests.conftest import RunningBroker, SessionLinks, schedule
from tests.signaling.test_holds import frames_until_pong, settled
from tests.signaling.test_hub import RawPeer

TEXT = "I'm running about 5 minutes late"


def note_for(links: SessionLinks, peer: str, text: str = TEXT) -> str:
    """Sealed as the therapist's side seals it: with the seat key it derives from the session secret."""
    return seal_note(seat_key(decode_link_key(links.link_key), links.session, peer), links.session, peer, text)


async def therapist_of(broker: RunningBroker, links: SessionLinks) -> RawPeer:
    therapist = await RawPeer.open(broker)
    therapist_id = links.peers[links.therapist]
    assert (await therapist.join(links.tokens[therapist_id]))["type"] == "joined"
    return therapist


async def test_a_note_reaches_the_waiting_client_sealed_and_nobody_else(
    broker: RunningBroker, caplog: pytest.LogCaptureFixture
) -> None:
    links = await schedule(broker, clients=2)
    therapist = await therapist_of(broker, links)
    a = await waiting_client(links, link=links.clients[0])
    b = await waiting_client(links, link=links.clients[1])
    a_id, b_id = a.peer_id, b.peer_id
    assert a_id and b_id
    sealed = note_for(links, a_id)
    marks = len(a.received), len(b.received)
    with caplog.at_level(logging.DEBUG):
        await therapist.send(type="waiting_note", peer=a_id, sealed=sealed, id="n1")
        note = await a.expect(TherapistNote, since=marks[0])
    assert note.sealed == sealed  # passed on untouched
    # The client opens it with the key its own link carries; the other client could not.
    assert open_note(decode_link_key(links.seat_keys[a_id]), links.session, a_id, note.sealed) == TEXT
    assert not [m for m in await frames_until_pong(therapist, 1) if m["type"] == "error"]
    await settled(b, 2)
    assert not [m for m in b.received[marks[1] :] if isinstance(m, TherapistNote)]
    # Nothing of the note in the broker's logs or store: not the sealed value either.
    assert sealed not in caplog.text and TEXT not in caplog.text
    for key in await broker.broker.store.keys(""):
        value = await broker.broker.store.get(key)
        assert value is None or sealed.encode() not in value
    for client in (a, b):
        await client.close()
    await therapist.close()


async def test_a_client_still_checking_gets_a_note(broker: RunningBroker) -> None:
    links = await schedule(broker)
    therapist = await therapist_of(broker, links)
    client = await RawPeer.open(broker)
    client_id = links.peers[links.client]
    joined = await client.join(links.tokens[client_id])
    assert joined["seat_state"] == "checking"
    sealed = note_for(links, client_id, "Take your time with the checklist")
    await therapist.send(type="waiting_note", peer=client_id, sealed=sealed)
    note = await client.recv_type("therapist_note")
    assert note == {"type": "therapist_note", "sealed": sealed}
    await client.close()
    await therapist.close()


async def test_refused_notes_deliver_nothing_and_change_nothing(broker: RunningBroker) -> None:
    """not_allowed (a client sending; the therapist as target), not_in_session, invalid_state (an
    admitted client, a seat nobody opened), bad_message (a malformed or oversized ``sealed``)."""
    links = await schedule(broker, clients=3)
    therapist = await therapist_of(broker, links)
    therapist_id = links.peers[links.therapist]
    waiting = await waiting_client(links, link=links.clients[0])
    admitted = await waiting_client(links, link=links.clients[1])
    absent = links.peers[links.clients[2]]
    assert waiting.peer_id and admitted.peer_id
    await therapist.send(type="admit", peer=admitted.peer_id)
    await frames_until_pong(therapist, 1)
    before = await broker.hub.get_session(links.session)
    good = note_for(links, waiting.peer_id)
    cases = [
        (therapist, {"peer": therapist_id, "sealed": good}, "not_allowed"),
        (therapist, {"peer": "nobody00", "sealed": good}, "not_in_session"),
        (therapist, {"peer": admitted.peer_id, "sealed": note_for(links, admitted.peer_id)}, "invalid_state"),
        (therapist, {"peer": absent, "sealed": note_for(links, absent)}, "invalid_state"),
        (therapist, {"peer": waiting.peer_id, "sealed": good + "="}, "bad_message"),
        (therapist, {"peer": waiting.peer_id, "sealed": "AAAA" * 601}, "bad_message"),
        (therapist, {"peer": waiting.peer_id, "sealed": good, "text": "in clear"}, "bad_message"),
        (therapist, {"peer": waiting.peer_id}, "bad_message"),
    ]
    for n, (sender, fields, code) in enumerate(cases):
        await sender.send(type="waiting_note", id=f"bad{n}", **fields)
        frames = await frames_until_pong(sender, 10 + n)
        errors = [m for m in frames if m["type"] == "error"]
        assert [(e["code"], e["ref"]) for e in errors] == [(code, f"bad{n}")], (fields, frames)
        assert not [m for m in frames if m["type"] == "waiting_room"]  # nothing changed to show
    # From a client: not_allowed, whatever the target.
    await waiting.send_raw(json.dumps({"type": "waiting_note", "peer": admitted.peer_id, "sealed": good, "id": "c1"}))
    error = await waiting.expect(Error, where=lambda m: m.ref == "c1")
    assert isinstance(error, Error) and error.code is ErrorCode.NOT_ALLOWED
    for client in (waiting, admitted):
        await settled(client, 50)
        assert not [m for m in client.received if isinstance(m, TherapistNote)]
    after = await broker.hub.get_session(links.session)
    assert before is not None and after is not None
    assert [(s.id, s.state, s.conn) for s in after.seats] == [(s.id, s.state, s.conn) for s in before.seats]
    for client in (waiting, admitted):
        await client.close()
    await therapist.close()


async def test_the_python_client_sends_a_confirmed_note_and_the_client_opens_it(broker: RunningBroker) -> None:
    """``BrokerClient.send_note`` returns only once the broker passed the note on (the ``ping``
    behind it is answered after it) and raises the broker's error for a refused one; the waiting
    client's ``open_note`` reads it with its own link, the other client's could not."""
    links = await schedule(broker, clients=2)
    therapist = BrokerClient(links.therapist)
    await therapist.connect()
    a = await waiting_client(links, link=links.clients[0])
    b = await waiting_client(links, link=links.clients[1])
    assert a.peer_id and b.peer_id
    mark = len(a.received)
    await therapist.send_note(a.peer_id, f"  {TEXT}  ")
    note = await a.expect(TherapistNote, since=mark)
    assert isinstance(note, TherapistNote)
    assert a.open_note(note.sealed) == TEXT
    with pytest.raises(NoteError):
        b.open_note(note.sealed)  # sealed for a's seat alone
    await therapist.admit(b.peer_id)
    await b.expect(Status, where=lambda m: m.seat_state is SeatState.ADMITTED)
    with pytest.raises(BrokerError) as refused:
        await therapist.send_note(b.peer_id, TEXT)  # no longer waiting
    assert refused.value.code is ErrorCode.INVALID_STATE
    for client in (a, b, therapist):
        await client.close()
