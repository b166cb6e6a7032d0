"""The bus contract on LocalBus and RedisBus, and what only the Redis bus must do between processes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import msgspec
import pytest
import redis.asyncio as aioredis

from broker.signaling.protocol import Answer, Candidate, Offer, Renegotiate, encode
from broker.store.backends import connect_redis
from broker.store.base import Store, StoreUnavailable
from broker.store.bus import Bus, Envelope, Pending, with_seq
from broker.store.local_bus import LocalBus
from broker.store.memory import MemoryStore
from broker.store.redis_bus import RedisBus
from broker.store.redis_bus_messages import channel_of, peer_channel_of
from broker.store.redis_pipe import resp_command
from broker.store.redis_store import TIMEOUT_S, CommandRefused, RedisStore, redis_client
from broker.store.sealing import Sealer
from tests.redis_server import RedisServer, free_port, redis_server  # noqa: F401 - the fixture

KEY = bytes(range(32, 64))


@dataclass
class Node:
    """One broker process's bus (and, for Redis, its store)."""

    bus: Bus
    store: RedisStore | None = None

    async def close(self) -> None:
        await self.bus.close()
        if self.store is not None:
            await self.store.close()


async def redis_node(url: str, key: bytes = KEY) -> Node:
    store, bus = await connect_redis(url, key)
    return Node(bus, store)


@dataclass
class Inbox:
    """A handler that records what it gets."""

    got: list[Envelope] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def __call__(self, envelope: Envelope) -> None:
        self.got.append(envelope)
        self.arrived.set()

    @property
    def data(self) -> list[bytes]:
        return [e.data for e in self.got]

    async def wait_for(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        async def loop() -> None:
            while not condition():
                self.arrived.clear()
                await self.arrived.wait()

        await asyncio.wait_for(loop(), timeout)


@dataclass
class Spy:
    """Anyone with access to Redis: reads what the brokers send on a session's channel, publishes anything."""

    raw: aioredis.Redis
    pubsub: aioredis.client.PubSub
    sid: str

    async def read(self, count: int) -> list[bytes]:
        """The next ``count`` messages on the channel."""
        captured: list[bytes] = []
        async with asyncio.timeout(10):
            while len(captured) < count:
                message = await self.pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is not None:
                    captured.append(message["data"])
        return captured

    async def nothing_more(self) -> bool:
        return await self.pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5) is None

    async def publish(self, payload: bytes, sid: str | None = None) -> None:
        await self.raw.execute_command("SPUBLISH", channel_of(sid or self.sid), payload)


@contextlib.asynccontextmanager
async def spying(server: RedisServer, sid: str, channel: bytes | None = None) -> AsyncIterator[Spy]:  # noqa: F811
    """A spy on the session's channel (or on ``channel``)."""
    raw = aioredis.Redis.from_url(server.url)
    pubsub = raw.pubsub()
    try:
        await pubsub.ssubscribe(channel or channel_of(sid))
        await pubsub.get_message(timeout=1.0)  # the confirmation
        yield Spy(raw, pubsub, sid)
    finally:
        await pubsub.aclose()
        await raw.aclose()


def envelope(data: bytes, to_peer: str | None = "p1") -> Envelope:
    return Envelope(to_peer, None, data)


def new_session() -> str:
    return secrets.token_hex(8)


@pytest.fixture(params=["local", "redis"])
async def node(request: pytest.FixtureRequest) -> AsyncIterator[Node]:
    if request.param == "local":
        made = Node(LocalBus())
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        server.ensure_running()
        made = await redis_node(server.url)
    yield made
    await made.close()


@pytest.fixture
async def pair(redis_server: RedisServer) -> AsyncIterator[tuple[RedisBus, RedisBus]]:  # noqa: F811
    """Two broker processes' buses on one Redis."""
    redis_server.ensure_running()
    a, b = await redis_node(redis_server.url), await redis_node(redis_server.url)
    assert isinstance(a.bus, RedisBus) and isinstance(b.bus, RedisBus)
    await asyncio.wait_for(asyncio.gather(a.bus.connected.wait(), b.bus.connected.wait()), 10)
    yield a.bus, b.bus
    await a.close()
    await b.close()


@pytest.fixture
async def one(redis_server: RedisServer) -> AsyncIterator[tuple[RedisBus, RedisStore]]:  # noqa: F811
    """One broker process's bus and store on the test Redis."""
    redis_server.ensure_running()
    made = await redis_node(redis_server.url)
    assert isinstance(made.bus, RedisBus) and made.store is not None
    yield made.bus, made.store
    await made.close()


# ---------------------------------------------------------------- contract (both buses)


async def test_publish_reaches_every_handler_of_the_session_in_order(node: Node) -> None:
    sid, other = new_session(), new_session()
    first, second, elsewhere = Inbox(), Inbox(), Inbox()
    await node.bus.subscribe(sid, first)
    await node.bus.subscribe(sid, second)
    await node.bus.subscribe(other, elsewhere)
    for i in range(100):
        await node.bus.publish(sid, envelope(b"m%d" % i))
    expected = [b"m%d" % i for i in range(100)]
    assert first.data == expected and second.data == expected
    assert elsewhere.got == []


async def test_local_delivery_happens_within_publish(node: Node) -> None:
    sid = new_session()
    inbox = Inbox()
    await node.bus.subscribe(sid, inbox)
    sent = Envelope(None, "conn-1", b"x", close=4001)
    await node.bus.publish(sid, sent)
    assert inbox.got == [sent]  # delivered as published, fields intact, before publish returned


async def test_unsubscribed_handlers_get_nothing_more(node: Node) -> None:
    sid = new_session()
    stays, goes = Inbox(), Inbox()
    await node.bus.subscribe(sid, stays)
    await node.bus.subscribe(sid, goes)
    await node.bus.publish(sid, envelope(b"1"))
    await node.bus.unsubscribe(sid, goes)
    await node.bus.publish(sid, envelope(b"2"))
    await node.bus.unsubscribe(sid, stays)
    await node.bus.publish(sid, envelope(b"3"))
    assert stays.data == [b"1", b"2"] and goes.data == [b"1"]


