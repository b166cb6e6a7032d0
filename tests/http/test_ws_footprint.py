"""What a held WebSocket keeps in the broker (issue 32): it lasts as long as its session, so the
middlewares with nothing to do for it hand it on without a suspended coroutine each (about 300
bytes, and one more object for every full pass of the garbage collector, per connection)."""

from __future__ import annotations

import asyncio
import gc
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
