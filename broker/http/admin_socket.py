"""The practice admin's local API: a Unix socket in the data dir.

``broker session create`` must work while ``broker serve`` runs on the same
data dir, even on the embedded in-memory store, so the CLI asks the running
process over this socket. The socket is reachable only by the broker's user
(mode 0600, in a directory only that user can write) and each request also
carries a key derived from the server secret, which only that user can read.
It never listens on the network.

The broker never changes the permissions of a directory it did not make: it
creates the socket's directory (0700) when it is absent, and refuses one that
other users could write to (such as /tmp), where someone could put their own
socket in its place and collect the key the CLI sends.
"""

from __future__ import annotations

import hmac
import os
import stat
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
from aiohttp import web
from aiohttp.typedefs import Handler

from broker.config import Config, ConfigError, Keys, load_or_create_secret
from broker.janus.client import JANUS_UNAVAILABLE, JanusUnavailable
from broker.janus.scheduling import JANUS_UNAVAILABLE_MESSAGE, JanusRequired
from broker.signaling.hub import Hub
from broker.signaling.protocol import ErrorCode, ProtocolError
from broker.store.base import StoreUnavailable

ADMIN_HEADER = "X-Broker-Admin-Key"

#: What the CLI prints when the broker cannot reach its store: what is wrong, and what to do.
STORE_UNAVAILABLE_MESSAGE = (
    "The broker cannot reach its session store (Redis), so nothing was changed: "
    "check that Redis is running (the broker's /readyz answers 200 once it is back), then try again."
)


class CreateRequest(msgspec.Struct, forbid_unknown_fields=True):
    clients: int = 1
    minors: int = 0
    starts: int | None = None
    duration_s: int = 50 * 60
    relay_only: bool = False
    #: Also one link for every client (docs/protocol.md 4: its people share one key).
    group_link: bool = False


class AdminError(Exception):
    """The admin API refused a request or could not be reached; the message says why."""


#: What the CLI prints for ``--relay-only`` on a broker without TURN.
RELAY_UNAVAILABLE_MESSAGE = (
    "This broker has no TURN server configured (BROKER_TURN_URLS), so a relay-only session could not connect. "
    "Nothing was scheduled."
)


def admin_app(hub: Hub, keys: Keys, base_url: str, *, relay_available: bool = True) -> web.Application:
    """``base_url`` is where this broker is reached, so printed links point at it; ``relay_available``
    says TURN is configured (else ``--relay-only`` is refused)."""
    expected = keys.admin.hex()

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not hmac.compare_digest(request.headers.get(ADMIN_HEADER, ""), expected):
            return web.json_response({"error": "not_allowed", "message": "Wrong admin key."}, status=403)
        try:
            return await handler(request)
        except ProtocolError as exc:
            return web.json_response({"error": exc.code.value, "message": exc.message}, status=400)
        except StoreUnavailable:
            return web.json_response(
                {"error": ErrorCode.UNAVAILABLE.value, "message": STORE_UNAVAILABLE_MESSAGE}, status=503
            )
        except JanusRequired as exc:
            return web.json_response({"error": exc.code, "message": str(exc)}, status=400)
        except JanusUnavailable:
            return web.json_response({"error": JANUS_UNAVAILABLE, "message": JANUS_UNAVAILABLE_MESSAGE}, status=503)
        except (ValueError, msgspec.ValidationError, msgspec.DecodeError) as exc:
            return web.json_response({"error": ErrorCode.BAD_MESSAGE.value, "message": str(exc)}, status=400)

    async def create(request: web.Request) -> web.Response:
        body = msgspec.json.decode(await request.read(), type=CreateRequest)
        if body.relay_only and not relay_available:
            return web.json_response({"error": "relay_unavailable", "message": RELAY_UNAVAILABLE_MESSAGE}, status=400)
        session, tokens = await hub.create_session(
            clients=body.clients,
            minors=body.minors,
            starts=body.starts,
            duration_s=body.duration_s,
            relay_only=body.relay_only,
            group_link=body.group_link,
        )
        return web.json_response(
            {
                "session": session.id,
                "base_url": base_url,
                "starts": session.starts,
                "not_before": session.not_before,
                "expires": session.expires,
                "media": session.media,
                "seats": [
                    {"peer": s.id, "role": s.role.value, "minor": s.minor, "token": tokens[s.id]} for s in session.seats
                ],
                "group_token": tokens.get("group"),
            }
        )

    async def revoke(request: web.Request) -> web.Response:
        reissue = request.match_info["action"] == "reissue"
        token = await hub.revoke_seat(request.match_info["session"], request.match_info["peer"], reissue=reissue)
        return web.json_response({"token": token})

    async def cancel(request: web.Request) -> web.Response:
        await hub.cancel_session(request.match_info["session"])
        return web.json_response({"ok": True})

    app = web.Application(middlewares=[authenticate], client_max_size=16 * 1024)
    app.router.add_post("/sessions", create)
    app.router.add_post("/sessions/{session}/seats/{peer}/{action:revoke|reissue}", revoke)
    app.router.add_post("/sessions/{session}/cancel", cancel)
    return app


