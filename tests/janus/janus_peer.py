"""A participant's side of Janus's HTTP API, for tests: only what a browser would hold.

It opens a Janus session with the participant's token (never the API secret), attaches the
VideoRoom plugin and asks to join a room with a PIN and token, without any media, then reads
Janus's answer from the long poll.
"""

from __future__ import annotations

import secrets
from typing import Any

import aiohttp


class JanusApiError(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(f"Janus error {code}")
        self.code = code


async def _post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> dict[str, Any]:
    async with http.post(url, json={**body, "transaction": secrets.token_hex(6)}) as response:
        answer: dict[str, Any] = await response.json(content_type=None)
    if answer.get("janus") == "error":
        raise JanusApiError(int(answer["error"]["code"]))
    return answer


async def join_room(url: str, token: str, room: int, pin: str) -> dict[str, Any]:
    """Join ``room`` as a publisher; the VideoRoom's event data (``joined``, or an ``error_code``)."""
    auth = {"token": token}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        session = (await _post(http, url, {"janus": "create", **auth}))["data"]["id"]
        try:
            handle = (
                await _post(http, f"{url}/{session}", {"janus": "attach", "plugin": "janus.plugin.videoroom", **auth})
            )["data"]["id"]
            join = {"request": "join", "ptype": "publisher", "room": room, "pin": pin, "token": token}
            await _post(http, f"{url}/{session}/{handle}", {"janus": "message", "body": join, **auth})
            for _ in range(20):
                async with http.get(f"{url}/{session}", params={"maxev": "1", **auth}) as response:
                    event: dict[str, Any] = await response.json(content_type=None)
                data = event.get("plugindata", {}).get("data")
                if event.get("janus") == "event" and isinstance(data, dict):
                    return data
            raise AssertionError("Janus sent no answer to the join")
        finally:
            await _post(http, f"{url}/{session}", {"janus": "destroy", **auth})
