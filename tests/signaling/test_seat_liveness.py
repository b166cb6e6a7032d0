"""Dead processes and dead peers free their seats (issue 26, item 3).

Before: a broker killed while holding a peer left that seat "connected" in the session for
good (0 of 7 runs told the therapist); a reader capped at the send-queue limit kept its seat
while the broker waited, without a deadline, to write its close frame; a silent peer was
found after up to 1.5 heartbeats (29.7 s at the default 20 s), aiohttp's timers above 5 s
being rounded up to whole seconds besides.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import ClientSession

from broker.config import Config, Keys
from broker.crypto.link_key import new_link_key
from broker.signaling import session as sm
from broker.signaling.connections import BEAT_TICKS, PING_SLICE, PING_SPACING_S, Connections, Limits
from broker.signaling.hub import Hub
from broker.signaling.liveness import NodeLiveness
from broker.signaling.protocol import Peers, WaitingRoom
from broker.signaling.session_records import SessionRecords
from broker.signaling.tokens import TokenCodec, new_connection_id, new_node_id, node_of
from broker.store.backends import connect_redis
from broker.store.memory import MemoryStore
from tests.conftest import RunningBroker, client_link_key, free_port, start_broker, start_broker_pair
from tests.http.test_ws_hardening import join_raw, origin, small_receive_buffer, ws_url
from tests.redis_server import RedisServer, redis_server  # noqa: F401 - the fixture
from tests.store.test_redis_cluster import Links, admitted_call, practice_policy

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- a silent peer


class Socket:
    """The hub's side of a socket that counts the pings it is asked to write and knows if it was cut off."""

    def __init__(self) -> None:
        self.pings = 0
        self.aborted = False

    async def send_text(self, data: bytes) -> None:
        pass

    async def close(self, code: int, reason: str) -> None:
        pass

    async def ping(self) -> None:
        self.pings += 1

    def abort(self) -> None:
        self.aborted = True


@pytest.mark.parametrize("phase", [0.0, 0.001, 0.5, 1.3, 2.499])
async def test_a_silent_peer_is_cut_off_well_within_one_and_a_half_heartbeats_at_the_default(phase: float) -> None:
    """At the default heartbeat (20 s), on the hub's clock: a peer that answers nothing is cut off
    between 1 and 1.125 heartbeats after it was last heard (whatever the tick's phase), while a
    peer that answers the pings it is sent stays. ``phase``: where its last frame fell between two ticks."""
    limits = Limits()
    assert limits.heartbeat_s == Config().heartbeat_s == 20.0
    now = [0.0]
    tasks: list[asyncio.Future[Any]] = []
    connections = Connections(limits, lambda c: tasks.append(asyncio.ensure_future(c)), "node", lambda: now[0])
    silent_socket, live_socket = Socket(), Socket()
    silent, live = connections.open(silent_socket), connections.open(live_socket)
    for conn in (silent, live):
        connections.authenticated(conn)
    tick = limits.heartbeat_s / BEAT_TICKS
    cut_off_at = None
    answered = 0
    t = tick - phase  # the ticks fall at t, t + tick, ...; the last frame of both came at 0
    while t < 10 * limits.heartbeat_s:
        now[0] = t
        connections.beat()
        await asyncio.gather(*tasks)
        tasks.clear()
        if live_socket.pings > answered:  # the live peer's pong comes back at once
            answered = live_socket.pings
            connections.heard_from(live)
        if silent_socket.aborted and cut_off_at is None:
            cut_off_at = t
        t += tick
    assert cut_off_at is not None and silent.closed
    assert silent_socket.pings >= 1  # it was asked before it was cut off
    assert limits.heartbeat_s <= cut_off_at <= 1.125 * limits.heartbeat_s + 1e-9 < 1.5 * limits.heartbeat_s
    assert not live_socket.aborted and not live.closed and answered >= 10


