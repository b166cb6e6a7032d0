"""Private time over a real WebSocket (docs/protocol.md 3, 5 ``hold``/``release``, 6 ``roster``):
the therapist holds and releases clients, every view shows it, nothing is relayed to or from a
held seat, the roster goes from the therapist to a client only, and holds reach the audit log
without names. Also ``joined.seat_keys``.

The therapist is a bare WebSocket (it makes no calls of its own, so every relayed frame here is
one a test sent); the clients are the Python client, which brings them through the pre-flight and
the checklist as a page would.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from broker.client.broker_client import BrokerClient
from broker.signaling.protocol import (
    Candidate,
    Error,
    ErrorCode,
    Peers,
    Pong,
    Roster,
    Status,
)
from broker.store.base import session_key, session_prefix
from tests.client.test_client import waiting_client
from tests.conftest import RunningBroker, SessionLinks, schedule, start_broker
from tests.signaling.test_hub import RawPeer

#: A well-formed sealed value (base64url of 48 bytes): the broker cannot tell it from a real one.
SEALED = "S3" * 32


async def until(peer: RawPeer, match: Callable[[dict[str, Any]], bool], timeout: float = 5.0) -> dict[str, Any]:
    """The first frame the bare peer receives that matches (earlier ones are passed over)."""
    deadline = time.monotonic() + timeout
    while True:
        message = await peer.recv(max(0.01, deadline - time.monotonic()))
        if match(message):
            return message


async def frames_until_pong(peer: RawPeer, n: int) -> list[dict[str, Any]]:
    """Everything the bare peer receives until the pong of a ping sent now: what its earlier
    messages (handled in order, before the ping) brought."""
    await peer.send(type="ping", n=n)
    frames = []
    while True:
        message = await peer.recv()
        if message["type"] == "pong" and message["n"] == n:
            return frames
        frames.append(message)


async def settled(client: BrokerClient, n: int) -> int:
    """Wait until the client's earlier messages were handled (their pong came back); its message count then."""
    await client.send_raw(json.dumps({"type": "ping", "n": n}))
    await client.expect(Pong, where=lambda m: m.n == n)
    return len(client.received)


def seat_of(room: dict[str, Any], peer: str) -> dict[str, Any]:
    return next(s for s in room["seats"] if s["peer"] == peer)


def peer_of(peers: dict[str, Any], peer: str) -> dict[str, Any] | None:
    return next((p for p in peers["peers"] if p["peer"] == peer), None)


@dataclass
class Call:
    links: SessionLinks
    therapist: RawPeer
    therapist_id: str
    a: BrokerClient
    b: BrokerClient
    #: A client seat nobody has opened (``invited``).
    absent: str

    @property
    def session(self) -> str:
        return self.links.session

    async def close(self) -> None:
        for client in (self.a, self.b):
            await client.close()
        await self.therapist.close()


async def open_call(broker: RunningBroker, client_broker: RunningBroker | None = None) -> Call:
    """A session in call: the therapist (bare) and two admitted clients, a third seat never opened.
    With ``client_broker`` the clients join through that broker process instead."""
    links = await schedule(broker, clients=3)
    therapist_id = links.peers[links.therapist]
    therapist = await RawPeer.open(broker)
    joined = await therapist.join(links.tokens[therapist_id])
    assert joined["type"] == "joined" and joined["seat_keys"] is True
    via = client_broker or broker
    a = await waiting_client(links, link=links.clients[0].replace(broker.url, via.url))
    b = await waiting_client(links, link=links.clients[1].replace(broker.url, via.url))
    for client in (a, b):
        await therapist.send(type="admit", peer=client.peer_id)
        await client.expect(Status, where=lambda m: m.seat_state.value == "admitted")
    absent = links.peers[links.clients[2]]
    await frames_until_pong(therapist, 0)  # what the admissions brought: read now, so tests see only theirs
    return Call(links, therapist, therapist_id, a, b, absent)


async def hold_and_see(call: Call, held: bool) -> None:
    """The therapist holds (or releases) client ``a``; returns once both clients were shown it."""
    a, b = call.a, call.b
    marks = len(a.received), len(b.received)
    await call.therapist.send(type="hold" if held else "release", peer=a.peer_id)
    await a.expect(Status, where=lambda m: m.held is held, since=marks[0])
    await b.expect(Peers, where=is_held_view(a.peer_id, held), since=marks[1])