class AdminSocketUnsafe(ConfigError):
    """The admin socket cannot be placed safely where it is configured; the message says why and what to do."""


_ADVICE = (
    "set BROKER_ADMIN_SOCKET_PATH to a path in a directory of the broker's own "
    "(the broker creates it, mode 0700, when it does not exist)"
)


def socket_directory_problem(directory: Path) -> str | None:
    """Why ``directory`` is no safe home for the admin socket, or None (also when it does not exist yet)."""
    try:
        info = os.stat(directory)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(info.st_mode):
        return f"the admin socket's directory {directory} is not a directory; {_ADVICE}."
    if info.st_uid != os.geteuid():
        return (
            f"the admin socket's directory {directory} belongs to another user, who could replace the socket; "
            f"{_ADVICE}."
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (
            f"the admin socket's directory {directory} can be written by other users "
            f"(mode {stat.S_IMODE(info.st_mode):o}), so someone else could put their own socket in its place "
            f"and collect the admin key; {_ADVICE}."
        )
    return None


def prepare_socket_path(path: Path) -> None:
    """Make the socket's directory (0700) if absent, refuse an unsafe one, remove our own stale socket."""
    directory = path.parent
    directory.parent.mkdir(parents=True, exist_ok=True)
    try:
        directory.mkdir(mode=0o700)
        os.chmod(directory, 0o700)  # ours: made just now (mkdir's mode is narrowed by the umask)
    except FileExistsError:
        pass
    problem = socket_directory_problem(directory)
    if problem:
        raise AdminSocketUnsafe(problem)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode) or info.st_uid != os.geteuid():
        raise AdminSocketUnsafe(f"{path} exists and is not a socket a broker left behind: remove it, or {_ADVICE}.")
    path.unlink()  # a socket left by a broker that stopped without cleaning up


async def start_admin_site(app: web.Application, runner: web.AppRunner, config: Config) -> web.UnixSite:
    path = config.admin_socket
    prepare_socket_path(path)
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
                    data: dict[str, Any] = await response.json(content_type=None)
        except aiohttp.ClientConnectionError:
            raise AdminError(
                f"The broker on {self.config.data_dir} is not answering (it may have stopped). "
                "Start it with 'broker serve' and try again."
            ) from None
        except ValueError:  # not JSON: a fault inside the broker, reported in its log
            raise AdminError(
                f"The broker on {self.config.data_dir} failed to answer the request (HTTP {response.status}); "
                "nothing was changed. Its log says why."
            ) from None
        if not isinstance(data, dict):
            raise AdminError("The broker answered something this command does not understand.")
        if response.status != 200:
            raise AdminError(data.get("message", "The broker refused the request."))
        return data

    async def create_session(self, *, group_link: bool = False, **fields: Any) -> dict[str, Any]:
        """Schedule a session (fields of ``CreateRequest``). With ``group_link`` the answer's
        ``group_token`` is one link's token for every client; else it is null."""
        return await self.request("POST", "/sessions", {**fields, "group_link": group_link})

    async def cancel(self, session: str) -> dict[str, Any]:
        return await self.request("POST", f"/sessions/{session}/cancel")

    async def revoke(self, session: str, peer: str, *, reissue: bool = False) -> dict[str, Any]:
        action = "reissue" if reissue else "revoke"
        return await self.request("POST", f"/sessions/{session}/seats/{peer}/{action}")