# ---------------------------------------------------------------- relayed messages (both buses)


TRICKY = ['"seq":null', '\\"seq\\":null', '{"seq":null}', "seq", '\u2028 " \\ null']


@pytest.mark.parametrize("text", TRICKY)
@pytest.mark.parametrize("seq", [1, 9, 10, 2**53])
def test_with_seq_gives_the_bytes_encoding_with_the_seq_would(text: str, seq: int) -> None:
    relayed = [
        Candidate(to="abcdefgh", candidate=text, sdp_mid=text, from_="zyxwvuts"),
        Offer(to="abcdefgh", sdp=text, counter=7, mac=None, from_="zyxwvuts"),
        Answer(to="abcdefgh", sdp="v=0\r\n" + text, from_="zyxwvuts"),
        Renegotiate(to="abcdefgh", from_="zyxwvuts"),
    ]
    for message in relayed:
        assert with_seq(encode(message), seq) == encode(msgspec.structs.replace(message, seq=seq))
    with pytest.raises(ValueError):
        with_seq(encode(msgspec.structs.replace(relayed[0], seq=3)), seq)


def relayed_data(n: int) -> bytes:
    return encode(Candidate(to="abcdefgh", candidate=f"c{n}", from_="zyxwvuts"))


def store_of(node: Node) -> Store:
    return node.store if node.store is not None else MemoryStore()


async def test_a_relayed_message_is_logged_then_delivered_with_its_seq(node: Node) -> None:
    sid, key = new_session(), f"s:{{{new_session()}}}:box:abcdefgh"
    store = store_of(node)
    inbox = Inbox()
    await node.bus.subscribe(sid, inbox)
    seqs = [
        await node.bus.publish_relayed(sid, envelope(relayed_data(n), "abcdefgh"), store, key, 3, 60) for n in range(5)
    ]
    assert seqs == [1, 2, 3, 4, 5]
    assert [(e.to_peer, e.seq) for e in inbox.got] == [("abcdefgh", n) for n in seqs]
    assert inbox.data == [with_seq(relayed_data(n), n + 1) for n in range(5)]
    # The resume buffer keeps the newest three, without their seq (it is stamped on resend).
    assert await store.read_since(key, 0) == [(n + 1, relayed_data(n)) for n in (2, 3, 4)]


# ---------------------------------------------------------------- Redis: between processes


def test_commands_are_packed_as_redis_py_packs_them() -> None:
    from redis.asyncio.connection import Connection

    packer = Connection()
    for args in [
        (b"SPUBLISH", b"b:{s}", b"\x00\r\n" * 3000),
        ("EVAL", "return 1", 0),
        (b"X", "\u00e9", 0, -5, 2**40, b""),
    ]:
        assert resp_command(*args) == b"".join(packer.pack_command(*args))