def audit_entries(broker: RunningBroker, session: str, event: str) -> list[dict[str, Any]]:
    lines = broker.config.audit_path.read_text().splitlines()
    return [entry for line in lines if (entry := json.loads(line)).get("event") == event and session in line]


def is_held_view(peer: str, held: bool) -> Callable[[Any], bool]:
    """A client's ``peers`` showing ``peer`` held (or not)."""
    return lambda m: any(p.peer == peer and p.held is held for p in m.peers)


# ---------------------------------------------------------------- hold and release


async def test_hold_and_release_show_in_every_view_and_in_the_audit_log(broker: RunningBroker) -> None:
    call = await open_call(broker)
    a, b, therapist = call.a, call.b, call.therapist
    try:
        mark_a, mark_b = len(a.received), len(b.received)
        await therapist.send(type="hold", peer=a.peer_id, id="h1")
        room = await until(therapist, lambda m: m["type"] == "waiting_room" and seat_of(m, a.peer_id)["held"])
        assert not seat_of(room, b.peer_id)["held"] and seat_of(room, a.peer_id)["state"] == "admitted"
        await until(therapist, lambda m: m["type"] == "peers" and peer_of(m, a.peer_id)["held"])
        status = await a.expect(Status, where=lambda m: m.held, since=mark_a)
        assert status.seat_state.value == "admitted"  # still in the call: the held page keeps its connections
        await a.expect(Peers, since=mark_a)  # the held client still sees its own views
        await b.expect(Peers, where=is_held_view(a.peer_id, True), since=mark_b)
        await b.expect(Status, where=lambda m: not m.held, since=mark_b)
        held = audit_entries(broker, call.session, "seat_held")
        assert len(held) == 1
        # Event type, session and seat ids: nothing else (no name, nothing the therapist typed).
        assert held[0]["actor"] == f"{call.session}-{a.peer_id}" and held[0]["session"] == call.session
        assert set(held[0]) == {"actor", "event", "hash", "outcome", "prev", "seq", "session", "time"}

        mark_a, mark_b = len(a.received), len(b.received)
        await therapist.send(type="release", peer=a.peer_id, id="r1")
        await until(therapist, lambda m: m["type"] == "waiting_room" and not seat_of(m, a.peer_id)["held"])
        await a.expect(Status, where=lambda m: not m.held and m.seat_state.value == "admitted", since=mark_a)
        await b.expect(Peers, where=is_held_view(a.peer_id, False), since=mark_b)
        released = audit_entries(broker, call.session, "seat_released")
        assert [e["actor"] for e in released] == [f"{call.session}-{a.peer_id}"]
        assert set(released[0]) == set(held[0])
    finally:
        await call.close()


async def test_holding_twice_and_releasing_an_unheld_client_change_nothing(broker: RunningBroker) -> None:
    call = await open_call(broker)
    a, therapist = call.a, call.therapist
    try:
        revision = (await broker.hub.get_session(call.session)).revision
        await therapist.send(type="release", peer=a.peer_id, id="r0")  # not held: nothing to do
        frames = await frames_until_pong(therapist, 1)
        assert (await broker.hub.get_session(call.session)).revision == revision
        assert not [f for f in frames if f["type"] in ("error", "waiting_room", "peers")], frames
        await therapist.send(type="hold", peer=a.peer_id)
        await until(therapist, lambda m: m["type"] == "waiting_room" and seat_of(m, a.peer_id)["held"])
        await until(therapist, lambda m: m["type"] == "peers" and peer_of(m, a.peer_id)["held"])
        revision = (await broker.hub.get_session(call.session)).revision
        await therapist.send(type="hold", peer=a.peer_id, id="h2")  # already held
        frames = await frames_until_pong(therapist, 2)
        assert not [f for f in frames if f["type"] in ("error", "waiting_room", "peers")], frames
        assert len(audit_entries(broker, call.session, "seat_held")) == 1
        assert audit_entries(broker, call.session, "seat_released") == []
        assert (await broker.hub.get_session(call.session)).seat(a.peer_id).held
        assert (await broker.hub.get_session(call.session)).revision == revision  # not even written again
    finally:
        await call.close()


