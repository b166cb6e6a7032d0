"""A small client for Janus's JSON API (HTTP transport) and its admin API, over aiohttp.

Every request carries the API secret (or, on the admin API, the admin secret) from the broker's
configuration; neither ever reaches a browser. Anything other than a good answer (Janus down,
a timeout, an error code, an answer that is not JSON) raises ``JanusUnavailable`` and the caller
changes nothing. Nothing here logs a request body or an answer: room secrets, PINs and tokens travel
in them (the admin API's ``handle_info`` answers name each handle's token).
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp

VIDEOROOM = "janus.plugin.videoroom"

#: The stable error code callers answer with (docs/protocol.md).
JANUS_UNAVAILABLE = "janus_unavailable"


class JanusUnavailable(Exception):
    """Janus did not do what was asked: down, too slow, or it answered with an error."""

    code = JANUS_UNAVAILABLE


class ApiError(JanusUnavailable):
    """Janus's core refused a request; ``error_code`` is its number (e.g. 458: no such session)."""

    def __init__(self, message: str, error_code: int) -> None:
        super().__init__(message)
        self.error_code = error_code


class PluginError(JanusUnavailable):
    """The VideoRoom plugin refused a request; ``error_code`` is its number (e.g. 426: no such room)."""

    def __init__(self, message: str, error_code: int) -> None:
        super().__init__(message)
        self.error_code = error_code


#: VideoRoom error codes the broker tells apart (Janus's videoroom plugin documentation).
NO_SUCH_ROOM = 426
ROOM_EXISTS = 427
NO_SUCH_FEED = 428
UNAUTHORIZED = 433
#: Janus core error codes for a session or handle that is gone (it ended meanwhile).
NO_SUCH_SESSION = 458
NO_SUCH_HANDLE = 459


@dataclass(frozen=True)
class JanusSettings:
    """Where Janus is and the keys the broker holds for it."""

    url: str
    api_secret: str = field(default="", repr=False)
    admin_url: str = ""
    admin_secret: str = field(default="", repr=False)
    #: The VideoRoom plugin's ``admin_key``: needed to create and list rooms.
    room_admin_key: str = field(default="", repr=False)
    timeout_s: float = 5.0


def _transaction() -> str:
    return secrets.token_urlsafe(12)


