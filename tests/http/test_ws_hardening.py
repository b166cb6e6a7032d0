"""The signaling WebSocket against hostile or broken clients, on real brokers.

Origin tricks are refused before the upgrade; oversize frames, floods, silent connections and
readers that never read are each closed with their own code, while honest peers on the same
broker carry on. Brokers with special limits come from ``start_broker`` and are stopped here.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import ClientSession, WSMsgType

from broker.client.broker_client import BrokerClient
from broker.crypto.link_key import new_link_key
from broker.signaling.connections import CLOSE_AUTH_TIMEOUT, CLOSE_FLOOD, CLOSE_TOO_SLOW
from broker.signaling.protocol import MAX_MESSAGE_BYTES, PROTOCOL_VERSION, SeatState, Status, WaitingRoom
from tests.conftest import RunningBroker, client_link_key, read_until_broker_closes, start_broker
from tests.signaling.test_hub import masked_text_frames

pytestmark = pytest.mark.asyncio(loop_scope="session")

CLOSE_TOO_BIG = 1009


def ws_url(running: RunningBroker) -> str:
    return running.url.replace("http://", "ws://") + "/ws"


def origin(running: RunningBroker) -> str:
    return running.url


@pytest_asyncio.fixture(loop_scope="session")
async def http() -> AsyncIterator[ClientSession]:
    async with ClientSession() as session:
        yield session


async def refused_status(http: ClientSession, url: str, headers: dict[str, str]) -> int:
    try:
        ws = await http.ws_connect(url, headers=headers, autoping=False)
    except aiohttp.WSServerHandshakeError as exc:
        return exc.status
    await ws.close()
    return 101


def bad_origins(running: RunningBroker) -> list[str | None]:
    port = running.config.port
    good = f"http://127.0.0.1:{port}"
    return [
        None,  # no Origin header at all
        "",
        "null",
        "https://evil.example",
        f"http://evil.example:{port}",
        f"{good}.evil.example",  # suffix tricks
        f"{good}evil",
        f"http://127.0.0.1.evil.example:{port}",
        f"http://evil.example/{good}",  # prefix tricks
        f"http://evil{good[7:]}",
        f"http://a.127.0.0.1:{port}",
        f"HTTP://127.0.0.1:{port}",  # case variants
        f"http://LOCALHOST:{port}",
        f"http://127.0.0.1:{port + 1}",  # port variants
        "http://127.0.0.1",
        "http://127.0.0.1:80",
        f"http://127.0.0.1:0{port}",
        f"https://127.0.0.1:{port}",  # scheme changes
        f"ws://127.0.0.1:{port}",
        f"wss://127.0.0.1:{port}",
        "file://",
        f"http://user@127.0.0.1:{port}",  # userinfo
        f"http://127.0.0.1:{port}@evil.example",
        f"{good}/",  # trailing slash and paths
        f"{good}/ws",
        f"{good}/j/token",
        f"{good}?x=1",
        f"{good}, https://evil.example",  # two origins
        f"http://[::1]:{port}",  # other spellings of loopback
        f"http://0x7f.0.0.1:{port}",
        f"http://127.1:{port}",
        f"http://127.0.0.1.:{port}",
        f"http://localhost.:{port}",
    ]


async def test_bad_origins_are_refused_before_the_upgrade(broker: RunningBroker, http: ClientSession) -> None:
    url = ws_url(broker)
    origins = bad_origins(broker)
    assert len(origins) >= 20
    for value in origins:
        headers = {} if value is None else {"Origin": value}
        assert await refused_status(http, url, headers) == 403, value
    # The configured origins themselves are accepted.
    port = broker.config.port
    for value in (f"http://127.0.0.1:{port}", f"http://localhost:{port}"):
        assert await refused_status(http, url, {"Origin": value}) == 101, value


async def test_oversize_frame_is_closed_with_1009(broker: RunningBroker, http: ClientSession) -> None:
    async with http.ws_connect(ws_url(broker), origin=origin(broker), max_msg_size=0) as ws:
        await ws.send_str("x" * (MAX_MESSAGE_BYTES + 1))
        assert await read_until_broker_closes(ws, timeout=10) == ([], CLOSE_TOO_BIG)


async def test_a_frame_of_exactly_the_documented_maximum_is_accepted(
    broker: RunningBroker, http: ClientSession
) -> None:
    """docs/protocol.md: "A frame may be at most 65,536 bytes"; the Welcome says the same."""
    async with http.ws_connect(ws_url(broker), origin=origin(broker), max_msg_size=0) as ws:
        await ws.send_str(" " * MAX_MESSAGE_BYTES)
        reply = await ws.receive(timeout=10)
        assert reply.type is WSMsgType.TEXT, f"closed with {ws.close_code}"
        assert json.loads(reply.data)["code"] == "bad_message"  # not JSON, but not too big
        await ws.send_json({"type": "ping", "n": 7})
        assert await ws.receive_json(timeout=10) == {"type": "pong", "n": 7}


async def test_silent_connection_is_closed_after_the_auth_deadline(tmp_path: Path, http: ClientSession) -> None:
    running = await start_broker(tmp_path, auth_deadline_s=0.5)
    try:
        async with http.ws_connect(ws_url(running), origin=origin(running)) as silent:
            error = await silent.receive_json(timeout=10)
            assert error["type"] == "error" and error["code"] == "auth_timeout"
            assert await read_until_broker_closes(silent, timeout=10) == ([], CLOSE_AUTH_TIMEOUT)
        # hello alone is not authentication either.
        async with http.ws_connect(ws_url(running), origin=origin(running)) as greeted:
            await greeted.send_json({"type": "hello", "protocol": 1})
            messages, code = await read_until_closed(greeted)
            assert [m["type"] for m in messages][-1] == "error" and messages[-1]["code"] == "auth_timeout"
            assert code == CLOSE_AUTH_TIMEOUT
    finally:
        await running.stop()


async def read_until_closed(
    ws: aiohttp.ClientWebSocketResponse, timeout: float = 30
) -> tuple[list[dict[str, Any]], int | None]:
    """The messages a socket receives until the broker closes it, and the broker's close code."""
    texts, code = await read_until_broker_closes(ws, timeout)
    return [json.loads(text) for text in texts], code