async def test_every_refused_hold_or_release_changes_nothing(broker: RunningBroker) -> None:
    """not_allowed (a client; the therapist as target), not_in_session, not_admitted, bad_message,
    session_ended: each answered with its code, and no view, no audit entry, no change of the record."""
    call = await open_call(broker)
    a, b, therapist = call.a, call.b, call.therapist
    try:
        for kind in ("hold", "release"):
            before = await broker.hub.get_session(call.session)
            marks = {c: await settled(c, 10) for c in (a, b)}
            # A client: not_allowed before anything else, whatever the target.
            for target in (b.peer_id, "nobody12"):
                mark = len(a.received)
                await a.send_raw(json.dumps({"type": kind, "peer": target, "id": "c1"}))
                error = await a.expect(Error, where=lambda m: m.ref == "c1", since=mark)
                assert error.code is ErrorCode.NOT_ALLOWED, (kind, target)
            for target, code in (
                (call.therapist_id, ErrorCode.NOT_ALLOWED),
                ("nobody12", ErrorCode.NOT_IN_SESSION),
                (call.absent, ErrorCode.NOT_ADMITTED),
            ):
                await therapist.send(type=kind, peer=target, id="t1")
                error_frame = await until(therapist, lambda m: m["type"] == "error" and m["ref"] == "t1")
                assert error_frame["code"] == code.value, (kind, target)
            await therapist.send(type=kind, id="t2")  # no peer
            error_frame = await until(therapist, lambda m: m["type"] == "error" and m["ref"] == "t2")
            assert error_frame["code"] == ErrorCode.BAD_MESSAGE.value
            frames = await frames_until_pong(therapist, 3)
            assert not [f for f in frames if f["type"] in ("waiting_room", "peers")], (kind, frames)
            for client in (a, b):
                await settled(client, 11)
                assert not [m for m in client.received[marks[client] :] if isinstance(m, (Status, Peers))], kind
            after = await broker.hub.get_session(call.session)
            assert after.revision == before.revision  # nothing was written
            assert not any(seat.held for seat in after.seats)
        assert audit_entries(broker, call.session, "seat_held") == []
        assert audit_entries(broker, call.session, "seat_released") == []
        # The session ended on another process meanwhile (its keys are gone): session_ended.
        await broker.hub.store.delete_prefix(session_prefix(call.session))
        broker.hub.records.forget(call.session)
        for kind in ("hold", "release"):
            await therapist.send(type=kind, peer=a.peer_id, id="t3")
            error_frame = await until(therapist, lambda m: m["type"] == "error" and m["ref"] == "t3")
            assert error_frame["code"] == ErrorCode.SESSION_ENDED.value
        assert audit_entries(broker, call.session, "seat_held") == []
    finally:
        await call.close()


# ---------------------------------------------------------------- relaying while held


def candidate_to(peer: str, mark: str, ref: str) -> str:
    return json.dumps({"type": "candidate", "to": peer, "candidate": "", "sdp_mid": mark, "id": ref})


def roster_to(peer: str, counter: int, ref: str) -> str:
    return json.dumps({"type": "roster", "to": peer, "counter": counter, "sealed": SEALED, "id": ref})


