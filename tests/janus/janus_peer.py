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


class RoomMember:
    """A participant that stays in the room, as a call page does: a Janus session opened with its token,
    a publisher handle joined with ``display`` = its peer id, and subscriber handles (``subscribe``)."""

    def __init__(self, url: str, token: str, room: int, pin: str) -> None:
        self.url, self.token, self.room, self.pin = url, token, room, pin
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        self.session = 0
        self.handles: list[int] = []

    @classmethod
    async def join(cls, url: str, token: str, room: int, pin: str, display: str) -> RoomMember:
        member = cls(url, token, room, pin)
        try:
            member.session = (await member._send("", {"janus": "create"}))["data"]["id"]
            joined = await member._request({"request": "join", "ptype": "publisher", "display": display})
        except BaseException:
            await member.http.close()
            raise
        assert joined.get("videoroom") == "joined", joined
        return member

    async def subscribe(self, feed: int) -> dict[str, Any]:
        """Subscribe to ``feed`` on a handle of its own; the VideoRoom's answer (``attached`` or an error)."""
        return await self._request({"request": "join", "ptype": "subscriber", "streams": [{"feed": feed}]})

    async def close(self) -> None:
        try:
            await self._send(f"/{self.session}", {"janus": "destroy"})
        except JanusApiError:
            pass  # put out of Janus already
        finally:
            await self.http.close()

    async def _send(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await _post(self.http, self.url + path, {**body, "token": self.token})

    async def _request(self, body: dict[str, Any]) -> dict[str, Any]:
        """Attach a handle and send it one VideoRoom request with the room's PIN and the token; its answer."""
        attached = await self._send(f"/{self.session}", {"janus": "attach", "plugin": "janus.plugin.videoroom"})
        handle = int(attached["data"]["id"])
        self.handles.append(handle)
        request = {**body, "room": self.room, "pin": self.pin, "token": self.token}
        await self._send(f"/{self.session}/{handle}", {"janus": "message", "body": request})
        for _ in range(20):
            async with self.http.get(f"{self.url}/{self.session}", params={"maxev": "1", "token": self.token}) as got:
                event: dict[str, Any] = await got.json(content_type=None)
            data = event.get("plugindata", {}).get("data")
            if event.get("janus") == "event" and event.get("sender") == handle and isinstance(data, dict):
                if data.get("videoroom") in ("joined", "attached") or "error_code" in data:
                    return data
        raise AssertionError("Janus sent no answer to the request")
