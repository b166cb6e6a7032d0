"""The signaling service over a real WebSocket: admission, relaying rules, tokens, resume, ending."""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from typing import Any

import aiohttp
import pytest

from broker.client.broker_client import BrokerClient
from broker.signaling import session_records
from broker.signaling.connections import CLOSE_TOO_SLOW, Connection, Limits
from broker.signaling.protocol import (
    Candidate,
    Error,
    ErrorCode,
    Offer,
    ProtocolError,
    Removed,
    SeatState,
    SessionEnded,
    SessionRecord,
    Status,
    WaitingRoom,
)
from broker.signaling.record import verify_record
from broker.signaling.session_records import RELAY_RECORD_MAX_AGE_S, RELAY_RECORD_REFRESH_S
from broker.signaling.tokens import TokenClaims, TokenCodec, new_session_id, new_token_id
from broker.store.base import StoreUnavailable, session_prefix
from tests.client.test_client import waiting_client
from tests.conftest import RunningBroker, read_until_broker_closes, schedule


class RawPeer:
    """A bare WebSocket speaking JSON frames, for what the Python client would never send."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, http: aiohttp.ClientSession) -> None:
        self.ws, self.http = ws, http

    @classmethod
    async def open(cls, broker: RunningBroker) -> RawPeer:
        http = aiohttp.ClientSession()
        ws = await http.ws_connect(broker.url + "/ws", origin=broker.url)
        return cls(ws, http)

    async def send(self, **message: Any) -> None:
        await self.ws.send_str(json.dumps(message))

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        msg = await self.ws.receive(timeout)
        assert msg.type is aiohttp.WSMsgType.TEXT, msg
        return json.loads(msg.data)  # type: ignore[no-any-return]

    async def recv_type(self, kind: str, timeout: float = 5.0) -> dict[str, Any]:
        while True:
            message = await self.recv(timeout)
            if message["type"] == kind:
                return message

    async def join(self, token: str, **extra: Any) -> dict[str, Any]:
        await self.send(type="hello", protocol=1)
        await self.recv_type("welcome")
        await self.send(type="join", token=token, **extra)
        while True:
            message = await self.recv()
            if message["type"] in ("joined", "error"):
                return message

    async def close(self) -> None:
        await self.ws.close()
        await self.http.close()


async def record_of(broker: RunningBroker, session: str) -> Any:
    return await broker.hub.get_session(session)


async def admitted_pair(broker: RunningBroker) -> tuple[Any, BrokerClient, BrokerClient]:
    links = await schedule(broker)
    therapist = BrokerClient(links.therapist)
    await therapist.connect()
    client = await waiting_client(links)
    await therapist.admit(client.peer_id)
    await client.wait_connected(therapist.peer_id)
    return links, therapist, client


# ---------------------------------------------------------------- relaying rules


async def test_message_to_a_peer_of_another_session_is_refused_and_not_delivered(broker: RunningBroker) -> None:
    _, t1, c1 = await admitted_pair(broker)
    _, t2, c2 = await admitted_pair(broker)
    try:
        before = len(c2.received)
        await t1.send_raw(json.dumps({"type": "candidate", "to": c2.peer_id, "candidate": "", "id": "x1"}))
        error = await t1.expect(Error, where=lambda m: m.ref == "x1")
        assert error.code is ErrorCode.NOT_IN_SESSION
        await asyncio.sleep(0.2)
        assert not any(isinstance(m, Candidate) for m in c2.received[before:])
    finally:
        for peer in (t1, c1, t2, c2):
            await peer.close()


async def test_the_broker_overwrites_the_sender_and_numbers_relayed_messages(broker: RunningBroker) -> None:
    _, therapist, client = await admitted_pair(broker)
    try:
        await client.send_raw(
            json.dumps({"type": "candidate", "to": therapist.peer_id, "candidate": "", "from": "forged", "id": "f1"})
        )
        relayed = await therapist.expect(Candidate, where=lambda m: m.candidate == "")
        assert relayed.from_ == client.peer_id
        assert relayed.seq is not None and relayed.seq >= 1
    finally:
        await client.close()
        await therapist.close()


async def test_only_the_offerer_of_a_pair_sends_offers(broker: RunningBroker) -> None:
    _, therapist, client = await admitted_pair(broker)
    try:
        await client.send_raw(json.dumps({"type": "offer", "to": therapist.peer_id, "sdp": "v=0", "id": "o1"}))
        assert (await client.expect(Error, where=lambda m: m.ref == "o1")).code is ErrorCode.NOT_OFFERER
        await therapist.send_raw(json.dumps({"type": "answer", "to": client.peer_id, "sdp": "v=0", "id": "a1"}))
        assert (await therapist.expect(Error, where=lambda m: m.ref == "a1")).code is ErrorCode.NOT_OFFERER
    finally:
        await client.close()
        await therapist.close()


#: A well-formed sealed field (base64url of 48 bytes): the broker cannot tell it from a real one.
SEALED = "S3" * 32


async def test_sealed_messages_are_relayed_untouched_and_the_offerer_rule_holds(broker: RunningBroker) -> None:
    """docs/protocol.md 7.7: the broker checks the outer shape, enforces who offers from the
    outer type, and passes ``counter`` and ``sealed`` on byte for byte."""
    _, therapist, client = await admitted_pair(broker)
    try:
        await client.send_raw(
            json.dumps({"type": "candidate", "to": therapist.peer_id, "counter": 7, "sealed": SEALED})
        )
        relayed = await therapist.expect(Candidate, where=lambda m: m.sealed is not None)
        assert (relayed.from_, relayed.counter, relayed.sealed, relayed.candidate) == (client.peer_id, 7, SEALED, None)
        await therapist.send_raw(
            json.dumps({"type": "offer", "to": client.peer_id, "counter": 8, "sealed": SEALED + "AA"})
        )
        offer = await client.expect(Offer, where=lambda m: m.sealed == SEALED + "AA")
        assert (offer.from_, offer.counter, offer.sealed, offer.sdp, offer.mac) == (
            therapist.peer_id,
            8,
            SEALED + "AA",
            None,
            None,
        )
        sealed_offer = {"type": "offer", "to": therapist.peer_id, "counter": 9, "sealed": SEALED, "id": "so"}
        await client.send_raw(json.dumps(sealed_offer))
        assert (await client.expect(Error, where=lambda m: m.ref == "so")).code is ErrorCode.NOT_OFFERER
        sealed_answer = {"type": "answer", "to": client.peer_id, "counter": 9, "sealed": SEALED, "id": "sa"}
        await therapist.send_raw(json.dumps(sealed_answer))
        assert (await therapist.expect(Error, where=lambda m: m.ref == "sa")).code is ErrorCode.NOT_OFFERER
    finally:
        await client.close()
        await therapist.close()


BAD_SEALED = {
    "clear and sealed": {"type": "offer", "sdp": "v=0", "counter": 1, "sealed": SEALED},
    "neither": {"type": "offer", "counter": 1},
    "sealed without counter": {"type": "offer", "sealed": SEALED},
    "sealed with a mac": {"type": "offer", "counter": 1, "sealed": SEALED, "mac": "bWFj"},
    "sealed candidate with its line": {"type": "candidate", "candidate": "", "counter": 1, "sealed": SEALED},
    "sealed candidate with a mid": {"type": "candidate", "sdp_mid": "0", "counter": 1, "sealed": SEALED},
    "sealed candidate without counter": {"type": "candidate", "sealed": SEALED},
    "clear candidate with a counter": {"type": "candidate", "candidate": "", "counter": 1},
    "not base64url": {"type": "offer", "counter": 1, "sealed": SEALED[:-1] + "+"},
    "padded": {"type": "offer", "counter": 1, "sealed": SEALED[:-2] + "=="},
    "length 1 mod 4": {"type": "offer", "counter": 1, "sealed": SEALED + "A"},
    "stray bits at the end": {"type": "offer", "counter": 1, "sealed": SEALED + "AB"},
    "too short": {"type": "offer", "counter": 1, "sealed": "A" * 36},
    "too long": {"type": "offer", "counter": 1, "sealed": "A" * 65_004},
}


async def test_a_sealed_message_of_the_wrong_shape_is_refused_and_not_relayed(broker: RunningBroker) -> None:
    _, therapist, client = await admitted_pair(broker)
    try:
        before = len(client.received)
        for what, frame in BAD_SEALED.items():
            mark = len(therapist.received)
            await therapist.send_raw(json.dumps({**frame, "to": client.peer_id}))
            error = await therapist.expect(Error, since=mark)  # undecodable: no id to refer to
            assert error.code is ErrorCode.BAD_MESSAGE, what
        await therapist.send_raw(
            json.dumps({"type": "candidate", "to": client.peer_id, "counter": 1, "sealed": SEALED})
        )
        await client.expect(Candidate, where=lambda m: m.sealed == SEALED)  # the good one behind them
        assert [m for m in client.received[before:] if isinstance(m, (Offer, Candidate))] == [
            m for m in client.received[before:] if isinstance(m, Candidate) and m.sealed == SEALED
        ]
    finally:
        await client.close()
        await therapist.close()


async def test_relays_are_handled_within_the_step_once_the_record_is_known(broker: RunningBroker) -> None:
    """The embedded fast path (``Hub.receive_now``): nothing to await, the same rules as the slow path."""
    _, therapist, client = await admitted_pair(broker)
    hub = broker.hub
    conn = next(c for c in hub.connections.by_id.values() if c.peer_id == client.peer_id)

    def frame(kind: str, to: str, ref: str, **fields: Any) -> str:
        return json.dumps({"type": kind, "to": to, "id": ref, **fields})

    try:
        first = hub.receive_now(conn, frame("candidate", therapist.peer_id, "c0", candidate="", sdp_mid="slow"))
        if first is not None:  # the record was not in the process's copy yet: read from the store
            await first
        await therapist.expect(Candidate, where=lambda m: m.sdp_mid == "slow")
        assert hub.receive_now(conn, frame("candidate", therapist.peer_id, "c1", candidate="", sdp_mid="fast")) is None
        relayed = await therapist.expect(Candidate, where=lambda m: m.sdp_mid == "fast")
        assert relayed.from_ == client.peer_id and relayed.id is None and relayed.seq is not None

        refused = [
            (frame("offer", therapist.peer_id, "r1", sdp="v=0"), ErrorCode.NOT_OFFERER),
            (frame("candidate", client.peer_id, "r2", candidate=""), ErrorCode.NOT_IN_SESSION),
            (frame("candidate", "nobody", "r3", candidate=""), ErrorCode.NOT_IN_SESSION),
        ]
        for text, _ in refused:
            assert hub.receive_now(conn, text) is None
        for (_, code), ref in zip(refused, ("r1", "r2", "r3"), strict=True):
            assert (await client.expect(Error, where=lambda m, ref=ref: m.ref == ref)).code is code  # type: ignore[misc]
        await asyncio.sleep(0.1)
        assert not any(isinstance(m, Candidate) and m.sdp_mid is None for m in therapist.received)
    finally:
        await client.close()
        await therapist.close()


def masked_text_frames(texts: list[str]) -> bytes:
    """Client text frames (RFC 6455 5.2, masked), to hand to the socket in one write."""
    out = bytearray()
    for text in texts:
        payload = text.encode()
        mask = os.urandom(4)
        if len(payload) < 126:
            out += bytes((0x81, 0x80 | len(payload)))
        else:
            out += bytes((0x81, 0x80 | 126)) + len(payload).to_bytes(2, "big")
        out += mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes(out)


async def test_a_fault_in_the_hub_is_answered_and_the_connection_carries_on(broker: RunningBroker) -> None:
    """A bug met while a relay is handled within the step (``Hub.receive_now``) must not end the
    connection: the sender gets ``internal`` naming the relay's ``id``, and its next frame is
    handled as usual."""
    _, therapist, client = await admitted_pair(broker)
    hub = broker.hub

    def broken(session_id: str) -> None:
        raise RuntimeError("a bug")

    hub.records.relay_copy_now = broken  # type: ignore[method-assign]
    try:
        await client.send_raw(json.dumps({"type": "candidate", "to": therapist.peer_id, "candidate": "", "id": "b1"}))
        assert (await client.expect(Error, where=lambda m: m.ref == "b1" and m.code is ErrorCode.INTERNAL)).code
    finally:
        del hub.records.relay_copy_now
    try:
        await client.send_raw(
            json.dumps({"type": "candidate", "to": therapist.peer_id, "candidate": "", "sdp_mid": "after"})
        )
        await therapist.expect(Candidate, where=lambda m: m.sdp_mid == "after")
    finally:
        await client.close()
        await therapist.close()


async def test_relays_never_wait_for_a_session_record_being_read_again(
    broker: RunningBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """Relays check admission against this process's copy of the record; once the copy is
    half its allowed age, a relay reads it again in the background and goes on at once. A copy
    past its age is never used."""
    links, therapist, client = await admitted_pair(broker)
    hub = broker.hub
    conn = next(c for c in hub.connections.by_id.values() if c.peer_id == client.peer_id)

    def candidate(mid: str) -> str:
        return json.dumps({"type": "candidate", "to": therapist.peer_id, "candidate": "", "sdp_mid": mid})

    try:
        await client.send_raw(candidate("warm"))
        await therapist.expect(Candidate, where=lambda m: m.sdp_mid == "warm")
        session = hub.records._relay_records[links.session][1]
        aged = time.monotonic() - (RELAY_RECORD_REFRESH_S + RELAY_RECORD_MAX_AGE_S) / 2
        hub.records._relay_records[links.session] = (aged, session)
        assert hub.receive_now(conn, candidate("with the old copy")) is None  # done within the step
        await therapist.expect(Candidate, where=lambda m: m.sdp_mid == "with the old copy")
        for _ in range(100):  # renewed meanwhile, by one read of the store
            if hub.records._relay_records[links.session][0] > aged:
                break
            await asyncio.sleep(0.01)
        assert hub.records._relay_records[links.session][0] > aged and not hub.records._refreshing

        # A read that fails (the store away, or a bug) leaves the copy as it was, to age out.
        for fault in (StoreUnavailable("away"), RuntimeError("a bug")):

            async def failing(session_id: str, fault: Exception = fault) -> None:
                raise fault

            aged = time.monotonic() - (RELAY_RECORD_REFRESH_S + RELAY_RECORD_MAX_AGE_S) / 2
            hub.records._relay_records[links.session] = (aged, session)
            hub.records.load = failing  # type: ignore[method-assign]
            try:
                assert hub.receive_now(conn, candidate(f"while the store fails: {fault}")) is None
                await therapist.expect(Candidate, where=lambda m, f=fault: m.sdp_mid == f"while the store fails: {f}")
                for _ in range(100):
                    if not hub.records._refreshing:
                        break
                    await asyncio.sleep(0.01)
                assert not hub.records._refreshing and hub.records._relay_records[links.session][0] == aged
            finally:
                del hub.records.load
        assert caplog.text.count("where=relay_record_refresh") == 1  # the bug is logged, the store being away is not

        hub.records._relay_records[links.session] = (time.monotonic() - RELAY_RECORD_MAX_AGE_S, session)
        assert hub.records.relay_copy_now(links.session) is None  # too old: relays read the store themselves
    finally:
        await client.close()
        await therapist.close()


async def test_copies_falling_due_close_together_are_read_again_together(
    broker: RunningBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy due for a read waits for the others falling due soon after (RELAY_RECORD_GATHER_S),
    so their reads go to the store together: one wake-up of the process and of Redis for many
    sessions (P4 in benchmarks/). Relays go on with the copies meanwhile."""
    # The same rule on a slower clock, so this machine's pauses cannot blur it.
    monkeypatch.setattr(session_records, "RELAY_RECORD_MAX_AGE_S", 20.0)
    monkeypatch.setattr(session_records, "RELAY_RECORD_REFRESH_S", 10.0)
    monkeypatch.setattr(session_records, "RELAY_RECORD_GATHER_S", 1.5)
    hub = broker.hub
    pairs = [await admitted_pair(broker) for _ in range(2)]
    reads: list[tuple[str, float]] = []
    load = hub.records.load

    async def counted(session_id: str) -> Any:
        reads.append((session_id, time.monotonic()))
        return await load(session_id)

    try:
        for _, therapist, client in pairs:
            await client.send_raw(
                json.dumps({"type": "candidate", "to": therapist.peer_id, "candidate": "", "sdp_mid": "warm"})
            )
            await therapist.expect(Candidate, where=lambda m: m.sdp_mid == "warm")
        hub.records.load = counted  # type: ignore[method-assign]
        aged = time.monotonic() - 12.0
        sent = []
        for n, (links, therapist, client) in enumerate(pairs):
            hub.records._relay_records[links.session] = (aged, hub.records._relay_records[links.session][1])
            conn = next(c for c in hub.connections.by_id.values() if c.peer_id == client.peer_id)
            if n:
                await asyncio.sleep(0.4)
            sent.append(time.monotonic())
            mid = f"due {n}"
            assert (
                hub.receive_now(
                    conn, json.dumps({"type": "candidate", "to": therapist.peer_id, "candidate": "", "sdp_mid": mid})
                )
                is None
            )
            await therapist.expect(Candidate, where=lambda m, mid=mid: m.sdp_mid == mid)  # with the old copy
        for _ in range(500):
            if all(hub.records._relay_records[links.session][0] > aged for links, _, _ in pairs):
                break
            await asyncio.sleep(0.01)
        assert (
            all(hub.records._relay_records[links.session][0] > aged for links, _, _ in pairs)
            and not hub.records._refreshing
        )
        assert sorted(s for s, _ in reads) == sorted(links.session for links, _, _ in pairs)
        started = [t for _, t in reads]
        assert min(started) >= sent[0] + 1.4  # not read when each fell due (0.4 s apart) ...
        assert max(started) - min(started) < 0.2  # ... but together
    finally:
        del hub.records.load
        for _, therapist, client in pairs:
            await client.close()
            await therapist.close()


