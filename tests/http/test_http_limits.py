"""Slow and crowded HTTP clients against a real ``broker serve`` process (finding 9 of issue 25).

Each broker runs as its own process, as deployed (uvloop when installed), so that its file
descriptors are its own: the first test gives it the 512 of the process in the finding. Client
addresses are loopback addresses (all of 127.0.0.0/8 is local on Linux), one per client; behind
a trusted proxy they are X-Forwarded-For hops. See broker/http/guard.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import resource
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from broker.signaling.protocol import PROTOCOL_VERSION
from tests.conftest import free_port

pytestmark = pytest.mark.asyncio(loop_scope="session")

BROKER = [sys.executable, "-m", "broker"]
#: Where the tests' readiness probe comes from: never an address a test counts.
PROBE = "127.0.0.250"
Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@dataclass
class Served:
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, env: dict[str, str], *, max_files: int | None = None) -> AsyncIterator[Served]:
    """``broker serve`` on a free port with these settings (and at most ``max_files`` descriptors)."""
    port = free_port()
    log = tmp_path / "broker.log"

    def limit_files() -> None:
        if max_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max_files, max_files))

    with log.open("wb") as out:
        process = subprocess.Popen(
            [*BROKER, "serve", "--data-dir", str(tmp_path / "data"), "--port", str(port)],
            env={**os.environ, "BROKER_LOG_LEVEL": "info", **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=limit_files,
        )
    served = Served(port, log)
    try:
        for _ in range(300):
            with contextlib.suppress(OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
                if await status_of(served, "/healthz", PROBE) == 200:
                    break
            assert process.poll() is None, log.read_text()
            await asyncio.sleep(0.1)
        yield served
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


async def open_from(served: Served, source: str) -> Connection:
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", served.port, local_addr=(source, 0)), 10)


def request(path: str = "/healthz", *, close: bool = False) -> bytes:
    extra = "Connection: close\r\n" if close else ""
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode()


async def read_response(reader: asyncio.StreamReader) -> int:
    """The status of the next response on a connection, its body read to the end."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = re.search(rb"(?im)^content-length: *(\d+)", head)
    await asyncio.wait_for(reader.readexactly(int(length.group(1)) if length else 0), 5)
    return int(head.split(b" ", 2)[1])


async def status_of(served: Served, path: str, source: str) -> int:
    """One request on a fresh connection from ``source`` (answered within 5 s, or this raises)."""
    reader, writer = await open_from(served, source)
    try:
        writer.write(request(path, close=True))
        return await read_response(reader)
    finally:
        writer.close()


async def dropped(connection: Connection, within: float) -> bool:
    """Whether the broker closes this connection within ``within`` seconds, without sending a byte."""
    try:
        data = await asyncio.wait_for(connection[0].read(1), within)
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    assert data == b"", data
    return True


def close_all(connections: list[Connection]) -> None:
    for _, writer in connections:
        writer.close()


async def test_600_half_open_requests_from_one_address_leave_healthz_answering(tmp_path: Path) -> None:
    """The finding: 600 connections that each sent half a request line, to a process allowed 512
    files, made /healthz time out. With the default settings, those beyond the per-address cap
    (100) are closed at once, the rest when the header timeout (10 s) passes."""
    async with serving(tmp_path, {}, max_files=512) as served:
        attack: list[Connection] = []
        try:
            for _ in range(600):
                connection = await open_from(served, "127.0.0.1")
                with contextlib.suppress(ConnectionError):
                    connection[1].write(b"GET /healthz HT")
                attack.append(connection)
            assert await status_of(served, "/healthz", "127.0.0.2") == 200  # a fresh client, answered promptly
            at_once = await asyncio.gather(*(dropped(c, 1.0) for c in attack))
            assert sum(at_once) == 500, sum(at_once)
            held = [c for c, gone in zip(attack, at_once, strict=True) if not gone]
            assert all(await asyncio.gather(*(dropped(c, 10 + 5) for c in held)))
            assert await status_of(served, "/healthz", "127.0.0.1") == 200  # the address is served again
        finally:
            close_all(attack)
        assert "event=http_address_limit" in served.log.read_text()