async def test_nothing_is_relayed_to_or_from_a_held_client_until_released(broker: RunningBroker) -> None:
    call = await open_call(broker)
    a, b, therapist = call.a, call.b, call.therapist
    try:
        await hold_and_see(call, True)
        mark_a = len(a.received)
        # To the held client: from the therapist (a candidate and a roster) and from the other client.
        await therapist.ws.send_str(candidate_to(a.peer_id, "t-to-a", "x1"))
        error = await until(therapist, lambda m: m["type"] == "error" and m["ref"] == "x1")
        assert error["code"] == ErrorCode.ON_HOLD.value
        await therapist.ws.send_str(roster_to(a.peer_id, 1, "x2"))
        error = await until(therapist, lambda m: m["type"] == "error" and m["ref"] == "x2")
        assert error["code"] == ErrorCode.ON_HOLD.value
        await b.send_raw(candidate_to(a.peer_id, "b-to-a", "x3"))
        assert (await b.expect(Error, where=lambda m: m.ref == "x3")).code is ErrorCode.ON_HOLD
        # From the held client: to the therapist and to the other client.
        await a.send_raw(candidate_to(call.therapist_id, "a-to-t", "x4"))
        assert (await a.expect(Error, where=lambda m: m.ref == "x4")).code is ErrorCode.ON_HOLD
        await a.send_raw(candidate_to(b.peer_id, "a-to-b", "x5"))
        assert (await a.expect(Error, where=lambda m: m.ref == "x5")).code is ErrorCode.ON_HOLD
        # The others carry on between themselves.
        await therapist.ws.send_str(candidate_to(b.peer_id, "t-to-b", "x6"))
        await b.expect(Candidate, where=lambda m: m.sdp_mid == "t-to-b")
        await b.send_raw(candidate_to(call.therapist_id, "b-to-t", "x7"))
        await until(therapist, lambda m: m["type"] == "candidate" and m["sdp_mid"] == "b-to-t")
        await settled(a, 20)
        assert not [m for m in a.received[mark_a:] if isinstance(m, (Candidate, Roster))]
        frames = await frames_until_pong(therapist, 21)
        assert not [f for f in frames if f["type"] == "candidate" and f["sdp_mid"].startswith("a-to")]
        await settled(b, 22)
        assert not [m for m in b.received if isinstance(m, Candidate) and m.sdp_mid == "a-to-b"]

        await hold_and_see(call, False)
        await therapist.ws.send_str(candidate_to(a.peer_id, "t-to-a-2", "y1"))
        await a.expect(Candidate, where=lambda m: m.sdp_mid == "t-to-a-2")
        await therapist.ws.send_str(roster_to(a.peer_id, 2, "y2"))
        await a.expect(Roster, where=lambda m: m.counter == 2)
        await a.send_raw(candidate_to(call.therapist_id, "a-to-t-2", "y3"))
        await until(therapist, lambda m: m["type"] == "candidate" and m["sdp_mid"] == "a-to-t-2")
        await b.send_raw(candidate_to(a.peer_id, "b-to-a-2", "y4"))
        await a.expect(Candidate, where=lambda m: m.sdp_mid == "b-to-a-2")
        await a.send_raw(candidate_to(b.peer_id, "a-to-b-2", "y5"))
        await b.expect(Candidate, where=lambda m: m.sdp_mid == "a-to-b-2")
    finally:
        await call.close()


# ---------------------------------------------------------------- the roster


async def test_a_roster_goes_from_the_therapist_to_a_client_untouched(broker: RunningBroker) -> None:
    call = await open_call(broker)
    a, therapist = call.a, call.therapist
    try:
        await therapist.ws.send_str(roster_to(a.peer_id, 41, "r1"))
        roster = await a.expect(Roster, where=lambda m: m.counter == 41)
        assert (roster.from_, roster.sealed, roster.to) == (call.therapist_id, SEALED, a.peer_id)
        assert roster.seq is not None and roster.seq >= 1
    finally:
        await call.close()


async def test_a_roster_from_a_client_or_to_no_admitted_client_is_refused(broker: RunningBroker) -> None:
    call = await open_call(broker)
    a, b, therapist = call.a, call.b, call.therapist
    try:
        mark_b = await settled(b, 30)
        # From a client: not_allowed, whatever the target (roles are checked first).
        for i, target in enumerate((b.peer_id, call.therapist_id, "nobody12", a.peer_id)):
            await a.send_raw(roster_to(target, 50 + i, f"c{i}"))
            assert (await a.expect(Error, where=lambda m, i=i: m.ref == f"c{i}")).code is ErrorCode.NOT_ALLOWED
        # From the therapist: to itself or nobody not_in_session; to a seat not in the call not_admitted.
        for target, code in (
            (call.therapist_id, ErrorCode.NOT_IN_SESSION),
            ("nobody12", ErrorCode.NOT_IN_SESSION),
            (call.absent, ErrorCode.NOT_ADMITTED),
        ):
            await therapist.ws.send_str(roster_to(target, 60, "t1"))
            error = await until(therapist, lambda m: m["type"] == "error" and m["ref"] == "t1")
            assert error["code"] == code.value, target
        frames = await frames_until_pong(therapist, 31)
        assert not [f for f in frames if f["type"] == "roster"]
        await settled(b, 32)
        assert not [m for m in b.received[mark_b:] if isinstance(m, Roster)]
    finally:
        await call.close()


BAD_ROSTERS = {
    "clear sdp": {"sdp": "v=0", "counter": 1, "sealed": SEALED},
    "a mac": {"mac": "bWFj", "counter": 1, "sealed": SEALED},
    "a candidate line": {"candidate": "", "counter": 1, "sealed": SEALED},
    "an sdp_mid": {"sdp_mid": "0", "counter": 1, "sealed": SEALED},
    "null sdp": {"sdp": None, "counter": 1, "sealed": SEALED},
    "no counter": {"sealed": SEALED},
    "null counter": {"counter": None, "sealed": SEALED},
    "no sealed": {"counter": 1},
    "clear form only": {"sdp": "v=0"},
    "sealed not base64url": {"counter": 1, "sealed": SEALED[:-1] + "+"},
    "sealed too short": {"counter": 1, "sealed": "A" * 36},
    "counter too big": {"counter": 2**53, "sealed": SEALED},
}