async def test_frames_read_together_take_effect_in_order(broker: RunningBroker) -> None:
    """A relay sent right behind a frame that must wait for the store waits for it (never overtakes it)."""
    _, therapist, client = await admitted_pair(broker)
    try:
        await therapist.send_raw(
            json.dumps({"type": "candidate", "to": client.peer_id, "candidate": "", "sdp_mid": "warm"})
        )
        await client.expect(Candidate, where=lambda m: m.sdp_mid == "warm")
        frames = [
            json.dumps({"type": "candidate", "to": client.peer_id, "candidate": "", "sdp_mid": "before", "id": "a1"}),
            json.dumps({"type": "remove", "peer": client.peer_id, "id": "a2"}),
            json.dumps({"type": "candidate", "to": client.peer_id, "candidate": "", "sdp_mid": "after", "id": "a3"}),
        ]
        for text in frames:  # back to back, nothing awaited in between on the broker's side
            await therapist.send_raw(text)
        error = await therapist.expect(Error, where=lambda m: m.ref == "a3")
        assert error.code is ErrorCode.NOT_ADMITTED
        await client.expect(Removed)
        mids = [m.sdp_mid for m in client.received if isinstance(m, Candidate)]
        assert "before" in mids and "after" not in mids
        assert client.received.index(next(m for m in client.received if isinstance(m, Removed))) > max(
            i for i, m in enumerate(client.received) if isinstance(m, Candidate) and m.sdp_mid == "before"
        )
    finally:
        await client.close()
        await therapist.close()