async def test_relayed_messages_cross_processes_with_their_seq_among_other_messages(
    pair: tuple[RedisBus, RedisBus],
    redis_server: RedisServer,  # noqa: F811
) -> None:
    a, b = pair
    store = RedisStore(a.redis, a._sealer)
    sid, key = new_session(), f"s:{{{new_session()}}}:box:abcdefgh"
    local, remote = Inbox(), Inbox()
    await a.subscribe(sid, local)
    await b.subscribe(sid, remote)

    async def sender(n: int) -> None:
        for i in range(50):
            await a.publish_relayed(sid, envelope(relayed_data(1000 * n + i), "abcdefgh"), store, key, 128, 60)

    plain = [a.publish(sid, envelope(b"view%d" % i, None)) for i in range(100)]
    await asyncio.gather(*(sender(n) for n in range(4)), *plain)
    await remote.wait_for(lambda: len(remote.got) >= 300)
    for inbox in (local, remote):
        stamped = [e for e in inbox.got if e.seq is not None]
        assert [e.seq for e in stamped] == list(range(1, 201))  # once each, in the order Redis numbered them
        for e in stamped:
            assert e.data.endswith(b'"seq":%d,"id":null}' % e.seq)
        assert sorted(e.data for e in inbox.got if e.seq is None) == sorted(b"view%d" % i for i in range(100))
    assert [e.data for e in remote.got if e.seq] == [e.data for e in local.got if e.seq]
    # Each sender's messages stay in its own order.
    numbers = [int(msgspec.json.decode(e.data)["candidate"][1:]) for e in remote.got if e.seq]
    for n in range(4):
        mine = [x for x in numbers if x // 1000 == n]
        assert mine == sorted(mine) and len(mine) == 50
    await asyncio.sleep(0.2)
    assert len(local.got) == 300 and len(remote.got) == 300


async def test_a_relay_goes_only_to_the_processes_holding_its_recipient(
    redis_server: RedisServer,
    pair: tuple[RedisBus, RedisBus],  # noqa: F811
) -> None:
    """A relay goes to its recipient's own channel: the sending process, subscribed to the
    session's channel as every process holding one of its peers is, does not get it back."""
    a, b = pair
    store = RedisStore(a.redis, a._sealer)
    sid = new_session()
    key = f"s:{{{sid}}}:box:abcdefgh"
    sender, recipient = Inbox(), Inbox()
    await a.subscribe(sid, sender)
    await b.subscribe(sid, recipient)
    await b.hold_peer(sid, "abcdefgh")
    async with (
        spying(redis_server, sid) as on_session,
        spying(redis_server, sid, peer_channel_of(sid, "abcdefgh")) as on_peer,
    ):
        for n in range(3):
            await a.publish_relayed(sid, envelope(relayed_data(n), "abcdefgh"), store, key, 128, 60)
        await a.publish(sid, envelope(b"view", None))
        await recipient.wait_for(lambda: len(recipient.got) == 4)
        assert [e.seq for e in recipient.got] == [1, 2, 3, None]  # in publish order across the two channels
        assert [e.data for e in recipient.got[:3]] == [with_seq(relayed_data(n), n + 1) for n in range(3)]
        assert [m[8:11] for m in await on_peer.read(3)] == [b"r1:", b"r2:", b"r3:"]
        (view,) = await on_session.read(1)
        assert view[8:9] != b"r"  # only the view crossed the session's channel
        assert await on_session.nothing_more() and await on_peer.nothing_more()
    assert [e.seq for e in sender.got] == [1, 2, 3, None]  # delivered here from Redis's answer


async def test_a_relay_for_a_peer_nobody_holds_goes_to_the_sessions_channel(
    redis_server: RedisServer,
    pair: tuple[RedisBus, RedisBus],  # noqa: F811
) -> None:
    """While the recipient is away, or held by a broker from before recipients had their own
    channels (a rolling upgrade), its relays reach every process holding the session, as before."""
    a, b = pair
    store = RedisStore(a.redis, a._sealer)
    sid = new_session()
    key = f"s:{{{sid}}}:box:abcdefgh"
    inbox = Inbox()
    await b.subscribe(sid, inbox)  # as an older broker: the session's channel only
    raw = aioredis.Redis.from_url(redis_server.url)

    async def holders() -> int:
        reply = await raw.execute_command("PUBSUB", "SHARDNUMSUB", peer_channel_of(sid, "abcdefgh"))
        return int(reply[1])

    try:
        async with spying(redis_server, sid) as spy:
            await a.publish_relayed(sid, envelope(relayed_data(1), "abcdefgh"), store, key, 128, 60)
            await inbox.wait_for(lambda: len(inbox.got) == 1)
            assert (await spy.read(1))[0][8:11] == b"r1:"
            await b.hold_peer(sid, "abcdefgh")
            await b.hold_peer(sid, "abcdefgh")  # a second connection of the same seat (a take-over)
            assert await holders() == 1  # confirmed before hold_peer returned
            await a.publish_relayed(sid, envelope(relayed_data(2), "abcdefgh"), store, key, 128, 60)
            await b.release_peer(sid, "abcdefgh")
            await a.publish_relayed(sid, envelope(relayed_data(3), "abcdefgh"), store, key, 128, 60)
            await inbox.wait_for(lambda: len(inbox.got) == 3)
            assert await spy.nothing_more()  # still held once: both went to the peer's channel
            await b.release_peer(sid, "abcdefgh")
            for _ in range(100):
                if await holders() == 0:
                    break
                await asyncio.sleep(0.02)
            assert await holders() == 0
            await a.publish_relayed(sid, envelope(relayed_data(4), "abcdefgh"), store, key, 128, 60)
            await inbox.wait_for(lambda: len(inbox.got) == 4)
            assert (await spy.read(1))[0][8:11] == b"r4:"
        assert [(e.seq, e.data) for e in inbox.got] == [(n, with_seq(relayed_data(n), n)) for n in range(1, 5)]
    finally:
        await raw.aclose()


async def test_a_channel_redis_drops_is_subscribed_again(
    redis_server: RedisServer,
    pair: tuple[RedisBus, RedisBus],  # noqa: F811
) -> None:
    """Redis may end a subscription itself (a slot moving in a cluster; here, an unsubscribe sent
    on the bus's own connection): a channel still wanted, the session's or a held peer's, is
    subscribed again, and the messages for it keep coming."""
    a, b = pair
    store = RedisStore(a.redis, a._sealer)
    sid = new_session()
    key = f"s:{{{sid}}}:box:abcdefgh"
    inbox = Inbox()
    await b.subscribe(sid, inbox)
    await b.hold_peer(sid, "abcdefgh")
    channels = [channel_of(sid), peer_channel_of(sid, "abcdefgh")]
    again: list[bytes] = []
    subscribe = b._subscribe_remote

    async def recorded(channel: bytes) -> None:  # the bus's own, noted once Redis confirmed it
        await subscribe(channel)
        again.append(channel)

    b._subscribe_remote = recorded  # type: ignore[method-assign]
    async with b._send_lock:
        await b._conn.send_command("SUNSUBSCRIBE", *channels, check_health=False)
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        for _ in range(250):
            if sorted(again) == sorted(channels):
                break
            await asyncio.sleep(0.02)
        assert sorted(again) == sorted(channels)
        counts = await raw.execute_command("PUBSUB", "SHARDNUMSUB", *channels)
        assert counts[1::2] == [1, 1]
        async with spying(redis_server, sid) as spy:
            await a.publish(sid, envelope(b"view", None))
            await a.publish_relayed(sid, envelope(relayed_data(1), "abcdefgh"), store, key, 128, 60)
            await inbox.wait_for(lambda: len(inbox.got) == 2)
            assert [e.seq for e in inbox.got] == [None, 1]
            assert (await spy.read(1))[0][8:9] != b"r" and await spy.nothing_more()  # the relay: on the peer's channel
    finally:
        await raw.aclose()


async def test_a_seq_cannot_be_added_to_or_stripped_from_a_message(
    redis_server: RedisServer,
    pair: tuple[RedisBus, RedisBus],  # noqa: F811
) -> None:
    a, b = pair
    store = RedisStore(a.redis, a._sealer)
    sid, key = new_session(), f"s:{{{new_session()}}}:box:abcdefgh"
    inbox = Inbox()
    await b.subscribe(sid, inbox)
    async with spying(redis_server, sid) as spy:
        await a.publish(sid, envelope(b"plain"))
        await a.publish_relayed(sid, envelope(relayed_data(1), "abcdefgh"), store, key, 128, 60)
        await inbox.wait_for(lambda: len(inbox.got) == 2)
        plain, relayed = await spy.read(2)
        node_id = relayed[:8]
        assert relayed[8:11] == b"r1:" and plain[8:9] not in (b"r", b"s")
        stripped = node_id + relayed[11:]
        added = [node_id + mark + b"5:" + plain[8:] for mark in (b"r", b"s")]
        as_old = node_id + b"s1:" + relayed[11:]  # a batch passed off as an older broker's single relay
        for forged in (stripped, *added, as_old, node_id + b"rx:" + relayed[11:], node_id + b"r" + relayed[11:]):
            await spy.publish(forged)
        await spy.publish(node_id + b"r7:" + relayed[11:])  # Redis may renumber, as it may in the resume buffer
        await a.publish(sid, envelope(b"still listening"))
        await inbox.wait_for(lambda: len(inbox.got) == 4)
        assert [e.seq for e in inbox.got] == [None, 1, 7, None]
        assert inbox.got[2].data == with_seq(relayed_data(1), 7)


async def test_relays_queued_back_to_back_for_one_buffer_cross_as_one_message(
    redis_server: RedisServer,
    pair: tuple[RedisBus, RedisBus],  # noqa: F811
) -> None:
    """A burst for one recipient costs one script call and one bus message; anything else queued
    between two relays (another recipient, a plain message) starts a new one, so order holds."""
    a, b = pair
    store = RedisStore(a.redis, a._sealer)
    sid = new_session()
    key, other_key = f"s:{{{sid}}}:box:abcdefgh", f"s:{{{sid}}}:box:zyxwvuts"
    local, remote = Inbox(), Inbox()
    await a.subscribe(sid, local)
    await b.subscribe(sid, remote)
    async with spying(redis_server, sid) as spy:
        failures: list[BaseException] = []

        def relay(n: int, to: str = "abcdefgh", log_key: str = key) -> Pending:
            sent = a.publish_relayed_soon(sid, envelope(relayed_data(n), to), store, log_key, 128, 60, failures.append)
            assert sent is not None and not isinstance(sent, int)
            return sent

        # Queued within one step, as a socket's read hands over a burst: nothing is sent yet.
        burst = [relay(n) for n in range(5)]
        elsewhere = relay(5, "zyxwvuts", other_key)
        after = [relay(n) for n in (6, 7)]
        plain = asyncio.ensure_future(a.publish(sid, envelope(b"view")))
        await asyncio.sleep(0)  # the plain message is queued in its own step
        last = relay(8)
        # One command per run of relays for one buffer (the seqs Redis gave them are checked below).
        assert len({id(p) for p in burst}) == 1 and after[0] is after[1]
        assert len({id(burst[0]), id(elsewhere), id(after[0]), id(last)}) == 4
        assert not last.done()
        await last.wait()
        await plain
        assert all(p.done() for p in [*burst, elsewhere, *after]) and not failures
        # Settled, they let go of the messages: the hub keeps a connection's newest until its next frame.
        assert all(not p.envelopes and not p.entries for p in (burst[0], last))  # type: ignore[attr-defined]
        await remote.wait_for(lambda: len(remote.got) == 10)
        # Five bus messages: the burst, the other recipient's, two relays, the plain one, the last relay.
        captured = await spy.read(5)
        assert await spy.nothing_more()
        assert [m[8:11] for m in captured[:3]] + [m[8:11] for m in captured[4:]] == [b"r1:", b"r1:", b"r6:", b"r8:"]
        assert captured[3][8:9] != b"r"
        expected = [(e.to_peer, e.seq, e.data) for e in remote.got]
        assert expected == [("abcdefgh", n + 1, with_seq(relayed_data(n), n + 1)) for n in range(5)] + [
            ("zyxwvuts", 1, with_seq(relayed_data(5), 1)),
            ("abcdefgh", 6, with_seq(relayed_data(6), 6)),
            ("abcdefgh", 7, with_seq(relayed_data(7), 7)),
            ("p1", None, b"view"),
            ("abcdefgh", 8, with_seq(relayed_data(8), 8)),
        ]
        # This process's own handlers get the plain message at once (within publish), and the relays
        # as Redis numbers them, in the same order as everyone else.
        assert [(e.to_peer, e.seq, e.data) for e in local.got] == [expected[8], *expected[:8], expected[9]]
        assert await store.read_since(key, 0) == list(enumerate(map(relayed_data, (0, 1, 2, 3, 4, 6, 7, 8)), start=1))


async def test_relays_are_numbered_by_the_log_whatever_the_publisher_expected(
    pair: tuple[RedisBus, RedisBus],
    redis_server: RedisServer,  # noqa: F811
) -> None:
    """The publisher numbers relays as it expects Redis to (what Redis answered its last relays
    to the buffer): right, the script passes them on; wrong (another process or the store
    appended in between), the script numbers them again. Either way log and bus agree."""
    a, b = pair
    store_a, store_b = RedisStore(a.redis, a._sealer), RedisStore(b.redis, b._sealer)
    sid, key = new_session(), f"s:{{{new_session()}}}:box:abcdefgh"
    inbox = Inbox()
    await b.subscribe(sid, inbox)
    sent: list[bytes] = []

    async def relay(bus: RedisBus, store: RedisStore, n: int) -> int:
        sent.append(relayed_data(n))
        return await bus.publish_relayed(sid, envelope(relayed_data(n), "abcdefgh"), store, key, 128, 60)

    async with spying(redis_server, sid) as spy:
        assert [await relay(a, store_a, n) for n in range(3)] == [1, 2, 3]
        assert a._relay_seqs.by_log[key] == [4, None]  # learnt from Redis's answers: the next relays are numbered right
        assert await relay(b, store_b, 3) == 4  # another process: a's expectation is now wrong ...
        sent.append(b"by the store")
        assert await store_a.append(key, b"by the store", 128, 60) == 5  # ... and the store appends too
        burst = [
            a.publish_relayed(sid, envelope(relayed_data(n), "abcdefgh"), store_a, key, 128, 60) for n in (4, 5, 6)
        ]
        sent.extend(map(relayed_data, (4, 5, 6)))
        assert await asyncio.gather(*burst) == [6, 7, 8]  # numbered again by the script
        assert a._relay_seqs.by_log[key] == [9, None]
        assert await relay(a, store_a, 7) == 9
        heads = [message[8:] for message in await spy.read(6)]
    # What crossed the bus: each message numbered as the log numbered its first relay.
    assert [head[: head.index(b":") + 1] for head in heads] == [b"r1:", b"r2:", b"r3:", b"r4:", b"r6:", b"r9:"]
    assert await store_a.read_since(key, 0) == list(enumerate(sent, start=1))
    await inbox.wait_for(lambda: len(inbox.got) == 8)  # every relay, b's own delivered locally
    assert [(e.seq, e.data) for e in inbox.got] == [
        (seq, with_seq(data, seq)) for seq, data in enumerate(sent, start=1) if seq != 5
    ]


async def test_the_publisher_remembers_the_next_seq_of_a_bounded_number_of_buffers(
    one: tuple[RedisBus, RedisStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One remembered seq per buffer relayed to lately, never more than EXPECTED_SEQS_MAX (a
    process relays to many sessions over its life); a buffer forgotten is numbered by the log."""
    from broker.store import redis_relays

    monkeypatch.setattr(redis_relays, "EXPECTED_SEQS_MAX", 3)
    bus, store = one
    sid = new_session()
    keys = [f"s:{{{sid}}}:box:peer{n}" for n in range(5)]
    for key in keys * 2:
        assert await bus.publish_relayed(sid, envelope(relayed_data(1), "abcdefgh"), store, key, 8, 60) in (1, 2)
        assert len(bus._relay_seqs.by_log) <= 3
    assert list(bus._relay_seqs.by_log) == keys[2:]
    # keys[0] was forgotten: its next relay is numbered by the log, then remembered again.
    assert await bus.publish_relayed(sid, envelope(relayed_data(3), "abcdefgh"), store, keys[0], 8, 60) == 3
    assert bus._relay_seqs.by_log[keys[0]] == [4, None] and len(bus._relay_seqs.by_log) == 3
    assert await store.read_since(keys[0], 0) == [(1, relayed_data(1)), (2, relayed_data(1)), (3, relayed_data(3))]


async def test_a_relay_from_a_broker_before_batching_is_still_delivered(
    redis_server: RedisServer,
    pair: tuple[RedisBus, RedisBus],  # noqa: F811
) -> None:
    """During a rolling upgrade, a process not yet upgraded sends one relay per bus message,
    "s<seq>:" and its envelope sealed as other messages are: it still arrives."""
    a, b = pair
    sid = new_session()
    inbox = Inbox()
    await b.subscribe(sid, inbox)
    channel = channel_of(sid)
    old_broker = secrets.token_bytes(8)
    waiting = Envelope("abcdefgh", None, relayed_data(3), seq=0)
    sealed = a._sealer.seal(b"bus\x00" + channel + b"\x00" + old_broker, msgspec.msgpack.encode(waiting))
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        await raw.execute_command("SPUBLISH", channel, old_broker + b"s12:" + sealed)
        unnumbered = Envelope("abcdefgh", None, relayed_data(4), seq=None)  # a seq outside, none inside
        sealed = a._sealer.seal(b"bus\x00" + channel + b"\x00" + old_broker, msgspec.msgpack.encode(unnumbered))
        await raw.execute_command("SPUBLISH", channel, old_broker + b"s13:" + sealed)
        await a.publish(sid, envelope(b"after"))
        await inbox.wait_for(lambda: len(inbox.got) == 2)
        assert [(e.to_peer, e.seq, e.data) for e in inbox.got] == [
            ("abcdefgh", 12, with_seq(relayed_data(3), 12)),
            ("p1", None, b"after"),
        ]
    finally:
        await raw.aclose()


async def test_the_publisher_is_replaced_if_its_task_ever_ends_while_the_bus_is_open(
    one: tuple[RedisBus, RedisStore],
) -> None:
    """Every publish goes through the one publisher task: were it gone, each would wait forever."""
    bus, store = one
    sid = new_session()
    key = f"s:{{{sid}}}:box:abcdefgh"
    inbox = Inbox()
    await bus.subscribe(sid, inbox)
    first = next(t for t in bus._tasks if t.get_name() == "bus-publisher")
    first.cancel()  # as a bug or a stray cancellation would end it
    await asyncio.wait([first], timeout=5)
    assert first.done()
    await asyncio.wait_for(bus.publish(sid, envelope(b"after")), 5)
    assert (
        await asyncio.wait_for(bus.publish_relayed(sid, envelope(relayed_data(1), "abcdefgh"), store, key, 8, 60), 5)
        == 1
    )
    replacement = next(t for t in bus._tasks if t.get_name() == "bus-publisher")
    assert replacement is not first and not replacement.done()
    assert [e.data for e in inbox.got] == [b"after", with_seq(relayed_data(1), 1)]


async def test_a_fault_while_the_publisher_builds_a_command_fails_only_those_relays(
    one: tuple[RedisBus, RedisStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    from broker.store import redis_relays

    bus, store = one
    sid = new_session()
    key = f"s:{{{sid}}}:box:abcdefgh"
    build = redis_relays.Relays.command
    faults = [RuntimeError("injected")]

    def faulty(self: redis_relays.Relays) -> bytes:
        if faults:
            raise faults.pop()
        return build(self)

    monkeypatch.setattr(redis_relays.Relays, "command", faulty)
    with pytest.raises(StoreUnavailable):
        await asyncio.wait_for(bus.publish_relayed(sid, envelope(relayed_data(1), "abcdefgh"), store, key, 8, 60), 5)
    assert (
        await asyncio.wait_for(bus.publish_relayed(sid, envelope(relayed_data(2), "abcdefgh"), store, key, 8, 60), 5)
        == 1
    )
    assert await store.read_since(key, 0) == [(1, relayed_data(2))]


async def test_a_long_burst_is_split_into_commands_of_bounded_size(one: tuple[RedisBus, RedisStore]) -> None:
    from broker.store import redis_relays

    bus, store = one
    sid = new_session()
    key = f"s:{{{sid}}}:box:abcdefgh"
    inbox = Inbox()
    await bus.subscribe(sid, inbox)
    count = redis_relays.RELAYS_PER_COMMAND * 2 + 3
    failures: list[BaseException] = []
    sent = [
        bus.publish_relayed_soon(sid, envelope(relayed_data(n), "abcdefgh"), store, key, 1000, 60, failures.append)
        for n in range(count)
    ]
    assert len(bus._outbox) == 3  # queued as three commands, the last with the 3 left over
    step = redis_relays.RELAYS_PER_COMMAND
    assert [len({id(s) for s in sent[i : i + step]}) for i in range(0, count, step)] == [1, 1, 1]
    await sent[-1].wait()  # type: ignore[union-attr]
    assert [e.seq for e in inbox.got] == list(range(1, count + 1))
    big = b"x" * (redis_relays.RELAY_BYTES_PER_COMMAND // 2)
    sent = [
        bus.publish_relayed_soon(
            sid,
            envelope(encode(Candidate(to="abcdefgh", candidate=big.decode(), from_="zyxwvuts")), "abcdefgh"),
            store,
            key,
            1000,
            60,
            failures.append,
        )
        for _ in range(3)
    ]
    assert len(bus._outbox) == 3  # each over half the bound: one per command
    await sent[-1].wait()  # type: ignore[union-attr]
    assert [e.seq for e in inbox.got[count:]] == [count + 1, count + 2, count + 3] and not failures


async def test_a_refused_relay_command_fails_every_relay_it_carried(
    one: tuple[RedisBus, RedisStore],
    redis_server: RedisServer,  # noqa: F811
) -> None:
    bus, store = one
    sid = new_session()
    key = f"s:{{{sid}}}:box:abcdefgh"
    assert await bus.publish_relayed(sid, envelope(relayed_data(0), "abcdefgh"), store, key, 8, 60) == 1
    with redis_server.client() as raw:
        raw.execute_command("SCRIPT", "FLUSH")
    failures: list[BaseException] = []
    burst = [
        bus.publish_relayed_soon(sid, envelope(relayed_data(n), "abcdefgh"), store, key, 8, 60, failures.append)
        for n in (1, 2, 3)
    ]
    await burst[-1].wait()  # type: ignore[union-attr]
    assert len(failures) == 3 and all(isinstance(f, StoreUnavailable) for f in failures)
    assert await bus.publish_relayed(sid, envelope(relayed_data(4), "abcdefgh"), store, key, 8, 60) == 2
    assert await store.read_since(key, 0) == [(1, relayed_data(0)), (2, relayed_data(4))]


async def test_messages_cross_processes_in_publish_order(pair: tuple[RedisBus, RedisBus]) -> None:
    a, b = pair
    sid = new_session()
    local, remote = Inbox(), Inbox()
    await a.subscribe(sid, local)
    await b.subscribe(sid, remote)
    # Many publishers at once on process A: B must see them in the order A's handlers saw them.
    await asyncio.gather(*(a.publish(sid, envelope(b"m%d" % i)) for i in range(1000)))
    await remote.wait_for(lambda: len(remote.got) >= 1000)
    assert remote.data == local.data
    assert sorted(local.data) == sorted(b"m%d" % i for i in range(1000))
    await asyncio.sleep(0.2)
    assert len(local.got) == 1000  # A never delivers its own message a second time from Redis
    assert len(remote.got) == 1000


async def test_a_publish_round_trip_between_two_processes_keeps_each_direction_ordered(
    pair: tuple[RedisBus, RedisBus],
) -> None:
    a, b = pair
    sid = new_session()
    at_a, at_b = Inbox(), Inbox()
    await a.subscribe(sid, at_a)
    await b.subscribe(sid, at_b)

    async def send(bus: RedisBus, tag: bytes) -> None:
        for i in range(300):
            await bus.publish(sid, envelope(tag + b"%d" % i))

    await asyncio.gather(send(a, b"a"), send(b, b"b"))
    await at_a.wait_for(lambda: len(at_a.got) >= 600)
    await at_b.wait_for(lambda: len(at_b.got) >= 600)
    for inbox in (at_a, at_b):
        for tag in (b"a", b"b"):
            assert [d for d in inbox.data if d[:1] == tag] == [tag + b"%d" % i for i in range(300)]


async def test_the_channel_is_unsubscribed_when_the_last_handler_goes(
    redis_server: RedisServer,
    pair: tuple[RedisBus, RedisBus],  # noqa: F811
) -> None:
    _, b = pair
    sid = new_session()
    one, two = Inbox(), Inbox()
    raw = aioredis.Redis.from_url(redis_server.url)

    async def subscribers() -> int:
        reply = await raw.execute_command("PUBSUB", "SHARDNUMSUB", channel_of(sid))
        return int(reply[1])

    async def settle(expected: int) -> int:
        for _ in range(100):
            if await subscribers() == expected:
                break
            await asyncio.sleep(0.02)
        return await subscribers()

    try:
        await b.subscribe(sid, one)
        assert await subscribers() == 1  # confirmed by Redis before subscribe() returned
        await b.subscribe(sid, two)
        await b.unsubscribe(sid, one)
        assert await subscribers() == 1  # another handler remains: still subscribed
        await b.unsubscribe(sid, two)
        assert await settle(0) == 0
        assert b.channels() == 0
    finally:
        await raw.aclose()


async def test_messages_on_the_wire_are_sealed(
    redis_server: RedisServer,
    pair: tuple[RedisBus, RedisBus],  # noqa: F811
) -> None:
    a, _ = pair
    sid = new_session()
    canary = f"CANARY-sdp-{secrets.token_hex(4)}".encode()
    raw = aioredis.Redis.from_url(redis_server.url)
    listener = raw.pubsub()
    try:
        await listener.ssubscribe(channel_of(sid))
        await listener.get_message(timeout=1.0)  # the subscribe confirmation
        await a.publish(sid, envelope(b'{"type":"offer","sdp":"' + canary + b'"}'))
        message = None
        for _ in range(50):
            message = await listener.get_message(ignore_subscribe_messages=True, timeout=0.2)
            if message is not None:
                break
        assert message is not None and message["type"] == "smessage"
        assert canary not in message["data"] and b"offer" not in message["data"]
    finally:
        await listener.aclose()
        await raw.aclose()


async def test_forged_tampered_and_replayed_messages_are_dropped(
    redis_server: RedisServer,
    pair: tuple[RedisBus, RedisBus],  # noqa: F811
) -> None:
    a, b = pair
    sid, other = new_session(), new_session()
    inbox, other_inbox = Inbox(), Inbox()
    await b.subscribe(sid, inbox)
    await b.subscribe(other, other_inbox)
    async with spying(redis_server, sid) as spy:
        await a.publish(sid, envelope(b"genuine"))
        store = RedisStore(a.redis, a._sealer)
        await a.publish_relayed(sid, envelope(relayed_data(1), "abcdefgh"), store, f"s:{{{sid}}}:box:abcdefgh", 8, 60)
        await inbox.wait_for(lambda: len(inbox.got) == 2)
        payload, relayed = await spy.read(2)
        tampered = bytearray(payload)
        tampered[-1] ^= 1
        await spy.publish(b"not a broker message")
        await spy.publish(bytes(tampered))
        for replayed in (payload, relayed):  # into another session
            await spy.publish(replayed, other)
        # Sealed by a process with another key:
        stranger = await redis_node(redis_server.url, key=os.urandom(32))
        try:
            await stranger.bus.publish(sid, envelope(b"from a stranger"))
        finally:
            await stranger.close()
        await a.publish(sid, envelope(b"still listening"))
        await inbox.wait_for(lambda: len(inbox.got) == 3)
        assert inbox.data == [b"genuine", with_seq(relayed_data(1), 1), b"still listening"]
        assert other_inbox.got == []


# ---------------------------------------------------------------- Redis: outages


async def test_local_delivery_needs_no_redis() -> None:
    store, bus = await connect_redis(f"redis://127.0.0.1:{free_port()}/0", KEY)  # nothing listens there
    try:
        sid = new_session()
        inbox = Inbox()
        await asyncio.wait_for(bus.subscribe(sid, inbox), 3)
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(bus.publish(sid, envelope(b"local")), 3)
        assert inbox.data == [b"local"]
    finally:
        await bus.close()
        await store.close()


async def _until_delivered(sender: RedisBus, sid: str, inbox: Inbox, data: bytes, timeout: float = 15.0) -> None:
    """Publish every 100 ms until the other process has it (Redis may still be coming back)."""

    async def loop() -> None:
        while data not in inbox.data:
            with contextlib.suppress(StoreUnavailable):
                await sender.publish(sid, envelope(data))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(inbox.wait_for(lambda: data in inbox.data), 0.1)

    await asyncio.wait_for(loop(), timeout)


async def test_the_bus_comes_back_by_itself_after_redis_restarts(redis_server: RedisServer) -> None:  # noqa: F811
    redis_server.ensure_running()
    a, b = await redis_node(redis_server.url), await redis_node(redis_server.url)
    assert isinstance(a.bus, RedisBus) and isinstance(b.bus, RedisBus) and b.store is not None
    try:
        before, during = new_session(), new_session()
        inbox_before, inbox_during = Inbox(), Inbox()
        await asyncio.wait_for(b.bus.connected.wait(), 10)
        await b.bus.subscribe(before, inbox_before)
        await b.bus.hold_peer(before, "abcdefgh")
        await a.bus.publish(before, envelope(b"first"))
        await inbox_before.wait_for(lambda: inbox_before.data == [b"first"])

        redis_server.stop()
        try:
            with pytest.raises(StoreUnavailable):
                await asyncio.wait_for(a.bus.publish(before, envelope(b"lost")), 3)
            await asyncio.wait_for(b.bus.subscribe(during, inbox_during), 3)  # remembered, subscribed later
            assert await b.store.ping() is False
        finally:
            redis_server.start()

        # Ready again means receiving again: once B's store answers ping(), its pub/sub link is
        # back with both channels subscribed, so the very first message gets through.
        async def until_ready() -> None:
            while not await b.store.ping():
                await asyncio.sleep(0.05)

        await asyncio.wait_for(until_ready(), 15)
        await asyncio.wait_for(a.bus.publish(before, envelope(b"after restart")), 10)
        await asyncio.wait_for(a.bus.publish(during, envelope(b"subscribed during the outage")), 10)
        await inbox_before.wait_for(lambda: inbox_before.data == [b"first", b"after restart"])
        await inbox_during.wait_for(lambda: inbox_during.data == [b"subscribed during the outage"])
        assert b.bus.reconnects >= 1
        # The peer's own channel is subscribed again too: its relays do not cross the session's.
        assert a.store is not None
        async with spying(redis_server, before) as spy:
            key = f"s:{{{before}}}:box:abcdefgh"
            await asyncio.wait_for(
                a.bus.publish_relayed(before, envelope(relayed_data(1), "abcdefgh"), a.store, key, 8, 60), 10
            )
            await inbox_before.wait_for(lambda: len(inbox_before.got) == 3)
            assert inbox_before.got[2].seq == 1
            assert await spy.nothing_more()
    finally:
        await a.close()
        await b.close()


async def test_a_silent_redis_connection_is_replaced(redis_server: RedisServer) -> None:  # noqa: F811
    """Redis stops answering (paused) without closing the socket: the keepalive notices and reconnects."""
    redis_server.ensure_running()
    a = await redis_node(redis_server.url)
    client = redis_client(redis_server.url)
    quick = RedisBus(client, Sealer(KEY), keepalive_s=0.3)
    quick.start()
    b = Node(quick, RedisStore(client, Sealer(KEY)))
    try:
        sid = new_session()
        inbox = Inbox()
        await quick.subscribe(sid, inbox)
        await _until_delivered(a.bus, sid, inbox, b"before")
        with redis_server.client() as raw:
            raw.execute_command("CLIENT", "PAUSE", "2500", "ALL")
        await asyncio.sleep(2.6)
        await _until_delivered(a.bus, sid, inbox, b"after the pause")
        assert quick.reconnects >= 1
    finally:
        await a.close()
        await b.close()


async def test_publish_after_close_fails_instead_of_waiting(redis_server: RedisServer) -> None:  # noqa: F811
    redis_server.ensure_running()
    node = await redis_node(redis_server.url)
    await node.close()
    with pytest.raises(StoreUnavailable):
        await asyncio.wait_for(node.bus.publish(new_session(), envelope(b"late")), 3)


# ---------------------------------------------------------------- the Redis publisher


async def test_commands_are_pipelined_without_waiting_for_earlier_replies(
    one: tuple[RedisBus, RedisStore],
    redis_server: RedisServer,  # noqa: F811
) -> None:
    bus, _ = one
    await bus._send(resp_command(b"PING"))  # the publisher's connection is open
    with redis_server.client() as raw:
        # Redis holds every reply meanwhile (for less than the deadline of a reply, TIMEOUT_S).
        raw.execute_command("CLIENT", "PAUSE", str(int(TIMEOUT_S * 700)), "ALL")
    first = [asyncio.ensure_future(bus._send(resp_command(b"ECHO", b"a%d" % i))) for i in range(5)]
    await asyncio.sleep(0.05)
    second = [asyncio.ensure_future(bus._send(resp_command(b"ECHO", b"b%d" % i))) for i in range(5)]
    await asyncio.sleep(0.05)
    assert bus._pipe is not None and len(bus._pipe.waiting) == 10  # both batches written, none answered
    assert not any(f.done() for f in first + second)
    replies = await asyncio.wait_for(asyncio.gather(*first, *second), 5)
    assert replies == [b"a%d" % i for i in range(5)] + [b"b%d" % i for i in range(5)]


async def test_an_error_reply_fails_its_own_command_only(
    one: tuple[RedisBus, RedisStore],
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,  # noqa: F811
) -> None:
    caplog.set_level(logging.WARNING, logger="broker")
    bus, _ = one
    sent = [
        asyncio.ensure_future(bus.call(b"ECHO", b"before")),
        asyncio.ensure_future(bus.call(b"NO-SUCH-COMMAND", b"secret argument")),
        asyncio.ensure_future(bus.call(b"ECHO", b"after")),
    ]
    results = await asyncio.wait_for(asyncio.gather(*sent, return_exceptions=True), 5)
    assert results[0] == b"before" and results[2] == b"after"
    # Refused: a StoreUnavailable for the caller, with nothing of the reply but its code.
    assert isinstance(results[1], CommandRefused) and isinstance(results[1], StoreUnavailable)
    assert results[1].code == "ERR" and "secret" not in str(results[1])
    assert "event=bus_command_refused reply=ERR" in caplog.text and "secret" not in caplog.text
    assert await bus.call(b"ECHO", b"still") == b"still"  # the same pipe goes on


async def test_commands_waiting_when_the_connection_drops_fail_and_the_next_one_reconnects(
    one: tuple[RedisBus, RedisStore],
    redis_server: RedisServer,  # noqa: F811
) -> None:
    bus, _ = one
    await bus._send(resp_command(b"PING"))
    old = bus._pipe
    assert old is not None
    held = asyncio.ensure_future(bus._send(resp_command(b"BLPOP", b"nothing-ever-comes", b"0")))
    await asyncio.sleep(0.05)
    with redis_server.client() as raw:
        raw.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    with pytest.raises(StoreUnavailable, match="closed"):
        await asyncio.wait_for(held, 5)  # never left hanging
    assert old.broken
    assert await asyncio.wait_for(bus._send(resp_command(b"ECHO", b"again")), 5) == b"again"
    assert bus._pipe is not old


async def test_a_command_redis_does_not_answer_in_time_fails(
    one: tuple[RedisBus, RedisStore],
    redis_server: RedisServer,  # noqa: F811
) -> None:
    bus, _ = one
    await bus._send(resp_command(b"PING"))
    with redis_server.client() as raw:
        raw.execute_command("CLIENT", "PAUSE", "2500", "ALL")
    with pytest.raises(StoreUnavailable, match="TimeoutError"):
        await asyncio.wait_for(bus._send(resp_command(b"ECHO", b"held")), 5)
    await asyncio.sleep(2.6)  # the pause is over
    assert await asyncio.wait_for(bus._send(resp_command(b"ECHO", b"again")), 5) == b"again"


async def test_a_command_held_behind_answered_ones_still_fails_in_time(
    one: tuple[RedisBus, RedisStore],
    redis_server: RedisServer,  # noqa: F811
) -> None:
    """The deadline counts from each command's own write, also when the reader starts waiting
    with commands already on their way (it once took that moment for a delay, and never fired)."""
    bus, _ = one
    key = f"s:{{{new_session()}}}:held"
    await bus._send(resp_command(b"PING"))
    with redis_server.client() as raw:
        raw.execute_command("CLIENT", "PAUSE", "2500", "WRITE")  # reads are answered, writes held
    read = asyncio.ensure_future(bus._send(resp_command(b"GET", key)))
    write = asyncio.ensure_future(bus._send(resp_command(b"SET", key, b"x")))
    assert await asyncio.wait_for(read, 5) is None  # answered: the reader now waits for the write alone
    with pytest.raises(StoreUnavailable, match="TimeoutError"):
        await asyncio.wait_for(write, 2)
    await asyncio.sleep(2.6)  # the pause is over
    assert await asyncio.wait_for(bus._send(resp_command(b"ECHO", b"again")), 5) == b"again"


async def test_relays_go_on_after_redis_forgets_the_relay_script(
    one: tuple[RedisBus, RedisStore],
    redis_server: RedisServer,  # noqa: F811
) -> None:
    """The relay command names its script by digest; a flushed script cache costs one refused relay."""
    bus, store = one
    sid, key = new_session(), f"s:{{{new_session()}}}:box:abcdefgh"

    def relay(n: int) -> Awaitable[int]:
        return bus.publish_relayed(sid, envelope(relayed_data(n), "abcdefgh"), store, key, 8, 60)

    assert await relay(1) == 1
    with redis_server.client() as raw:
        raw.execute_command("SCRIPT", "FLUSH")
    with pytest.raises(StoreUnavailable):
        await asyncio.wait_for(relay(2), 5)
    assert await asyncio.wait_for(relay(3), 5) == 2  # the refused one was not logged
    assert await store.read_since(key, 0) == [(1, relayed_data(1)), (2, relayed_data(3))]