async def test_a_request_head_must_arrive_within_the_header_timeout(tmp_path: Path) -> None:
    env = {"BROKER_HTTP_HEADER_TIMEOUT_S": "1", "BROKER_AUTH_DEADLINE_S": "30"}
    async with serving(tmp_path, env) as served:
        late: list[Connection] = []
        for start in (b"GET /healthz HT", b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n", b"\r\n\r\nGET / HT"):
            late.append(await open_from(served, "127.0.0.3"))  # the last: empty lines before a head end nothing
            late[-1][1].write(start)
        slow = await open_from(served, "127.0.0.3")
        late.append(slow)

        async def trickle() -> None:  # a byte at a time, never finishing the head
            with contextlib.suppress(ConnectionError):
                slow[1].write(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
                while not slow[0].at_eof():
                    slow[1].write(b"a")
                    await asyncio.sleep(0.2)

        trickling = asyncio.create_task(trickle())
        keep = await open_from(served, "127.0.0.3")
        keep[1].write(request())
        assert await read_response(keep[0]) == 200
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(served.url.replace("http", "ws") + "/ws", origin=served.url)
            try:
                assert all(await asyncio.gather(*(dropped(c, 1 + 5) for c in late)))
                await asyncio.sleep(1.5)  # well past the deadline of the WebSocket's own connection
                await ws.send_str(json.dumps({"type": "hello", "protocol": PROTOCOL_VERSION}))
                assert json.loads((await ws.receive(timeout=5)).data)["type"] == "welcome"
                keep[1].write(request())  # a kept-alive connection whose first head came in time
                assert await read_response(keep[0]) == 200
            finally:
                await ws.close()
                trickling.cancel()
                close_all([*late, keep])


async def test_idle_keep_alive_connections_are_closed_and_stop_counting(tmp_path: Path) -> None:
    env = {"BROKER_MAX_HTTP_CONNECTIONS_PER_ADDRESS": "3", "BROKER_HTTP_KEEPALIVE_S": "2"}
    async with serving(tmp_path, env) as served:
        idle = [await open_from(served, "127.0.0.4") for _ in range(3)]
        for reader, writer in idle:
            writer.write(request())
            assert await read_response(reader) == 200
        over = await open_from(served, "127.0.0.4")
        try:
            assert await dropped(over, 5)  # a 4th connection from the address: closed at once, never read
            assert await status_of(served, "/healthz", "127.0.0.5") == 200  # others are not affected
            assert all(await asyncio.gather(*(dropped(c, 2 + 5) for c in idle)))  # idle: closed by the broker
            assert await status_of(served, "/healthz", "127.0.0.4") == 200  # and no longer counted
        finally:
            close_all([*idle, over])


async def test_behind_a_trusted_proxy_the_cap_counts_requests_per_forwarded_address(tmp_path: Path) -> None:
    """Every connection comes from the proxy, so the cap counts requests in progress (WebSockets
    included) per X-Forwarded-For address, IPv6 per /64, and answers 429; the proxy itself is not capped."""
    env = {"BROKER_TRUST_PROXY": "1", "BROKER_MAX_HTTP_CONNECTIONS_PER_ADDRESS": "3", "BROKER_AUTH_DEADLINE_S": "30"}
    async with serving(tmp_path, env) as served, aiohttp.ClientSession() as http:
        ws_url = served.url.replace("http", "ws") + "/ws"

        def via(address: str) -> dict[str, str]:
            return {"Origin": served.url, "X-Forwarded-For": address}

        async def healthz(address: str) -> int:
            async with http.get(served.url + "/healthz", headers=via(address)) as response:
                return response.status

        one_64 = [await http.ws_connect(ws_url, headers=via(f"2001:db8:1:2::{i}")) for i in (1, 2, 3)]
        others = [await http.ws_connect(ws_url, headers=via(f"2001:db8:1:{n}::1")) for n in range(3, 9)]
        try:
            assert await healthz("2001:db8:1:2::99") == 429  # the /64 holds 3 requests in progress
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(ws_url, headers=via("2001:db8:1:2:ffff::1"))
            assert refused.value.status == 429
            assert await healthz("2001:db8:1:9::1") == 200 and await healthz("198.51.100.7") == 200
            await one_64.pop().close()
            for _ in range(100):  # once the broker has seen it go, the /64 has room again
                if await healthz("2001:db8:1:2::99") == 200:
                    break
                await asyncio.sleep(0.05)
            assert await healthz("2001:db8:1:2::99") == 200
        finally:
            for ws in (*one_64, *others):
                await ws.close()