async def test_a_frame_other_than_a_relay_waits_for_the_relays_still_on_their_way(broker: RunningBroker) -> None:
    """On Redis a relay is not awaited (``Relays._on_its_way``); what the connection sends next still
    takes effect after it, and a relay that fails later is answered with its ref.

    The relays on their way are the bus's ``Pending`` (the Redis bus's own is tested in
    test_bus.py); here one the test settles itself."""
    links, therapist, client = await admitted_pair(broker)
    hub = broker.hub
    conn = next(c for c in hub.connections.by_id.values() if c.peer_id == client.peer_id)

    class OnItsWay:
        def __init__(self) -> None:
            self.settled = asyncio.Event()

        def done(self) -> bool:
            return self.settled.is_set()

        async def wait(self) -> None:
            await self.settled.wait()

    try:
        hub.relays._relay_failed(conn, "r0", StoreUnavailable("gone"))
        assert (await client.expect(Error, where=lambda m: m.ref == "r0")).code is ErrorCode.UNAVAILABLE

        on_its_way = OnItsWay()
        hub.relays._on_its_way(conn, on_its_way)
        leaving = hub.receive_now(conn, json.dumps({"type": "leave"}))
        assert leaving is not None
        task = asyncio.ensure_future(leaving)
        await asyncio.sleep(0.1)
        assert not task.done()
        assert (await record_of(broker, links.session)).seat(client.peer_id).state is SeatState.ADMITTED
        on_its_way.settled.set()  # the relays were taken
        await asyncio.wait_for(task, 5)
        assert conn not in hub.relays._unsettled
        assert (await record_of(broker, links.session)).seat(client.peer_id).state is SeatState.LEFT
    finally:
        await client.close()
        await therapist.close()