async def test_a_ticks_many_pings_go_out_a_slice_at_a_time_and_all_within_the_tick() -> None:
    """Thousands of quiet connections are pinged in slices (issue 32): a task each, all in one go,
    held the event loop for tens of milliseconds. Every one is pinged well before the next tick."""
    limits = Limits()
    now = [0.0]
    tasks: list[asyncio.Future[Any]] = []
    connections = Connections(limits, lambda c: tasks.append(asyncio.ensure_future(c)), "node", lambda: now[0])
    sockets = [Socket() for _ in range(3 * PING_SLICE + 10)]
    for sock in sockets:
        connections.authenticated(connections.open(sock))
    now[0] = limits.heartbeat_s * 0.6  # heard from half a heartbeat ago and more: each is due a ping
    connections.beat()
    await asyncio.gather(*tasks)
    assert sum(sock.pings for sock in sockets) == PING_SLICE, "the first slice at once"
    await asyncio.sleep(4 * PING_SPACING_S + 0.5)
    await asyncio.gather(*tasks)
    assert [sock.pings for sock in sockets] == [1] * len(sockets)
    assert 4 * PING_SPACING_S + 0.5 < limits.heartbeat_s / BEAT_TICKS


async def waiting_room_until(ws: aiohttp.ClientWebSocketResponse, done: Callable[[dict[str, Any]], bool]) -> None:
    """Read the therapist's socket (answering the broker's pings meanwhile) until a waiting room view matches."""
    while True:
        message = await ws.receive_json(timeout=30)
        if message["type"] == "waiting_room" and done(message):
            return


async def test_a_real_silent_peer_is_cut_off_and_the_therapist_told_within_1_25_heartbeats(tmp_path: Path) -> None:
    """On a real broker: a client page that stops answering (a machine gone to sleep) loses its seat
    and the therapist sees it within 1.25 heartbeats of its last frame; the therapist, who sends
    nothing either but answers the pings, stays. aiohttp's own heartbeat took 1.5 heartbeats."""
    heartbeat = 4.0
    running = await start_broker(tmp_path, heartbeat_s=heartbeat)
    session, tokens = await running.hub.create_session(clients=1)
    try:
        async with ClientSession() as http:
            therapist = await http.ws_connect(ws_url(running), origin=origin(running))  # answers pings
            await join_raw(therapist, tokens[session.therapist().id])
            client = await http.ws_connect(ws_url(running), origin=origin(running), autoping=False)
            await join_raw(client, tokens[session.clients()[0].id])
            last_frame = time.monotonic()  # from here on the client sends nothing, pongs included
            await waiting_room_until(therapist, lambda m: m["seats"][0]["connected"])
            await waiting_room_until(therapist, lambda m: not m["seats"][0]["connected"])
            told = time.monotonic() - last_frame
            assert told <= 1.25 * heartbeat, told
            assert (await running.hub.get_session(session.id)).clients()[0].conn is None
            assert not therapist.closed
            await therapist.send_json({"type": "ping", "n": 7})
            while (message := await therapist.receive_json(timeout=5))["type"] != "pong":
                assert message["type"] in ("waiting_room", "peers")
            assert message == {"type": "pong", "n": 7}
            await therapist.close()
            await client.close()
    finally:
        await running.stop()


# ---------------------------------------------------------------- a reader that stopped reading