async def honest_call(running: RunningBroker) -> None:
    """A therapist and a client through pre-flight, checklist and admission to a connected call."""
    session, tokens = await running.hub.create_session(clients=1)
    key = new_link_key()
    therapist_peer = session.therapist().id
    client_peer = session.clients()[0].id
    therapist = BrokerClient(f"{running.url}/t/{tokens[therapist_peer]}#{key}")
    client = BrokerClient(f"{running.url}/j/{tokens[client_peer]}#{client_link_key(key, session.id, client_peer)}")
    try:
        await therapist.connect()
        await client.connect()
        assert (await client.preflight()).connected
        await client.submit_checklist(details={"location": "home"})
        await client.expect(Status, where=lambda m: m.seat_state is SeatState.WAITING, timeout=30)
        await therapist.expect(WaitingRoom, where=lambda m: m.seats[0].state is SeatState.WAITING, timeout=30)
        await therapist.admit(client.peer_id)
        await therapist.wait_connected(client.peer_id, timeout=30)
        await client.wait_connected(therapist.peer_id, timeout=30)
        assert therapist.safety_code(client.peer_id) == client.safety_code(therapist.peer_id)
    finally:
        await client.close()
        await therapist.close()


async def test_flood_is_throttled_then_closed_while_an_honest_pair_connects(
    tmp_path: Path, http: ClientSession
) -> None:
    running = await start_broker(tmp_path, rate_per_s=20.0, rate_burst=40)
    try:
        async with http.ws_connect(ws_url(running), origin=origin(running)) as flooder:

            async def flood() -> tuple[list[dict[str, Any]], int | None]:
                for n in range(2000):
                    if flooder.closed:
                        break
                    try:
                        await flooder.send_str(json.dumps({"type": "ping", "n": n}))
                    except ConnectionError:
                        break
                return await read_until_closed(flooder)

            (flooded, code), _ = await asyncio.gather(flood(), honest_call(running))
            codes = [m.get("code") for m in flooded if m["type"] == "error"]
            assert "too_many_requests" in codes
            pongs = [m for m in flooded if m["type"] == "pong"]
            assert 40 <= len(pongs) < 2000
            assert code == CLOSE_FLOOD
    finally:
        await running.stop()


