"""The practice admin's local API: a Unix socket in the data dir.

``broker session create`` must work while ``broker serve`` runs on the same
data dir, even on the embedded in-memory store, so the CLI asks the running
process over this socket. The socket is reachable only by the data dir's owner
(mode 0600 in a 0700 directory) and each request also carries a key derived
from the server secret, which only that owner can read. It never listens on
the network.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

from .config import Config, Keys, load_or_create_secret
from .hub import Hub
from .protocol import ErrorCode, ProtocolError

ADMIN_HEADER = "X-Broker-Admin-Key"


class CreateRequest(msgspec.Struct, forbid_unknown_fields=True):
    clients: int = 1
    minors: int = 0
    starts: int | None = None
    duration_s: int = 50 * 60
    relay_only: bool = False


class AdminError(Exception):
    """The admin API refused a request or could not be reached; the message says why."""


def admin_app(hub: Hub, keys: Keys, base_url: str) -> web.Application:
    """``base_url`` is where this broker is reached, so printed links point at it."""
    expected = keys.admin.hex()

    @web.middleware
    async def authenticate(request: web.Request, handler: Any) -> web.StreamResponse:
        if not hmac.compare_digest(request.headers.get(ADMIN_HEADER, ""), expected):
            return web.json_response({"error": "not_allowed", "message": "Wrong admin key."}, status=403)
        try:
            return await handler(request)
        except ProtocolError as exc:
            return web.json_response({"error": exc.code.value, "message": exc.message}, status=400)
        except (ValueError, msgspec.ValidationError, msgspec.DecodeError) as exc:
            return web.json_response({"error": ErrorCode.BAD_MESSAGE.value, "message": str(exc)}, status=400)

    async def create(request: web.Request) -> web.Response:
        body = msgspec.json.decode(await request.read(), type=CreateRequest)
        session, tokens = await hub.create_session(
            clients=body.clients,
            minors=body.minors,
            starts=body.starts,
            duration_s=body.duration_s,
            relay_only=body.relay_only,
        )
        return web.json_response(
            {
                "session": session.id,
                "base_url": base_url,
                "starts": session.starts,
                "not_before": session.not_before,
                "expires": session.expires,
                "seats": [
                    {"peer": s.id, "role": s.role.value, "minor": s.minor, "token": tokens[s.id]} for s in session.seats
                ],
            }
        )

    async def revoke(request: web.Request) -> web.Response:
        reissue = request.match_info["action"] == "reissue"
        token = await hub.revoke_seat(request.match_info["session"], request.match_info["peer"], reissue=reissue)
        return web.json_response({"token": token})

    app = web.Application(middlewares=[authenticate], client_max_size=16 * 1024)
    app.router.add_post("/sessions", create)
    app.router.add_post("/sessions/{session}/seats/{peer}/{action:revoke|reissue}", revoke)
    return app


async def start_admin_site(app: web.Application, runner: web.AppRunner, config: Config) -> web.UnixSite:
    path = config.admin_socket
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    if path.exists():
        path.unlink()
    site = web.UnixSite(runner, str(path))
    old = os.umask(0o177)
    try:
        await site.start()
    finally:
        os.umask(old)
    return site


class AdminClient:
    """Talks to the ``broker serve`` running on a data dir."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.socket: Path = config.admin_socket

    def _key(self) -> str:
        return Keys(load_or_create_secret(self.config)).admin.hex()

    async def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        if not self.socket.exists():
            raise AdminError(
                f"No broker is running on the data dir {self.config.data_dir}. Start it with "
                f"'broker serve --data-dir {self.config.data_dir}' and try again."
            )
        connector = aiohttp.UnixConnector(path=str(self.socket))
        try:
            async with aiohttp.ClientSession(connector=connector) as http:
                async with http.request(
                    method, f"http://broker{path}", json=body, headers={ADMIN_HEADER: self._key()}
                ) as response:
                    data = await response.json()
        except aiohttp.ClientConnectionError:
            raise AdminError(
                f"The broker on {self.config.data_dir} is not answering (it may have stopped). "
                "Start it with 'broker serve' and try again."
            ) from None
        if response.status != 200:
            raise AdminError(data.get("message", "The broker refused the request."))
        return data  # type: ignore[no-any-return]

    async def create_session(self, **fields: Any) -> dict[str, Any]:
        return await self.request("POST", "/sessions", fields)

    async def revoke(self, session: str, peer: str, *, reissue: bool = False) -> dict[str, Any]:
        action = "reissue" if reissue else "revoke"
        return await self.request("POST", f"/sessions/{session}/seats/{peer}/{action}")