class JanusClient:
    """One broker process's connection pool to Janus; ``close()`` when the process stops."""

    def __init__(self, settings: JanusSettings) -> None:
        self.settings = settings
        self._http: aiohttp.ClientSession | None = None

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.settings.timeout_s))
        return self._http

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def _post(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        body = {**body, "transaction": _transaction()}
        try:
            async with self._session().post(url, json=body) as response:
                if response.status != 200:
                    raise JanusUnavailable(f"Janus answered HTTP {response.status}.")
                answer = await response.json(content_type=None)
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            raise JanusUnavailable(f"Janus could not be reached ({type(exc).__name__}).") from None
        if not isinstance(answer, dict):
            raise JanusUnavailable("Janus's answer is not a JSON object.")
        if answer.get("janus") == "error":
            error = answer.get("error") or {}
            code = error.get("code") if isinstance(error, dict) else None
            if isinstance(code, int):
                raise ApiError(f"Janus refused the request (error {code}).", code)
            raise JanusUnavailable("Janus refused the request.")
        return answer

    async def api(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """One Janus API request under ``path`` (``""``, ``/SESSION`` or ``/SESSION/HANDLE``)."""
        if self.settings.api_secret:
            body = {**body, "apisecret": self.settings.api_secret}
        return await self._post(self.settings.url.rstrip("/") + path, body)

    async def admin(self, body: dict[str, Any], path: str = "") -> dict[str, Any]:
        """One admin API request under ``path`` (``""``, ``/SESSION`` or ``/SESSION/HANDLE``)."""
        if not self.settings.admin_url:
            raise JanusUnavailable("The Janus admin API is not configured (BROKER_JANUS_ADMIN_URL).")
        url = self.settings.admin_url.rstrip("/") + path
        return await self._post(url, {**body, "admin_secret": self.settings.admin_secret})

    async def sessions_opened_with(self, token: str) -> list[int]:
        """The Janus sessions with a handle attached under ``token`` (admin API: each handle's ``handle_info``).

        A session or handle that ends while this looks is skipped; Janus not answering raises.
        """
        listed = (await self.admin({"janus": "list_sessions"})).get("sessions")
        found: list[int] = []
        for session_id in [s for s in listed if isinstance(s, int)] if isinstance(listed, list) else []:
            try:
                handles = (await self.admin({"janus": "list_handles"}, f"/{session_id}")).get("handles")
                for handle_id in [h for h in handles if isinstance(h, int)] if isinstance(handles, list) else []:
                    info = (await self.admin({"janus": "handle_info"}, f"/{session_id}/{handle_id}")).get("info")
                    held = info.get("token") if isinstance(info, dict) else None
                    if isinstance(held, str) and hmac.compare_digest(held.encode(), token.encode()):
                        found.append(session_id)
                        break
            except ApiError as exc:
                if exc.error_code not in (NO_SUCH_SESSION, NO_SUCH_HANDLE):
                    raise
        return found

    async def end_session(self, session_id: int) -> None:
        """Destroy a Janus session and every handle in it (admin API); one already gone is fine."""
        try:
            await self.admin({"janus": "destroy_session"}, f"/{session_id}")
        except ApiError as exc:
            if exc.error_code != NO_SUCH_SESSION:
                raise

    async def info(self) -> dict[str, Any]:
        """Janus's ``info`` answer: it is up and answering."""
        try:
            async with self._session().get(self.settings.url.rstrip("/") + "/info") as response:
                answer = await response.json(content_type=None)
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            raise JanusUnavailable(f"Janus could not be reached ({type(exc).__name__}).") from None
        if not isinstance(answer, dict) or answer.get("janus") != "server_info":
            raise JanusUnavailable("Janus did not answer info.")
        return answer

    @asynccontextmanager
    async def videoroom(self) -> AsyncIterator[VideoRoomHandle]:
        """A Janus session with the VideoRoom plugin attached, destroyed afterwards.

        The broker opens one per piece of work rather than keeping one alive: nothing to keep
        alive, and a Janus restart between two pieces of work costs nothing.
        """
        created = await self.api("", {"janus": "create"})
        session_id = _id_of(created)
        try:
            attached = await self.api(f"/{session_id}", {"janus": "attach", "plugin": VIDEOROOM})
            yield VideoRoomHandle(self, f"/{session_id}/{_id_of(attached)}")
        finally:
            try:
                await self.api(f"/{session_id}", {"janus": "destroy"})
            except JanusUnavailable:
                pass  # Janus drops idle sessions itself (session_timeout)


def _id_of(answer: dict[str, Any]) -> int:
    data = answer.get("data")
    if answer.get("janus") != "success" or not isinstance(data, dict) or not isinstance(data.get("id"), int):
        raise JanusUnavailable("Janus's answer lacks the id asked for.")
    return int(data["id"])


@dataclass(frozen=True)
class VideoRoomHandle:
    """A handle on the VideoRoom plugin: synchronous requests (create, destroy, list, allowed...)."""

    client: JanusClient
    path: str

    async def request(self, body: dict[str, Any]) -> dict[str, Any]:
        """Send one synchronous VideoRoom request and return its data; PluginError when it refuses."""
        answer = await self.client.api(self.path, {"janus": "message", "body": body})
        plugindata = answer.get("plugindata")
        data = plugindata.get("data") if isinstance(plugindata, dict) else None
        if answer.get("janus") != "success" or not isinstance(data, dict):
            raise JanusUnavailable("The VideoRoom plugin gave no answer.")
        if "error_code" in data:
            raise PluginError(f"The VideoRoom plugin refused (error {data['error_code']}).", int(data["error_code"]))
        return data