async def test_a_slow_reader_past_the_cap_frees_its_seat_within_a_second(tmp_path: Path) -> None:
    """A therapist page that stops reading is closed at the send-queue cap, and its seat is free
    within 1 s of that: its close frame cannot be written, so the connection is cut off."""
    # The largest session, all peer to peer: this is about the broker's queues, not the media.
    running = await start_broker(tmp_path, send_queue_limit=8, mesh_max_participants=16)
    hub = running.hub
    session, tokens = await hub.create_session(clients=15)
    clients = [tokens[seat.id] for seat in session.clients()]
    connector = aiohttp.TCPConnector(socket_factory=small_receive_buffer)
    try:
        async with ClientSession(connector=connector) as slow_http, ClientSession() as http:
            before = set(hub.connections.by_id)
            slow = await slow_http.ws_connect(ws_url(running), origin=origin(running), autoping=False)
            [slow_id] = set(hub.connections.by_id) - before
            slow_conn = hub.connections.by_id[slow_id]
            await join_raw(slow, tokens[session.therapist().id])
            capped: list[float] = []

            async def watch() -> None:
                while not slow_conn.closed:
                    await asyncio.sleep(0.005)
                capped.append(time.monotonic())

            watcher = asyncio.ensure_future(watch())
            cycles = 0
            while not capped:  # each client that comes and goes sends the therapist a waiting-room view
                async with http.ws_connect(ws_url(running), origin=origin(running)) as client:
                    await join_raw(client, clients[cycles % len(clients)])
                    assert (await client.receive_json(timeout=10))["type"] == "welcome"
                    assert (await client.receive_json(timeout=10))["type"] == "joined"
                cycles += 1
                assert cycles < 5000, "the broker kept queueing for a reader that never reads"
            await watcher
            while (await hub.get_session(session.id)).therapist().conn is not None:  # type: ignore[union-attr]
                assert time.monotonic() - capped[0] < 1.0, "the slow reader's seat is still taken"
                await asyncio.sleep(0.01)
            assert slow_id not in hub.connections.by_id
            await asyncio.wait_for(slow.close(), 5)
    finally:
        await running.stop()


# ---------------------------------------------------------------- a dead broker process


def test_a_seat_taken_back_through_another_process_is_not_released() -> None:
    """The release applies to the record as it is: a peer that came back through a live process
    meanwhile (its resume won the race) keeps its seat, and only the dead node's places go."""
    dead, live = new_node_id(), new_node_id()
    session = sm.new_session("s", now=0, starts=0, duration_s=3600, clients=2)
    therapist, first, second = session.seats
    therapist.conn = new_connection_id(live)
    first.conn = new_connection_id(dead)
    second.conn = new_connection_id(dead)
    assert sm.held_on(session) == {dead, live}
    second.conn = back = new_connection_id(live)  # the second client came back through the live node
    assert sm.release_nodes(session, {dead}) == 1
    assert first.conn is None and second.conn == back and therapist.conn is not None
    assert node_of(back) == live and node_of("no-node") is None
    assert sm.release_nodes(session, {dead}) == 0


