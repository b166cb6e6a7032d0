"""The store contract, run against MemoryStore and RedisStore (a real redis-server), plus what only Redis needs.

Every contract test runs on both stores: the embedded one with a clock the
test moves, the Redis one in real time with short TTLs. ``twin`` is a second
handle on the same data: for Redis a separate client, as another broker
process would have; for memory the same store.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from broker.store.backends import connect_redis
from broker.store.base import Store, StoreUnavailable, session_prefix
from broker.store.memory import MemoryStore
from broker.store.redis_bus import RedisBus
from broker.store.redis_store import RedisStore, redis_client
from broker.store.sealing import Sealer, StoreCorrupt
from tests.redis_server import RedisServer, free_port, redis_server  # noqa: F401 - the fixture

KEY = bytes(range(32))


@dataclass
class FakeClock:
    now: float = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Backend:
    name: str
    store: Store
    twin: Store
    clock: FakeClock | None = None
    extra: list[Store] = field(default_factory=list)

    async def wait(self, seconds: float) -> None:
        """Let time pass: move the fake clock, or really wait for Redis's TTLs."""
        if self.clock is not None:
            self.clock.now += seconds
        else:
            await asyncio.sleep(seconds)


def redis_store(url: str, key: bytes = KEY) -> RedisStore:
    return RedisStore(redis_client(url), Sealer(key))