def small_receive_buffer(addr_info: Any) -> socket.socket:
    """A client socket with a tiny receive buffer, so unread data backs up into the broker fast."""
    family, kind, proto, _, _ = addr_info
    sock = socket.socket(family=family, type=kind, proto=proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return sock


async def join_raw(ws: aiohttp.ClientWebSocketResponse, token: str) -> None:
    await ws.send_json({"type": "hello", "protocol": PROTOCOL_VERSION})
    await ws.send_json({"type": "join", "token": token})


async def test_slow_consumer_is_closed_and_others_are_not(tmp_path: Path, http: ClientSession) -> None:
    """A therapist page that stops reading while clients keep coming and going (each change
    sends it a waiting-room view) is closed with 4009; the clients are served throughout."""
    # The largest session, all peer to peer: this is about the broker's queues, not the media.
    running = await start_broker(tmp_path, send_queue_limit=8, mesh_max_participants=16)
    hub = running.hub
    session, tokens = await hub.create_session(clients=15)
    clients = [tokens[seat.id] for seat in session.clients()]
    connector = aiohttp.TCPConnector(socket_factory=small_receive_buffer)
    try:
        async with ClientSession(connector=connector) as slow_http:
            before = set(hub.connections.by_id)
            slow = await slow_http.ws_connect(ws_url(running), origin=origin(running), autoping=False)
            [slow_id] = set(hub.connections.by_id) - before
            await join_raw(slow, tokens[session.therapist().id])
            # From here on the therapist's side reads nothing and sends nothing.
            cycles = 0
            while slow_id in hub.connections.by_id and not hub.connections.by_id[slow_id].closed:
                token = clients[cycles % len(clients)]
                async with http.ws_connect(ws_url(running), origin=origin(running)) as client:
                    await join_raw(client, token)
                    assert (await client.receive_json(timeout=10))["type"] == "welcome"
                    joined = await client.receive_json(timeout=10)
                    assert joined["type"] == "joined" and joined["role"] == "client"
                cycles += 1
                assert cycles < 5000, "the broker kept queueing for a reader that never reads"
            # Another connection on the same broker is still served normally.
            async with http.ws_connect(ws_url(running), origin=origin(running)) as other:
                await other.send_json({"type": "ping", "n": 1})
                assert await other.receive_json(timeout=10) == {"type": "pong", "n": 1}
            received, code = await read_until_closed(slow, timeout=60)
            # The broker closed it for not reading (the loop above waited for that); a peer that
            # does not read may see the drop (1006) instead of 4009 when the close frame cannot be
            # written within 0.5 s (docs/protocol.md section 1), as on a loaded machine.
            assert code in (CLOSE_TOO_SLOW, aiohttp.WSCloseCode.ABNORMAL_CLOSURE)
            assert received[:2] and received[0]["type"] == "welcome" and received[1]["type"] == "joined"
            assert 0 < sum(m["type"] == "waiting_room" for m in received) < 2 * cycles + 1
            await slow.close()
    finally:
        await running.stop()


async def test_per_address_connection_limit(tmp_path: Path, http: ClientSession) -> None:
    running = await start_broker(tmp_path, max_connections_per_address=3)
    url = ws_url(running)
    try:
        open_ones = [await http.ws_connect(url, origin=origin(running)) for _ in range(3)]
        assert await refused_status(http, url, {"Origin": origin(running)}) == 429
        await open_ones.pop().close()
        # Once the broker has seen that one go, there is room for one more.
        for _ in range(200):
            status = await refused_status(http, url, {"Origin": origin(running)})
            if status == 101:
                break
            await asyncio.sleep(0.05)
        assert status == 101
        for ws in open_ones:
            await ws.close()
    finally:
        await running.stop()


async def test_per_address_limit_counts_an_ipv6_64_and_a_mapped_ipv4_as_one_address(
    tmp_path: Path, http: ClientSession
) -> None:
    """Finding 14: the WebSocket cap counted each IPv6 address on its own, while the login throttle
    groups a /64; one definition of a client address now serves both (broker/http/client_address.py)."""
    running = await start_broker(tmp_path, max_connections_per_address=2, trust_proxy=True)
    url = ws_url(running)

    def via(address: str) -> dict[str, str]:  # the trusted proxy's last X-Forwarded-For hop
        return {"Origin": origin(running), "X-Forwarded-For": f"203.0.113.9, {address}"}

    try:
        held = [await http.ws_connect(url, headers=via(a)) for a in ("2001:db8:1:2::1", "2001:db8:1:2:ffff::9")]
        assert await refused_status(http, url, via("2001:db8:1:2::abcd")) == 429  # same /64: full
        assert await refused_status(http, url, via("2001:db8:1:3::1")) == 101  # the next /64 is another address
        held += [await http.ws_connect(url, headers=via(a)) for a in ("::ffff:198.51.100.4", "198.51.100.4")]
        assert await refused_status(http, url, via("198.51.100.4")) == 429  # mapped and plain IPv4: one address
        assert await refused_status(http, url, via("198.51.100.5")) == 101
        for ws in held:
            await ws.close()
    finally:
        await running.stop()


def _handler_frame(name: str) -> Any:
    """The suspended frame of the coroutine called ``name`` in any task on this loop."""
    for task in asyncio.all_tasks():
        coro = task.get_coro()
        while coro is not None and hasattr(coro, "cr_code"):
            if coro.cr_code.co_name == name:
                return coro.cr_frame
            coro = coro.cr_await
    raise LookupError(name)


async def test_an_idle_websocket_keeps_nothing_of_its_last_message(broker: RunningBroker) -> None:
    """Memory per idle connection (P2): the finished handling of the last frame is let go."""
    async with ClientSession() as http:
        ws = await http.ws_connect(ws_url(broker), origin=origin(broker))
        try:
            await ws.send_str(json.dumps({"type": "hello", "protocol": PROTOCOL_VERSION}))
            assert json.loads((await ws.receive(timeout=5)).data)["type"] == "welcome"
            frame = _handler_frame("websocket")
            assert frame.f_locals.get("pending") is None
        finally:
            await ws.close()


async def test_frames_sent_with_the_upgrade_request_are_answered(broker: RunningBroker) -> None:
    """A client that sends frames before the handshake's answer (in the same write as its request):
    the frames are parsed along with the upgrade, and handled in order like any others."""
    host, port = broker.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        request = (
            f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nOrigin: {origin(broker)}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        hello = json.dumps({"type": "hello", "protocol": PROTOCOL_VERSION})
        ping = json.dumps({"type": "ping", "n": 7})
        writer.write(request + masked_text_frames([hello, ping]))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101")
        answers = []
        for _ in range(2):
            b0, b1 = await asyncio.wait_for(reader.readexactly(2), 5)
            length = b1 & 0x7F
            if length == 126:
                length = int.from_bytes(await reader.readexactly(2), "big")
            answers.append(json.loads(await reader.readexactly(length)))
        assert [a["type"] for a in answers] == ["welcome", "pong"] and answers[1]["n"] == 7
    finally:
        writer.close()