class BrokerProcess:
    """``python -m broker serve`` on Redis, killed with SIGKILL by the test."""

    def __init__(self, name: str, data: Path, env: dict[str, str]) -> None:
        data.mkdir(mode=0o700)
        self.name, self.data, self.env = name, data, env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        log = (data / "broker.log").open("wb")
        argv = [sys.executable, "-m", "broker", "serve", "--port", str(self.port), "--data-dir", str(data)]
        self.process = subprocess.Popen(argv, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    async def ready(self) -> None:
        async with aiohttp.ClientSession() as http:
            for _ in range(600):
                assert self.process.poll() is None, (self.data / "broker.log").read_text()
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with http.get(self.url + "/readyz") as response:
                        if response.status == 200:
                            return
                await asyncio.sleep(0.05)
        raise AssertionError(f"broker {self.name} did not become ready")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@pytest.mark.redis
async def test_a_broker_killed_while_holding_a_peer_frees_its_seat_within_two_heartbeats(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    """Two broker processes on Redis, the therapist on one and the client on the other, in a call.
    The client's broker is killed (SIGKILL) and the client never comes back: the therapist is
    told (``connected`` false in ``peers`` and ``waiting_room``) within two heartbeats."""
    redis_server.ensure_running()
    redis_server.empty_database()
    heartbeat = 2.0
    secret = os.urandom(32)
    (tmp_path / "server.secret").write_text(secret.hex())
    (tmp_path / "server.secret").chmod(0o600)
    env = {
        **os.environ,
        "BROKER_REDIS_URL": redis_server.url,
        "BROKER_SECRET_FILE": str(tmp_path / "server.secret"),
        "BROKER_POLICY_FILE": str(practice_policy(tmp_path / "policy.toml")),
        "BROKER_HEARTBEAT_S": str(heartbeat),
        "BROKER_LOG_LEVEL": "info",
        "PYTHONPATH": str(REPO),
    }
    a, b = BrokerProcess("a", tmp_path / "a", env), BrokerProcess("b", tmp_path / "b", env)
    keys = Keys(secret)
    store, bus = await connect_redis(redis_server.url, keys.store)
    therapist = client = None
    try:
        await asyncio.gather(a.ready(), b.ready())
        session, tokens = await Hub(store, bus, TokenCodec(keys.token)).create_session(clients=1)
        key = new_link_key()
        therapist_seat, client_seat = session.therapist(), session.clients()[0]
        links = Links(
            session=session.id,
            therapist=f"{a.url}/t/{tokens[therapist_seat.id]}#{key}",
            client=f"{b.url}/j/{tokens[client_seat.id]}#{client_link_key(key, session.id, client_seat.id)}",
            therapist_token=tokens[therapist_seat.id],
            client_token=tokens[client_seat.id],
            link_key=key,
        )
        therapist, client = await admitted_call(links)
        mark = len(therapist.received)
        b.process.kill()
        killed = time.monotonic()
        b.process.wait(10)
        lost: Callable[[Any], bool] = lambda m: not m.peers[0].connected  # noqa: E731
        await therapist.expect(Peers, where=lost, since=mark, timeout=4 * heartbeat)
        told = time.monotonic() - killed
        room = await therapist.expect(WaitingRoom, where=lambda m: not m.seats[0].connected, since=mark, timeout=1)
        assert room.seats[0].peer == client.peer_id
        assert told <= 2 * heartbeat, f"told after {told:.2f} s, heartbeat {heartbeat} s"
        assert "event=seats_released_dead_node" in (a.data / "broker.log").read_text()
    finally:
        for peer in (client, therapist):
            if peer is not None:
                with contextlib.suppress(Exception):
                    await peer.close()
        a.stop()
        b.stop()
        await bus.close()
        await store.close()


@pytest.mark.redis
async def test_nobody_is_declared_dead_while_redis_is_down_for_everyone(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    """Redis stops for several marks' TTL and comes back (with its data, but every mark expired):
    no process takes another for dead meanwhile or after, so no seat is released and nobody is
    told to reconnect; the therapist on one broker keeps seeing the client on the other connected."""
    redis_server.ensure_running()
    redis_server.empty_database()
    heartbeat = 1.0
    first, second = await start_broker_pair(tmp_path, redis_server.url, heartbeat_s=heartbeat)
    try:
        session, tokens = await first.hub.create_session(clients=1)
        async with ClientSession() as http:
            therapist = await http.ws_connect(ws_url(first), origin=origin(first))
            await join_raw(therapist, tokens[session.therapist().id])
            client = await http.ws_connect(ws_url(second), origin=origin(second))
            await join_raw(client, tokens[session.clients()[0].id])
            await waiting_room_until(therapist, lambda m: m["seats"][0]["connected"])
            views: list[dict[str, Any]] = []

            async def read(ws: aiohttp.ClientWebSocketResponse, into: list[dict[str, Any]]) -> None:
                async for msg in ws:  # answers the brokers' pings meanwhile
                    if msg.type is aiohttp.WSMsgType.TEXT:
                        into.append(msg.json())

            client_saw: list[dict[str, Any]] = []
            readers = [asyncio.ensure_future(read(therapist, views)), asyncio.ensure_future(read(client, client_saw))]
            redis_server.stop(save=True)
            await asyncio.sleep(3 * heartbeat)
            redis_server.start()
            await asyncio.sleep(4 * heartbeat)
            await wait_for_mark(second, heartbeat)
            assert all(m["seats"][0]["connected"] for m in views if m["type"] == "waiting_room"), views
            assert not any(m["type"] == "reconnect" for m in client_saw), client_saw
            assert (await first.hub.get_session(session.id)).clients()[0].conn is not None  # type: ignore[union-attr]
            assert not therapist.closed and not client.closed
            for reader in readers:
                reader.cancel()
            await therapist.close()
            await client.close()
    finally:
        await first.stop()
        await second.stop()
        redis_server.ensure_running()


async def wait_for_mark(running: RunningBroker, heartbeat: float) -> None:
    """The broker's mark is back in the store (it writes it again once Redis answers)."""
    check: Callable[[], Awaitable[bytes | None]] = lambda: running.broker.store.get(  # noqa: E731
        "node:" + running.hub.node
    )
    for _ in range(int(10 * heartbeat / 0.05)):
        with contextlib.suppress(Exception):
            if await check() is not None:
                return
        await asyncio.sleep(0.05)
    raise AssertionError("the broker's mark did not come back")


class CountingStore(MemoryStore):
    """The embedded store, counting the session records read from it."""

    def __init__(self) -> None:
        super().__init__()
        self.record_reads = 0

    async def get(self, key: str) -> bytes | None:
        if key.startswith("s:"):
            self.record_reads += 1
        return await super().get(key)


async def test_alone_an_earlier_runs_seat_is_released_and_a_clean_session_is_not_read_again() -> None:
    """On the embedded store the only other nodes a record can name are this process's earlier runs
    (a restart: the record came back from the session file). Their seats are released; a session
    that names no other node is read once and never again at later marks (a process holding
    thousands of sessions would otherwise read every one of them four times a heartbeat)."""

    def spawn(coro: Any) -> asyncio.Task[Any]:
        return asyncio.get_running_loop().create_task(coro)

    store = CountingStore()
    records = SessionRecords(store, time.time, spawn)
    node, earlier_run = new_node_id(), new_node_id()
    connections = Connections(Limits(), spawn, node)
    now = int(time.time())
    stale = sm.new_session("stale", now=now, starts=now, duration_s=3600, clients=1)
    stale.seats[0].conn, stale.seats[1].conn = new_connection_id(node), new_connection_id(earlier_run)
    clean = sm.new_session("clean", now=now, starts=now, duration_s=3600, clients=1)
    clean.seats[0].conn = new_connection_id(node)
    await records.save(stale)
    await records.save(clean)
    told: list[str] = []

    async def publish(session: sm.Session) -> None:
        told.append(session.id)

    liveness = NodeLiveness(
        store, records, connections, 1.0, sessions_here=lambda: ["stale", "clean"], publish_views=publish, alone=True
    )
    assert await liveness.release_dead() == 1
    after = await records.get("stale")
    assert after is not None and after.seats[1].conn is None and after.seats[0].conn is not None
    assert told == ["stale"]
    assert store.record_reads >= 2
    reads = store.record_reads
    assert await liveness.release_dead() == 0  # the released session is read once more, and found clean
    assert store.record_reads - reads <= 2
    reads = store.record_reads
    for _ in range(5):
        assert await liveness.release_dead() == 0
    assert store.record_reads == reads  # nothing read again: both are clean


async def test_on_redis_every_session_here_is_looked_at_each_mark() -> None:
    """The saving above is only for a process alone: with other processes, a session clean now can
    get a peer on another node at any time, so it is read at every mark."""

    def spawn(coro: Any) -> asyncio.Task[Any]:
        return asyncio.get_running_loop().create_task(coro)

    store = CountingStore()
    records = SessionRecords(store, time.time, spawn)
    node = new_node_id()
    now = int(time.time())
    clean = sm.new_session("clean", now=now, starts=now, duration_s=3600, clients=1)
    clean.seats[0].conn = new_connection_id(node)
    await records.save(clean)

    async def publish(session: sm.Session) -> None:
        pass

    liveness = NodeLiveness(
        store, records, Connections(Limits(), spawn, node), 1.0, sessions_here=lambda: ["clean"], publish_views=publish
    )
    for _ in range(3):
        await liveness.release_dead()
    assert store.record_reads == 3
