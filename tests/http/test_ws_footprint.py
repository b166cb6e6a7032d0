"""What a held WebSocket keeps in the broker (issue 32): it lasts as long as its session, so the
middlewares with nothing to do for it hand it on without a suspended coroutine each (about 300
bytes, and one more object for every full pass of the garbage collector, per connection)."""

from __future__ import annotations

import asyncio
import gc
import json
import tracemalloc
import types
from pathlib import Path

from aiohttp import ClientSession, web
from aiohttp.test_utils import make_mocked_request
from aiohttp.typedefs import Handler

from broker.http.app import WEBSOCKET_PATH, skips_websocket
from tests.conftest import start_broker

BROKER_HTTP = str(Path(__file__).resolve().parents[2] / "broker" / "http")


def suspended_broker_http_coroutines() -> list[str]:
    """Coroutines of broker/http/ waiting for something right now, by function name."""
    return sorted(
        obj.cr_code.co_name
        for obj in gc.get_objects()
        if isinstance(obj, types.CoroutineType)
        and obj.cr_frame is not None
        and obj.cr_code.co_filename.startswith(BROKER_HTTP)
    )


async def test_a_held_websocket_waits_in_its_handler_alone(tmp_path: Path) -> None:
    running = await start_broker(tmp_path / "data")
    try:
        async with ClientSession() as http:
            url = running.url.replace("http://", "ws://") + WEBSOCKET_PATH
            sockets = [await http.ws_connect(url, headers={"Origin": running.url}) for _ in range(3)]
            await asyncio.sleep(0.1)
            assert suspended_broker_http_coroutines() == ["websocket"] * 3
            for ws in sockets:
                await ws.close()
    finally:
        await running.stop()


async def test_behind_a_trusted_proxy_a_held_websocket_still_waits_in_its_handler_alone(tmp_path: Path) -> None:
    """The per-forwarded-address cap counts a WebSocket while it lasts without a coroutine of its
    own (it was one more suspended coroutine per connection); the count still ends with it."""
    running = await start_broker(tmp_path / "data", trust_proxy=True, max_http_connections_per_address=3)
    try:
        async with ClientSession() as http:
            url = running.url.replace("http://", "ws://") + WEBSOCKET_PATH
            via = {"Origin": running.url, "X-Forwarded-For": "198.51.100.9"}
            sockets = [await http.ws_connect(url, headers=via) for _ in range(3)]
            await asyncio.sleep(0.1)
            assert suspended_broker_http_coroutines() == ["websocket"] * 3
            async with http.get(running.url + "/healthz", headers=via) as refused:
                assert refused.status == 429  # the three are counted
            await sockets.pop().close()
            for _ in range(100):
                async with http.get(running.url + "/healthz", headers=via) as answer:
                    if answer.status == 200:
                        break
                await asyncio.sleep(0.05)
            assert answer.status == 200  # the closed one no longer counts
            for ws in sockets:
                await ws.close()
    finally:
        await running.stop()


async def test_a_held_websocket_keeps_no_frame_it_has_handled(tmp_path: Path) -> None:
    """A connection's last frame is let go once handled, not kept until the next one comes (a
    sealed offer is 4-5 KB, and a held connection may wait for its next frame all session)."""
    padding = "x" * 40_000  # made before tracing: the frame's own copies are what is looked for
    running = await start_broker(tmp_path / "data")
    tracemalloc.start()
    try:
        async with ClientSession() as http:
            url = running.url.replace("http://", "ws://") + WEBSOCKET_PATH
            ws = await http.ws_connect(url, headers={"Origin": running.url})
            await ws.send_str(json.dumps({"type": "hello", "protocol": 1, "padding": padding}))
            reply = json.loads((await ws.receive(timeout=10)).data)
            assert reply["type"] == "error"  # handled: refused, and the connection stays open
            await asyncio.sleep(0.1)
            kept = [t for t in tracemalloc.take_snapshot().traces if t.size >= len(padding)]
            assert kept == []
            await ws.close()
    finally:
        tracemalloc.stop()
        await running.stop()


async def test_skips_websocket_hands_the_websocket_on_and_every_other_request_to_the_middleware() -> None:
    seen: list[str] = []

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        seen.append(request.path)
        return await handler(request)

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(text=request.path)

    passing = skips_websocket(middleware)
    for path in (WEBSOCKET_PATH, "/j/token", "/api/sessions", "/ws/more"):
        response = await passing(make_mocked_request("GET", path), handler)
        assert isinstance(response, web.Response) and response.text == path
    assert seen == ["/j/token", "/api/sessions", "/ws/more"]