async def test_a_roster_of_the_wrong_shape_is_bad_message_and_not_relayed(broker: RunningBroker) -> None:
    call = await open_call(broker)
    a, therapist = call.a, call.therapist
    try:
        mark = await settled(a, 40)
        for what, fields in BAD_ROSTERS.items():
            await therapist.send(type="roster", to=a.peer_id, id="bad", **fields)
            error = await until(therapist, lambda m: m["type"] == "error")
            assert (error["code"], error["ref"]) == (ErrorCode.BAD_MESSAGE.value, "bad"), what
        await settled(a, 41)
        assert not [m for m in a.received[mark:] if isinstance(m, Roster)]
    finally:
        await call.close()


# ---------------------------------------------------------------- seat keys, and the record kept


async def test_joined_says_seat_keys_for_a_new_session_and_not_for_one_stored_before_them(
    broker: RunningBroker,
) -> None:
    links = await schedule(broker)
    therapist_id = links.peers[links.therapist]
    new = await RawPeer.open(broker)
    try:
        assert (await new.join(links.tokens[therapist_id]))["seat_keys"] is True
    finally:
        await new.close()
    # The same session's record as a broker before seat keys stored it: without the field.
    store = broker.hub.store
    raw = await store.get(session_key(links.session))
    old = msgspec.msgpack.decode(raw)
    del old["seat_keys"]
    for seat in old["seats"]:
        del seat["held"]
    record = await broker.hub.get_session(links.session)
    await store.put(session_key(links.session), msgspec.msgpack.encode(old), float(record.expires - time.time()))
    for peer in (therapist_id, links.peers[links.client]):
        page = await RawPeer.open(broker)
        try:
            joined = await page.join(links.tokens[peer])
            assert joined["type"] == "joined" and joined["seat_keys"] is False, joined
        finally:
            await page.close()


async def test_a_hold_survives_a_restart_of_the_embedded_broker(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = await start_broker(data)
    try:
        call = await open_call(first)
        await hold_and_see(call, True)
        session, held_peer, other = call.session, call.a.peer_id, call.b.peer_id
        await call.close()
    finally:
        await first.stop()
    second = await start_broker(data)
    try:
        record = await second.hub.get_session(session)
        assert record is not None and record.seat(held_peer).held and not record.seat(other).held
        therapist = await RawPeer.open(second)
        try:
            await therapist.join(call.links.tokens[call.therapist_id])
            room = await until(therapist, lambda m: m["type"] == "waiting_room")
            assert seat_of(room, held_peer)["held"] and not seat_of(room, other)["held"]
            await therapist.send(type="release", peer=held_peer)
            room = await until(therapist, lambda m: m["type"] == "waiting_room" and not seat_of(m, held_peer)["held"])
            assert seat_of(room, held_peer)["state"] == "admitted"
        finally:
            await therapist.close()
    finally:
        await second.stop()


async def test_waiting_room_and_peers_say_which_seats_came_through_the_group_link(broker: RunningBroker) -> None:
    links = await schedule(broker, clients=2, group_link=True)
    therapist_id = links.peers[links.therapist]
    therapist = await RawPeer.open(broker)
    try:
        await therapist.join(links.tokens[therapist_id])
        group_link = f"{broker.url}/j/{links.tokens['group']}#{links.link_key}"
        grouped = await waiting_client(links, link=group_link)
        room = await until(
            therapist, lambda m: m["type"] == "waiting_room" and seat_of(m, grouped.peer_id)["state"] == "waiting"
        )
        others = [s for s in room["seats"] if s["peer"] != grouped.peer_id]
        assert seat_of(room, grouped.peer_id)["group"] is True and [s["group"] for s in others] == [False]
        await therapist.send(type="admit", peer=grouped.peer_id)
        peers = await until(therapist, lambda m: m["type"] == "peers" and peer_of(m, grouped.peer_id) is not None)
        assert peer_of(peers, grouped.peer_id)["group"] is True
        own = await grouped.expect(Peers, where=lambda m: bool(m.peers))
        assert [(p.peer, p.group, p.held) for p in own.peers] == [(therapist_id, False, False)]
        await grouped.close()
    finally:
        await therapist.close()