class RecordingSocket:
    """The hub's side of a socket, keeping each frame written; ``paused`` holds every write back."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed_with: int | None = None
        self.paused = asyncio.Event()
        self.paused.set()

    async def send_text(self, data: bytes) -> None:
        await self.paused.wait()
        self.writes.append(data)

    async def close(self, code: int, reason: str) -> None:
        self.closed_with = code


async def test_a_connection_writes_in_order_and_keeps_nothing_once_idle() -> None:
    """Memory per idle connection (P2): the writer and its queue exist only while messages wait."""
    sock = RecordingSocket()
    conn = Connection(sock, Limits())
    for n in (b"1", b"2", b"3"):
        conn.deliver(n)
    assert conn.writer is not None and not conn.flushed
    await asyncio.sleep(0)
    assert sock.writes == [b"1", b"2", b"3"]
    assert conn.flushed and conn.writer is None and conn.pending is None
    conn.deliver(b"4", CLOSE_TOO_SLOW)
    conn.deliver(b"5")  # after the close: never written
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert sock.writes == [b"1", b"2", b"3", b"4"] and sock.closed_with == CLOSE_TOO_SLOW and conn.closed


async def test_a_peer_whose_queue_fills_is_closed_and_nobody_else_waits() -> None:
    slow, quick = RecordingSocket(), RecordingSocket()
    slow.paused.clear()  # the peer reads nothing: the writer waits on its first frame
    limits = Limits(send_queue_limit=4)
    slow_conn, quick_conn = Connection(slow, limits), Connection(quick, limits)
    for n in range(5):  # one taken by the writer, four wait
        slow_conn.deliver(b"%d" % n)
        await asyncio.sleep(0)
    quick_conn.deliver(b"q")
    await asyncio.sleep(0)
    assert quick.writes == [b"q"] and not slow_conn.closed
    slow_conn.deliver(b"full")
    await asyncio.sleep(0)
    assert slow_conn.closed and slow.closed_with == CLOSE_TOO_SLOW and slow_conn.pending is None
    slow.paused.set()  # whatever the writer held goes, nothing after it
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert slow.writes == [b"0"] and slow_conn.writer is None


# ---------------------------------------------------------------- bad input changes nothing


BAD_FRAMES = [
    "not json",
    "[]",
    '{"type":"nope"}',
    '{"type":"admit"}',
    '{"type":"admit","peer":7}',
    '{"type":"admit","peer":"x","extra":1}',
    '{"type":"offer","to":"../etc","sdp":"v=0"}',
    '{"type":"checklist","policy_version":"v","answers":{"Bad Id":true}}',
    '{"type":"ping","n":-1}',
    '{"type":"hello","protocol":1}',
    '{"type":"join","token":"again"}',
]


@pytest.mark.parametrize("frame", BAD_FRAMES)
async def test_a_bad_message_gets_an_error_and_changes_nothing(broker: RunningBroker, frame: str) -> None:
    links = await schedule(broker)
    client = await waiting_client(links)
    try:
        before = await record_of(broker, links.session)
        await client.send_raw(frame)
        error = await client.expect(Error)
        assert error.code in (ErrorCode.BAD_MESSAGE, ErrorCode.ALREADY_JOINED) and error.message
        assert await record_of(broker, links.session) == before
        # The connection still works.
        await client.send_raw('{"type":"ping","n":5}')
        assert (await client.expect(type(_pong()), where=lambda m: m.n == 5)).n == 5
    finally:
        await client.close()


def _pong():  # noqa: ANN202
    from broker.signaling.protocol import Pong

    return Pong(n=0)


async def test_hello_must_come_first_and_join_before_anything_else(broker: RunningBroker) -> None:
    links = await schedule(broker)
    peer = await RawPeer.open(broker)
    try:
        await peer.send(type="join", token=links.tokens[links.peers[links.client]])
        assert (await peer.recv())["code"] == "hello_required"
        await peer.send(type="hello", protocol=1)
        assert (await peer.recv())["type"] == "welcome"
        await peer.send(type="admit", peer="abc", id="q")
        error = await peer.recv()
        assert (error["code"], error["ref"]) == ("not_joined", "q")
    finally:
        await peer.close()


async def test_an_unsupported_protocol_version_is_refused(broker: RunningBroker) -> None:
    peer = await RawPeer.open(broker)
    try:
        await peer.send(type="hello", protocol=99)
        assert (await peer.recv())["code"] == "unsupported_protocol"
        closing = await peer.ws.receive(5)
        assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    finally:
        await peer.close()


# ---------------------------------------------------------------- tokens


async def join_error(broker: RunningBroker, token: str) -> dict[str, Any]:
    peer = await RawPeer.open(broker)
    try:
        reply = await peer.join(token)
        assert reply["type"] == "error", reply
        return reply
    finally:
        await peer.close()


async def test_unknown_expired_not_yet_valid_and_revoked_tokens_are_refused(broker: RunningBroker) -> None:
    links = await schedule(broker, clients=2)
    codec: TokenCodec = broker.hub.tokens
    now = int(time.time())
    forged = TokenCodec(b"k" * 32).issue(TokenClaims(new_session_id(), new_token_id(), now - 60, now + 3600))
    unknown_session = codec.issue(TokenClaims(new_session_id(), new_token_id(), now - 60, now + 3600))
    expired = codec.issue(TokenClaims(links.session, new_token_id(), now - 7200, now - 60))
    early = codec.issue(TokenClaims(links.session, new_token_id(), now + 3600, now + 7200))
    client_peer = links.peers[links.clients[1]]
    await broker.hub.revoke_seat(links.session, client_peer)
    revoked = links.tokens[client_peer]

    assert (await join_error(broker, expired))["code"] == "token_expired"
    assert (await join_error(broker, early))["code"] == "token_not_yet_valid"
    answers = [await join_error(broker, t) for t in (forged, unknown_session, revoked, "garbage!", "A" * 200)]
    assert all(a == answers[0] for a in answers), [json.dumps(a) for a in answers]  # nothing to learn
    assert answers[0]["code"] == "invalid_token"


async def test_join_page_shows_a_clear_notice_for_bad_links(broker: RunningBroker) -> None:
    links = await schedule(broker)
    now = int(time.time())
    expired = broker.hub.tokens.issue(TokenClaims(links.session, new_token_id(), now - 7200, now - 60))
    async with aiohttp.ClientSession() as http:
        for token, status, words in ((expired, 410, "expired"), ("nope", 404, "does not work")):
            async with http.get(f"{broker.url}/j/{token}") as response:
                body = await response.text()
                assert response.status == status
                assert words in body and "Traceback" not in body


# ---------------------------------------------------------------- seats


async def test_the_same_page_rejoining_with_its_secret_takes_over_the_seat(broker: RunningBroker) -> None:
    """A page whose connection was cut joins again with its resume secret: the newest connection
    holds the seat and the older one is told ``replaced`` and closed (4001)."""
    links = await schedule(broker)
    token = links.tokens[links.peers[links.client]]
    first = await RawPeer.open(broker)
    second = await RawPeer.open(broker)
    try:
        joined = await first.join(token)
        assert joined["type"] == "joined" and joined["other_device"] is False
        secret = joined["resume_secret"]
        assert isinstance(secret, str) and len(secret) == 43
        again = await second.join(token, resume_secret=secret)
        assert again["type"] == "joined" and again["resume_secret"] is None and again["other_device"] is False
        notice = await first.recv_type("error")
        assert notice["code"] == "replaced"
        closing = await first.ws.receive(5)
        assert closing.type is aiohttp.WSMsgType.CLOSE and closing.data == 4001
        record = await record_of(broker, links.session)
        seat = record.seat(links.peers[links.client])
        assert seat.conn is not None and seat.other is None
        assert secret not in repr(record)  # the record keeps a digest of the secret, not the secret
    finally:
        await first.close()
        await second.close()


async def test_a_declined_client_is_closed_and_cannot_come_back(broker: RunningBroker) -> None:
    links = await schedule(broker)
    therapist = BrokerClient(links.therapist)
    await therapist.connect()
    client = await waiting_client(links, reconnect=False)
    try:
        await therapist.decline(client.peer_id)
        await client.expect(type(_declined()))
        again = await join_error(broker, links.tokens[client.peer_id])
        assert again["code"] == "declined"
        await therapist.allow_return(client.peer_id)
        room = await therapist.expect(WaitingRoom, where=lambda m: m.seats[0].state is SeatState.INVITED)
        assert room.seats[0].checklist is None
    finally:
        await client.close()
        await therapist.close()


def _declined():  # noqa: ANN202
    from broker.signaling.protocol import Declined

    return Declined()


async def test_group_link_gives_each_person_their_own_seat_and_never_more(broker: RunningBroker) -> None:
    session, tokens = await broker.hub.create_session(clients=1, group_link=True)
    peers = [await RawPeer.open(broker) for _ in range(50)]
    try:
        replies = await asyncio.gather(*(p.join(tokens["group"]) for p in peers))
        joined = [r for r in replies if r["type"] == "joined"]
        refused = [r for r in replies if r["type"] == "error"]
        assert len(joined) == 1
        assert {r["code"] for r in refused} == {"no_seats_left"} and len(refused) == 49
        # The seat's own token comes back, so a reload returns to the same seat.
        seat_token = joined[0]["seat_token"]
        assert broker.hub.check_token(seat_token).token_id == session.clients()[0].token_id
    finally:
        for p in peers:
            await p.close()


# ---------------------------------------------------------------- resume and ending


async def test_messages_sent_while_a_peer_reconnects_are_resumed_once(broker: RunningBroker) -> None:
    _, therapist, client = await admitted_pair(broker)
    try:
        assert client._ws is not None
        await client._ws.close()  # the client's network drops; it reconnects by itself
        for _ in range(3):
            await therapist.send_raw(json.dumps({"type": "candidate", "to": client.peer_id, "candidate": ""}))
        await client.expect(Status, where=lambda m: client.reconnects >= 1, timeout=10)
        for _ in range(3):
            await client.expect(Candidate, where=lambda m: m.candidate == "", timeout=10)
        assert client.gaps == 0 and client.duplicates == 0
    finally:
        await client.close()
        await therapist.close()


async def test_ending_the_session_leaves_no_key_and_a_signed_record(broker: RunningBroker) -> None:
    links, therapist, client = await admitted_pair(broker)
    try:
        assert await broker.broker.store.keys(session_prefix(links.session))
        ended = await therapist.end()
        assert ended.reason == "ended"
        await client.expect(SessionEnded)
        assert await broker.broker.store.keys(session_prefix(links.session)) == []

        signed = await therapist.expect(SessionRecord)
        record = signed.record
        assert record["session"] == links.session and record["ended"] >= record["started"]
        seat = next(s for s in record["seats"] if s["peer"] == client.peer_id)
        assert seat["verified"] == "link" and seat["checklist_passed"] is True
        async with aiohttp.ClientSession() as http:
            async with http.get(broker.url + "/.well-known/broker-signing-key") as response:
                key = (await response.json())["keys"][0]
        assert key["kid"] == signed.key_id
        assert verify_record(record, signed.signature, key["x"])
        tampered = json.loads(json.dumps(record))
        tampered["ended"] += 1
        assert not verify_record(tampered, signed.signature, key["x"])
        # A link of an ended session opens nothing.
        assert (await join_error(broker, links.tokens[client.peer_id]))["code"] == "invalid_token"
    finally:
        await client.close()
        await therapist.close()


async def test_an_ended_sessions_links_answer_as_gone_before_its_record_is_deleted(broker: RunningBroker) -> None:
    """Between a session's end and the deletion of its keys (a store round trip later, on Redis), a
    link of it answers exactly as once its record is gone: invalid_token, or session_cancelled for a
    cancelled one; never session_ended, which would tell an ended session's link from an unknown one
    (the conformance suite caught it on Redis: docs/protocol.md, token.indistinguishable)."""
    from broker.signaling import session as sm
    from broker.signaling.cancelled import mark_cancelled

    for cancelled in (False, True):
        links = await schedule(broker)
        client_token = links.tokens[next(iter(links.seat_keys))]
        await broker.hub.records.mutate(links.session, lambda s: sm.end(s, s.therapist().id))
        assert (await record_of(broker, links.session)) is not None  # the record is still there
        if cancelled:
            await mark_cancelled(broker.broker.store, links.session, 3600)
        expected = "session_cancelled" if cancelled else "invalid_token"
        assert (await join_error(broker, client_token))["code"] == expected
        with pytest.raises(ProtocolError) as refused:
            await broker.hub.resolve_token(client_token)
        assert refused.value.code.value == expected


# ---------------------------------------------------------------- TURN


async def test_admitted_peers_get_short_lived_turn_credentials_and_relay_only(tmp_path) -> None:  # noqa: ANN001
    import base64
    import hashlib
    import hmac

    from tests.conftest import start_broker

    running = await start_broker(tmp_path, turn_urls=("turn:127.0.0.1:3478",), turn_secret="practice-secret")
    try:
        session, tokens = await running.hub.create_session(relay_only=True, duration_s=3600)
        peer = await RawPeer.open(running)
        joined = await peer.join(tokens[session.therapist().id])
        await peer.close()
        assert joined["ice_transport_policy"] == "relay"
        (server,) = joined["ice_servers"]
        assert server["urls"] == ["turn:127.0.0.1:3478"]
        expiry, opaque = server["username"].split(":")
        assert session.therapist().id not in opaque  # an opaque id, never the peer id or a name
        assert 0 < int(expiry) - time.time() <= 24 * 3600
        expected = base64.b64encode(hmac.new(b"practice-secret", server["username"].encode(), hashlib.sha1).digest())
        assert server["credential"] == expected.decode()
    finally:
        await running.stop()


# ---------------------------------------------------------------- checklist through the broker


async def test_a_minors_seat_has_the_guardian_item_and_cannot_skip_it(broker: RunningBroker) -> None:
    from broker.client.broker_client import BrokerError

    links = await schedule(broker, clients=2, minors=1)
    minor = BrokerClient(links.clients[0])
    adult = BrokerClient(links.clients[1])
    try:
        joined_minor, joined_adult = await minor.connect(), await adult.connect()
        assert joined_minor.minor and not joined_adult.minor
        minor_ids = {i["id"] for i in joined_minor.policy["items"]}
        adult_ids = {i["id"] for i in joined_adult.policy["items"]}
        assert minor_ids - adult_ids == {"guardian_consent"}
        await minor.preflight()
        answers = {i: True for i in minor_ids if i != "guardian_consent"}
        with pytest.raises(BrokerError) as refused:
            await minor.submit_checklist(answers, details={"location": "x", "contact": "y"})
        assert (
            refused.value.code is ErrorCode.CHECKLIST_INCOMPLETE and "guardian" in refused.value.error.message.lower()
        )
        record = await record_of(broker, links.session)
        assert record.seat(minor.peer_id).state is SeatState.CHECKING  # nothing changed
        accepted = await minor.submit_checklist(
            {**answers, "guardian_consent": True}, details={"location": "x", "contact": "y"}
        )
        assert accepted.summary["all_required_met"] is True
    finally:
        await minor.close()
        await adult.close()


async def test_checklist_refusals_name_the_problem_and_allow_a_fix(broker: RunningBroker) -> None:
    from broker.client.broker_client import BrokerError

    links = await schedule(broker)
    client = BrokerClient(links.client)
    try:
        joined = await client.connect()
        ids = {i["id"] for i in joined.policy["items"]}
        details = {"location": "x", "contact": "y"}
        with pytest.raises(BrokerError) as no_preflight:
            await client.submit_checklist({i: True for i in ids}, details=details)
        assert no_preflight.value.code is ErrorCode.PREFLIGHT_MISSING
        await client.preflight()
        cases = [
            ({"policy_version": "0000000000000000"}, ErrorCode.POLICY_OUTDATED),
            ({"answers": {**{i: True for i in ids}, "made_up": True}}, ErrorCode.CHECKLIST_UNKNOWN_ITEM),
            ({"answers": {i: i != "private_place" for i in ids}}, ErrorCode.CHECKLIST_INCOMPLETE),
            ({"consent_version": "old"}, ErrorCode.CONSENT_OUTDATED),
        ]
        for change, code in cases:
            kwargs = {"details": details, **change}
            answers = kwargs.pop("answers", None)
            with pytest.raises(BrokerError) as refused:
                await client.submit_checklist(answers, **kwargs)  # type: ignore[arg-type]
            assert refused.value.code is code
        with pytest.raises(BrokerError) as no_details:
            await client.submit_checklist()
        assert no_details.value.code is ErrorCode.DETAILS_MISSING
        assert (await record_of(broker, links.session)).seat(client.peer_id).state is SeatState.CHECKING
        await client.submit_checklist(details=details)  # fixed: accepted
    finally:
        await client.close()


async def test_a_preflight_offer_with_media_is_refused(broker: RunningBroker) -> None:
    from aiortc import RTCConfiguration, RTCPeerConnection

    from broker.client.broker_client import BrokerError
    from broker.signaling.protocol import PreflightAnswer, PreflightOffer

    links = await schedule(broker)
    client = BrokerClient(links.client)
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        await client.connect()
        pc.addTransceiver("audio")
        pc.createDataChannel("preflight")
        await pc.setLocalDescription(await pc.createOffer())
        with pytest.raises(BrokerError) as refused:
            await client.request(PreflightOffer(sdp=pc.localDescription.sdp), PreflightAnswer)
        assert refused.value.code is ErrorCode.PREFLIGHT_REFUSED
    finally:
        await pc.close()
        await client.close()


# ---------------------------------------------------------------- writing to peers


def _small_receive_buffer(addr_info: Any) -> Any:
    """A client socket with a tiny receive buffer, so what it does not read backs up into the broker."""
    import socket

    family, kind, proto, _, _ = addr_info
    sock = socket.socket(family=family, type=kind, proto=proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return sock


async def test_messages_keep_their_order_when_a_slow_reader_makes_them_wait(tmp_path) -> None:  # noqa: ANN001
    """Messages go straight to the socket until it is paused, then wait in the queue: the
    reader still gets every one, once, in order, and direct writing resumes once it caught up."""
    from tests.conftest import start_broker

    running = await start_broker(tmp_path, rate_per_s=1e6, rate_burst=1_000_000, send_queue_limit=100_000)
    hub = running.hub
    links = await schedule(running)
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(socket_factory=_small_receive_buffer))
    client: BrokerClient | None = None
    try:
        before = set(hub.connections.by_id)
        ws = await http.ws_connect(running.url + "/ws", origin=running.url, max_msg_size=0)
        [conn_id] = set(hub.connections.by_id) - before
        therapist = RawPeer(ws, http)
        joined = await therapist.join(links.tokens[(await record_of(running, links.session)).therapist().id])
        assert joined["type"] == "joined"
        client = await waiting_client(links)
        await therapist.send(type="admit", peer=client.peer_id)
        await therapist.recv_type("peers")
        # From here on the therapist reads nothing until the client has sent everything.
        count, padding = 300, "a=x-pad:" + "p" * 40_000 + "\r\n"
        for n in range(count):
            await client.send_raw(
                json.dumps({"type": "answer", "to": therapist_id(joined), "sdp": f"v=0\r\na=x-n:{n}\r\n{padding}"})
            )
        await client.send_raw('{"type":"ping","n":77}')
        await client.expect(type(_pong()), where=lambda m: m.n == 77)
        # 12 MB cannot all sit in the socket buffers: some of it waits in the broker's queue.
        assert not hub.connections.by_id[conn_id].flushed
        numbers, seqs = [], []
        while len(numbers) < count:
            message = await therapist.recv(timeout=30)
            if message["type"] == "answer":
                numbers.append(int(message["sdp"].split("a=x-n:")[1].split("\r\n")[0]))
                seqs.append(message["seq"])
        assert numbers == list(range(count))
        assert seqs == list(range(seqs[0], seqs[0] + count))
        for _ in range(500):
            if hub.connections.by_id[conn_id].flushed:
                break
            await asyncio.sleep(0.01)
        assert hub.connections.by_id[conn_id].flushed and not hub.connections.by_id[conn_id].closed
        await client.send_raw(json.dumps({"type": "candidate", "to": therapist_id(joined), "candidate": "last"}))
        last = await therapist.recv_type("candidate")
        assert last["candidate"] == "last" and last["seq"] == seqs[-1] + 1
    finally:
        if client is not None:
            await client.close()
        await http.close()
        await running.stop()


def therapist_id(joined: dict[str, Any]) -> str:
    return str(joined["peer"])


async def test_a_session_ends_when_its_window_closes_and_others_go_on(tmp_path) -> None:  # noqa: ANN001
    """One timer serves every session's expiry: the one that is due ends (4010, no key left), a later one
    stays open, and one whose peers all left before its end is simply forgotten."""
    from broker.signaling.connections import CLOSE_ENDED
    from broker.signaling.session import DEFAULT_GRACE_S
    from tests.conftest import start_broker

    running = await start_broker(tmp_path)
    hub = running.hub
    now = math.ceil(time.time())  # the margins below are at least what they say, on a busy machine too
    soon, tokens_soon = await hub.create_session(starts=now - 300 - DEFAULT_GRACE_S + 4, duration_s=300)
    left, tokens_left = await hub.create_session(starts=now - 300 - DEFAULT_GRACE_S + 3, duration_s=300)
    later, tokens_later = await hub.create_session(duration_s=3600)
    peers: list[RawPeer] = []
    try:
        gone = await RawPeer.open(running)
        assert (await gone.join(tokens_left[left.therapist().id]))["type"] == "joined"
        await gone.close()
        ending = await RawPeer.open(running)
        staying = await RawPeer.open(running)
        peers += [ending, staying]
        assert (await ending.join(tokens_soon[soon.therapist().id]))["type"] == "joined"
        assert (await staying.join(tokens_later[later.therapist().id]))["type"] == "joined"
        ended = await ending.recv_type("session_ended", timeout=30)
        assert ended["reason"] == "expired"
        assert await read_until_broker_closes(ending.ws, timeout=10) == ([], CLOSE_ENDED)
        assert await running.broker.store.keys(session_prefix(soon.id)) == []
        await staying.send(type="ping", n=3)
        assert (await staying.recv_type("pong"))["n"] == 3
        assert await hub.get_session(later.id) is not None
        assert later.id in hub.expiry and soon.id not in hub.expiry
        assert left.id not in hub.expiry
    finally:
        for peer in peers:
            await peer.close()
        await running.stop()


async def test_a_relay_that_overtakes_an_earlier_one_waits_for_it(broker: RunningBroker) -> None:
    """Relays for one seat from this process and from another travel different paths, so seq 2
    can reach the seat's process before seq 1. Seq 2 must not make seq 1 look already sent: the
    missing relays come from the seat's resume buffer first, then seq 2, in order, once each."""
    from broker.signaling.relay import mailbox_key
    from broker.store.bus import Envelope, with_seq

    links, therapist, client = await admitted_pair(broker)
    try:
        conn = next(c for c in broker.hub.connections.by_id.values() if c.peer_id == client.peer_id)
        box = mailbox_key(links.session, client.peer_id)
        frames = []
        for mid in ("first", "second"):
            data = json.dumps(
                {
                    "type": "candidate",
                    "to": client.peer_id,
                    "candidate": "",
                    "sdp_mid": mid,
                    "from": therapist.peer_id,
                    "seq": None,
                },
                separators=(",", ":"),
            ).encode()
            seq = await broker.broker.store.append(box, data, 128, 60)
            frames.append((seq, data))
        assert frames[1][0] == frames[0][0] + 1 and conn.last_seq == frames[0][0] - 1
        handler = broker.hub.relays._bus_handlers[links.session]
        late, early = frames
        handler(Envelope(client.peer_id, None, with_seq(early[1], early[0]), seq=early[0]))  # overtakes
        handler(Envelope(client.peer_id, None, with_seq(late[1], late[0]), seq=late[0]))  # arrives after
        got = [await client.expect(Candidate, where=lambda m: m.sdp_mid in ("first", "second")) for _ in range(2)]
        assert [m.sdp_mid for m in got] == ["first", "second"]
        await asyncio.sleep(0.2)
        assert client.gaps == 0 and client.duplicates == 0
    finally:
        await client.close()
        await therapist.close()


async def test_every_change_of_a_record_raises_its_revision_even_after_an_older_release_wrote_it(
    broker: RunningBroker,
) -> None:
    """Views carry the record's revision and a late, older one is dropped (broker/signaling/relay.py):
    the revision must grow with each change, also after a process that keeps none wrote the record."""
    links = await schedule(broker)
    records = broker.hub.records
    first = (await records.load(links.session)).revision
    changed, _ = await records.mutate(links.session, lambda s: None)
    assert changed.revision > first
    again, _ = await records.mutate(links.session, lambda s: None)
    assert again.revision > changed.revision
    await asyncio.sleep(0.01)
    # A process of an older release writes the record back without a revision (0): the next change still
    # goes past every revision given before (they were at most the time in ms, plus one per change).
    assert session_records.next_revision(0, broker.hub.clock()) > again.revision
    assert session_records.next_revision(again.revision, 0.0) == again.revision + 1