@pytest.fixture(params=["memory", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    if request.param == "memory":
        clock = FakeClock()
        store = MemoryStore(clock=clock)
        yield Backend("memory", store, store, clock)
        await store.close()
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    server.ensure_running()
    # The twin reads as a broker process does: through its bus's pipelined connection.
    one, two = redis_store(server.url), redis_store(server.url)
    bus = RedisBus(two.redis, two._sealer)
    bus.start()
    two.read_through(bus)
    yield Backend("redis", one, two)
    await bus.close()
    await one.close()
    await two.close()


@pytest.fixture
def prefix() -> str:
    """A fresh session prefix per test, so tests never see each other's keys."""
    return session_prefix(secrets.token_hex(6))


def counter_step(raw: bytes | None) -> tuple[bytes, int]:
    value = int(raw or b"0") + 1
    return str(value).encode(), value


# ---------------------------------------------------------------- get / put / TTL


async def test_put_then_get_returns_the_value(backend: Backend, prefix: str) -> None:
    assert await backend.store.get(prefix) is None
    await backend.store.put(prefix, b"\x00binary\xff value", 30)
    assert await backend.twin.get(prefix) == b"\x00binary\xff value"
    await backend.store.put(prefix, b"second", 30)
    assert await backend.twin.get(prefix) == b"second"


async def test_a_broker_process_reads_through_its_bus_on_no_connection_of_its_own(
    redis_server: RedisServer,
    prefix: str,  # noqa: F811
) -> None:
    """Reads share the bus's pipelined connection (record reads come every quarter second per
    relaying session): fifty at once open no pooled connection, as redis-py would for each."""
    redis_server.ensure_running()
    store, bus = await connect_redis(redis_server.url, KEY)
    try:
        await store.put(prefix, b"value", 30)
        assert await bus.call(b"PING") == b"PONG"  # the bus's connection is open
        with redis_server.client() as raw:
            before = raw.info("stats")["total_connections_received"]
            assert await asyncio.gather(*(store.get(prefix) for _ in range(50))) == [b"value"] * 50
            assert raw.info("stats")["total_connections_received"] == before
    finally:
        await bus.close()
        await store.close()


async def test_values_expire_after_their_ttl(backend: Backend, prefix: str) -> None:
    await backend.store.put(prefix + ":short", b"v", 0.3)
    await backend.store.put(prefix + ":long", b"v", 30)
    assert await backend.store.get(prefix + ":short") == b"v"
    await backend.wait(0.6)
    assert await backend.store.get(prefix + ":short") is None
    assert await backend.store.keys(prefix) == [prefix + ":long"]


# ---------------------------------------------------------------- update


async def test_update_creates_changes_and_deletes(backend: Backend, prefix: str) -> None:
    seen: list[bytes | None] = []

    def step(new: bytes | None, result: str):  # noqa: ANN202 - a Mutation
        def mutate(raw: bytes | None) -> tuple[bytes | None, str]:
            seen.append(raw)
            return new, result

        return mutate

    assert await backend.store.update(prefix, step(b"one", "created"), 30) == "created"
    assert await backend.store.update(prefix, step(b"two", "changed"), 30) == "changed"
    assert await backend.twin.get(prefix) == b"two"
    assert await backend.store.update(prefix, step(None, "deleted"), 30) == "deleted"
    assert seen == [None, b"one", b"two"]
    assert await backend.twin.get(prefix) is None
    assert await backend.store.keys(prefix) == []


async def test_update_resets_the_ttl(backend: Backend, prefix: str) -> None:
    await backend.store.put(prefix, b"v", 0.5)
    await backend.store.update(prefix, lambda raw: (raw, None), 30)
    await backend.wait(0.8)
    assert await backend.store.get(prefix) == b"v"


async def test_update_is_atomic_under_50_concurrent_updaters(backend: Backend, prefix: str) -> None:
    """No update is lost and no two see the same value. On a loaded machine an update may be
    refused at the store's deadline (StoreUnavailable, a clear refusal: it may or may not have
    been applied); every other one is counted exactly once."""
    stores = [backend.store, backend.twin]
    outcomes = await asyncio.gather(
        *(stores[i % 2].update(prefix, counter_step, 30) for i in range(50)), return_exceptions=True
    )
    refused = [o for o in outcomes if isinstance(o, StoreUnavailable)]
    results = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(results) + len(refused) == 50, [o for o in outcomes if isinstance(o, BaseException)]
    assert len(refused) <= 10, f"{len(refused)} of 50 updates refused"
    final = int(await backend.store.get(prefix) or b"0")
    assert len(results) <= final <= 50
    assert len(set(results)) == len(results) and set(results) <= set(range(1, final + 1))  # distinct values
    if not refused:
        assert sorted(results) == list(range(1, 51))


async def test_update_abort_writes_nothing(backend: Backend, prefix: str) -> None:
    def refuse(raw: bytes | None) -> tuple[bytes | None, None]:
        raise PermissionError("refused by the state machine")

    with pytest.raises(PermissionError):
        await backend.store.update(prefix, refuse, 30)
    assert await backend.store.keys(prefix) == []

    await backend.store.put(prefix, b"keep", 30)
    with pytest.raises(PermissionError):
        await backend.store.update(prefix, refuse, 30)
    assert await backend.twin.get(prefix) == b"keep"
    # The store is still usable on the same key afterwards.
    assert await backend.store.update(prefix, lambda raw: (b"next", raw), 30) == b"keep"


# ---------------------------------------------------------------- delete_prefix / keys


async def test_delete_prefix_removes_exactly_the_prefix(backend: Backend, prefix: str) -> None:
    store = backend.store
    mine = [prefix, prefix + ":a", prefix + ":box:peer"]
    await store.put(mine[0], b"record", 30)
    await store.put(mine[1], b"other", 30)
    await store.append(mine[2], b"relayed", 8, 30)
    # Neighbours: a session id that extends this one, and a plain key.
    sibling = prefix[:-1] + "0}"
    await store.put(sibling, b"not mine", 30)
    await store.append(sibling + ":box:peer", b"not mine", 8, 30)

    assert sorted(await store.keys(prefix)) == sorted(mine)
    assert await store.delete_prefix(prefix) == 3
    assert await store.keys(prefix) == []
    assert await store.get(prefix) is None and await store.read_since(mine[2], 0) == []
    assert await store.get(sibling) == b"not mine"
    assert await store.read_since(sibling + ":box:peer", 0) == [(1, b"not mine")]
    assert await store.delete_prefix(prefix) == 0
    await store.delete_prefix(sibling)


async def test_delete_prefix_takes_glob_characters_literally(backend: Backend) -> None:
    uid = secrets.token_hex(4)
    prefix = f"g:[{uid}]*?"
    literal = prefix + "1"
    # Matches the prefix read as a glob pattern ([...] is one character, * anything), not as text.
    lookalike = f"g:{uid[0]}zz?"
    await backend.store.put(literal, b"1", 30)
    await backend.store.put(lookalike, b"2", 30)
    assert await backend.store.keys(prefix) == [literal]
    assert await backend.store.delete_prefix(prefix) == 1
    assert await backend.store.get(lookalike) == b"2"
    assert await backend.store.delete_prefix(f"g:{uid[0]}zz") == 1


# ---------------------------------------------------------------- capped logs


async def test_append_numbers_entries_and_read_since_returns_newer_ones(backend: Backend, prefix: str) -> None:
    log = prefix + ":box:p"
    seqs = [await backend.store.append(log, f"m{i}".encode(), 10, 30) for i in range(1, 6)]
    assert seqs == [1, 2, 3, 4, 5]
    assert await backend.twin.read_since(log, 0) == [(i, f"m{i}".encode()) for i in range(1, 6)]
    assert await backend.twin.read_since(log, 3) == [(4, b"m4"), (5, b"m5")]
    assert await backend.twin.read_since(log, 5) == []
    assert await backend.twin.read_since(prefix + ":box:nobody", 0) == []


async def test_get_finds_no_value_at_a_capped_logs_key(backend: Backend, prefix: str) -> None:
    log = prefix + ":box:p"
    await backend.store.append(log, b"entry", 10, 30)
    assert await backend.store.get(log) is None
    assert await backend.twin.get(log) is None
    assert await backend.twin.read_since(log, 0) == [(1, b"entry")]


async def test_append_keeps_only_the_newest_maxlen_entries(backend: Backend, prefix: str) -> None:
    log = prefix + ":box:p"
    for i in range(1, 8):
        await backend.store.append(log, f"m{i}".encode(), 3, 30)
    assert await backend.store.read_since(log, 0) == [(5, b"m5"), (6, b"m6"), (7, b"m7")]
    assert await backend.store.append(log, b"m8", 3, 30) == 8  # numbering continues past trimmed entries


async def test_concurrent_appends_get_distinct_increasing_numbers(backend: Backend, prefix: str) -> None:
    log = prefix + ":box:p"
    stores = [backend.store, backend.twin]
    seqs = await asyncio.gather(*(stores[i % 2].append(log, b"x%d" % i, 100, 30) for i in range(60)))
    assert sorted(seqs) == list(range(1, 61))
    entries = await backend.store.read_since(log, 0)
    assert [n for n, _ in entries] == list(range(1, 61))
    assert sorted(v for _, v in entries) == sorted(b"x%d" % i for i in range(60))


async def test_log_ttl_is_reset_by_each_append_and_then_expires(backend: Backend, prefix: str) -> None:
    log = prefix + ":box:p"
    await backend.store.append(log, b"a", 8, 1.0)
    await backend.wait(0.6)
    await backend.store.append(log, b"b", 8, 1.0)
    await backend.wait(0.6)
    assert await backend.store.read_since(log, 0) == [(1, b"a"), (2, b"b")]
    await backend.wait(0.8)
    assert await backend.store.read_since(log, 0) == []
    assert await backend.store.keys(prefix) == []
    assert await backend.store.append(log, b"c", 8, 30) == 1  # a new log starts again at 1


async def test_clear_log_drops_every_entry_and_keeps_the_numbering(backend: Backend, prefix: str) -> None:
    """A seat's resume buffer is emptied when its client leaves or its seat moves to another device;
    a page that remembers seq 3 must never take a later entry for one it has seen."""
    log = prefix + ":box:p"
    for i in range(1, 4):
        await backend.store.append(log, f"m{i}".encode(), 8, 1.0)
    await backend.store.clear_log(log)
    assert await backend.twin.read_since(log, 0) == []
    assert await backend.twin.append(log, b"after", 8, 30) == 4
    assert await backend.store.read_since(log, 0) == [(4, b"after")]
    await backend.twin.clear_log(log)
    await backend.store.clear_log(log)  # twice is the same as once
    assert await backend.store.read_since(log, 0) == []
    await backend.store.clear_log(prefix + ":box:nobody")  # nothing to clear: nothing made
    assert await backend.store.keys(prefix + ":box:nobody") == []


async def test_trim_log_drops_what_a_reader_has_and_keeps_the_numbering(backend: Backend, prefix: str) -> None:
    """A page acknowledges the relays it has read (``ping.ack``): the seat's resume buffer drops
    them, and a later entry still gets the next number, even when every entry went."""
    log = prefix + ":box:p"
    for i in range(1, 6):
        await backend.store.append(log, f"m{i}".encode(), 8, 30)
    await backend.store.trim_log(log, 2)
    assert await backend.twin.read_since(log, 0) == [(3, b"m3"), (4, b"m4"), (5, b"m5")]
    await backend.twin.trim_log(log, 1)  # an older acknowledgement changes nothing
    assert [n for n, _ in await backend.store.read_since(log, 0)] == [3, 4, 5]
    await backend.store.trim_log(log, 5)
    assert await backend.twin.read_since(log, 0) == []
    assert await backend.twin.append(log, b"after", 8, 30) == 6
    await backend.store.trim_log(log, 99)  # past the newest: all of it, the numbering kept
    assert await backend.store.append(log, b"later", 8, 30) == 7
    assert await backend.twin.read_since(log, 0) == [(7, b"later")]
    await backend.store.trim_log(prefix + ":box:nobody", 3)  # nothing to trim: nothing made
    assert await backend.store.keys(prefix + ":box:nobody") == []


async def test_clear_log_keeps_the_logs_expiry(backend: Backend, prefix: str) -> None:
    log = prefix + ":box:p"
    await backend.store.append(log, b"a", 8, 1.0)
    await backend.store.clear_log(log)
    await backend.wait(1.3)
    assert await backend.store.keys(prefix) == []
    assert await backend.store.append(log, b"b", 8, 30) == 1  # gone with its TTL: a new log


# ---------------------------------------------------------------- incr_window


async def test_incr_window_counts_per_key_within_the_window(backend: Backend, prefix: str) -> None:
    a, b = prefix + ":rate:a", prefix + ":rate:b"
    assert [await backend.store.incr_window(a, 0.5) for _ in range(3)] == [1, 2, 3]
    assert await backend.twin.incr_window(b, 0.5) == 1
    await backend.wait(0.8)
    assert await backend.store.incr_window(a, 0.5) == 1


async def test_incr_window_is_atomic_under_concurrency(backend: Backend, prefix: str) -> None:
    stores = [backend.store, backend.twin]
    counts = await asyncio.gather(*(stores[i % 2].incr_window(prefix + ":rate", 30) for i in range(50)))
    assert sorted(counts) == list(range(1, 51))


# ---------------------------------------------------------------- Redis only: sealing


@pytest.fixture
async def rstore(redis_server: RedisServer) -> AsyncIterator[RedisStore]:  # noqa: F811
    redis_server.ensure_running()
    store = redis_store(redis_server.url)
    yield store
    await store.close()


async def test_a_redis_dump_contains_none_of_the_values(
    redis_server: RedisServer,
    rstore: RedisStore,
    prefix: str,  # noqa: F811
) -> None:
    canaries = [f"CANARY-{name}-{secrets.token_hex(4)}" for name in ("put", "update", "log", "control")]
    await rstore.put(prefix, f"emergency contact {canaries[0]}".encode(), 30)
    await rstore.update(prefix + ":u", lambda raw: (f"details {canaries[1]}".encode(), None), 30)
    await rstore.append(prefix + ":box:p", f"a=candidate {canaries[2]}".encode(), 8, 30)
    with redis_server.client() as raw:  # a control value written in clear, to prove the dump sees values
        raw.set(prefix + ":control", f"clear {canaries[3]}", ex=30)
    dump = redis_server.dump()
    assert canaries[3].encode() in dump
    for canary in canaries[:3]:
        assert canary.encode() not in dump
    for name in (prefix, prefix + ":u", prefix + ":box:p"):
        assert name.encode() in dump  # the keys are there, only unreadable


async def test_a_value_moved_to_another_key_does_not_open(
    redis_server: RedisServer,
    rstore: RedisStore,
    prefix: str,  # noqa: F811
) -> None:
    await rstore.put(prefix + ":a", b"for a only", 30)
    await rstore.append(prefix + ":box:a", b"for a's log only", 8, 30)
    with redis_server.client() as raw:
        raw.set(prefix + ":b", raw.get(prefix + ":a"), ex=30)
        raw.rpush(prefix + ":box:b", raw.lindex(prefix + ":box:a", 0))
        tampered = bytearray(raw.get(prefix + ":a"))
        tampered[-1] ^= 1
        raw.set(prefix + ":c", bytes(tampered), ex=30)
    assert await rstore.get(prefix + ":a") == b"for a only"
    with pytest.raises(StoreCorrupt):
        await rstore.get(prefix + ":b")
    with pytest.raises(StoreCorrupt):
        await rstore.read_since(prefix + ":box:b", 0)
    with pytest.raises(StoreCorrupt):
        await rstore.get(prefix + ":c")
    other_key = redis_store(redis_server.url, key=os.urandom(32))
    try:
        with pytest.raises(StoreCorrupt):
            await other_key.get(prefix + ":a")  # sealed under another broker key
    finally:
        await other_key.close()


# ---------------------------------------------------------------- sealing

_EPOCH = slice(1, 1 + Sealer._EPOCH)
_NONCE = slice(1 + Sealer._EPOCH, Sealer._HEADER)


def test_no_two_values_are_ever_sealed_under_one_sub_key_and_nonce() -> None:
    """Nonces are numbered, not drawn: unique under a sealer's own sub-key (its epoch), which no
    other sealer shares, and a new epoch starts before the numbering could wrap the rotation bound."""
    key = secrets.token_bytes(32)
    one, other = Sealer(key), Sealer(key)
    blobs = [one.seal(b"aad", b"same value") for _ in range(1000)] + [
        other.seal(b"aad", b"same value") for _ in range(1000)
    ]
    assert len({(b[_EPOCH], b[_NONCE]) for b in blobs}) == 2000
    assert len({b[_EPOCH] for b in blobs}) == 2
    assert len(set(blobs)) == 2000  # the same value never seals to the same bytes
    assert {one.open(b"aad", b) for b in blobs} == {b"same value"}  # any sealer with the key opens any blob
    one._sealed = Sealer._ROTATE_AFTER - 1
    last, first = one.seal(b"aad", b"v"), one.seal(b"aad", b"v")
    assert last[_EPOCH] == blobs[0][_EPOCH] and first[_EPOCH] != last[_EPOCH]
    assert first[_NONCE] == bytes(Sealer._NONCE)  # the new epoch numbers from zero, under its own sub-key
    assert other.open(b"aad", last) == other.open(b"aad", first) == b"v"


def test_a_forked_child_seals_under_a_new_epoch() -> None:
    """A child copies its parent's sealer, numbering included: it must not reuse its nonces."""
    sealer = Sealer(secrets.token_bytes(32))
    parent = sealer.seal(b"aad", b"v")
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what it sealed, then leave without running the parent's cleanup
        try:
            os.write(writer, sealer.seal(b"aad", b"v"))
        finally:
            os._exit(0)
    os.close(writer)
    try:
        child = os.read(reader, 4096)
    finally:
        os.close(reader)
        os.waitpid(pid, 0)
    assert child[_EPOCH] != parent[_EPOCH]
    assert sealer.open(b"aad", child) == b"v"
    assert sealer.seal(b"aad", b"v")[_EPOCH] == parent[_EPOCH]  # the parent goes on as before


# ---------------------------------------------------------------- Redis only: unavailability


async def _assert_every_call_unavailable(store: RedisStore) -> None:
    """Each call raises StoreUnavailable; the bound only tells a hang from an answer."""
    calls = [
        store.get("k"),
        store.put("k", b"v", 5),
        store.update("k", counter_step, 5),
        store.delete_prefix("k"),
        store.keys("k"),
        store.incr_window("k:rate", 5),
        store.append("k:log", b"v", 5, 5),
        store.read_since("k:log", 0),
    ]
    for call in calls:
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(call, 3.0)
    assert await asyncio.wait_for(store.ping(), 3.0) is False


async def test_unreachable_redis_is_unavailable_not_a_hang() -> None:
    store = redis_store(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    try:
        await _assert_every_call_unavailable(store)
    finally:
        await store.close()


async def test_silent_redis_is_unavailable_not_a_hang() -> None:
    """A server that accepts connections and never answers (a hung Redis): socket timeouts apply."""
    held: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        with contextlib.suppress(Exception):
            while await reader.read(65536):
                pass

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = redis_store(f"redis://127.0.0.1:{port}/0")
    try:
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(store.get("k"), 5.0)
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(store.update("k", counter_step, 5), 5.0)
        assert await asyncio.wait_for(store.ping(), 5.0) is False
    finally:
        await store.close()
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_store_works_again_after_redis_restarts(
    redis_server: RedisServer,
    rstore: RedisStore,
    prefix: str,  # noqa: F811
) -> None:
    await rstore.put(prefix, b"before", 30)
    # Several idle pooled connections, all of which the restart will break.
    assert await asyncio.gather(*(rstore.get(prefix) for _ in range(8))) == [b"before"] * 8
    redis_server.stop()
    try:
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(rstore.get(prefix), 3.0)
        assert await rstore.ping() is False
    finally:
        redis_server.start()
    # The same store object, nothing done by hand: every call succeeds at once, none trips
    # over a connection that died while it sat in the pool.
    assert await asyncio.gather(*(rstore.get(prefix) for _ in range(8))) == [None] * 8  # no persistence
    assert await rstore.ping() is True
    await rstore.put(prefix, b"after", 30)
    assert await rstore.get(prefix) == b"after"
    assert await rstore.update(prefix, counter_step_from_text, 30) == "after+1"


def counter_step_from_text(raw: bytes | None) -> tuple[bytes, str]:
    value = (raw or b"").decode() + "+1"
    return value.encode(), value


async def test_update_retries_when_another_process_wrote_in_between(
    redis_server: RedisServer,
    rstore: RedisStore,
    prefix: str,  # noqa: F811
) -> None:
    await rstore.put(prefix, b"10", 30)
    with redis_server.client() as raw:
        sealed_ten = raw.get(prefix)
    await rstore.put(prefix, b"0", 30)
    calls: list[bytes | None] = []

    def mutate(current: bytes | None) -> tuple[bytes, int]:
        calls.append(current)
        if len(calls) == 1:
            # Another process writes between this update's GET and its EXEC.
            with redis_server.client() as raw:
                raw.set(prefix, sealed_ten, ex=30)
        return counter_step(current)

    assert await rstore.update(prefix, mutate, 30) == 11
    assert calls == [b"0", b"10"]  # the first attempt was thrown away, the second built on the other write
    assert await rstore.get(prefix) == b"11"


# ---------------------------------------------------------------- Redis only: cancellation safety


async def test_cancelled_calls_never_hand_their_reply_to_another_caller(rstore: RedisStore, prefix: str) -> None:
    """CVE-2023-28858/9 class: cancel calls mid-flight, then every later reply must be its own."""
    n = 120
    keys = [f"{prefix}:k{i}" for i in range(n)]
    for i, key in enumerate(keys):
        await rstore.put(key, f"value-{i}".encode(), 60)
    await rstore.append(prefix + ":box:p", b"entry-1", 8, 60)
    rng = random.Random(2023_28858)

    async def checked_get(i: int) -> None:
        assert await rstore.get(keys[i]) == f"value-{i}".encode()

    async def checked_update(i: int) -> None:
        assert await rstore.update(keys[i], lambda raw: (raw, raw), 60) == f"value-{i}".encode()

    async def checked_log() -> None:
        assert await rstore.read_since(prefix + ":box:p", 0) == [(1, b"entry-1")]

    cancelled = answered = refused = 0
    for _ in range(25):
        tasks = []
        for i in range(n):
            kind = rng.random()
            coro = checked_get(i) if kind < 0.7 else checked_update(i) if kind < 0.9 else checked_log()
            tasks.append(asyncio.ensure_future(coro))
        victims = rng.sample(tasks, n // 2)
        for victim in victims:
            for _ in range(rng.randrange(0, 12)):  # land the cancel at a random point of the exchange
                await asyncio.sleep(0)
            victim.cancel()
        if rng.random() < 0.5:
            await asyncio.sleep(rng.uniform(0, 0.003))
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, asyncio.CancelledError):
                cancelled += 1
            elif isinstance(result, StoreUnavailable):
                # A clear refusal, never a wrong reply: on a loaded machine a call may wait past
                # TIMEOUT_S for one of the 64 pooled connections (a cancelled call's is reopened).
                refused += 1
            elif result is None:
                answered += 1
            else:
                raise result  # a wrong reply (AssertionError or StoreCorrupt) or an error
    assert cancelled > 0
    assert answered > 10 * refused, (answered, refused)
    # Afterwards every connection of the pool answers its own request.
    await asyncio.gather(*(checked_get(i) for i in range(n)), *(checked_update(i) for i in range(0, n, 7)))
    for i in rng.sample(range(n), 30):
        await checked_get(i)
