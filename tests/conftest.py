"""Shared fixtures: one real broker per test session, and helpers to schedule sessions on it."""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import ClientWebSocketResponse, WSMsgType, web

from broker.config import Config
from broker.crypto.link_key import b64url_encode, decode_link_key, new_link_key
from broker.crypto.seat_keys import seat_key
from broker.http.app import Broker, build_app, create_broker
from broker.http.security_headers import PrivateAccessLogger


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RunningBroker:
    url: str
    broker: Broker
    config: Config
    runner: web.AppRunner

    @property
    def hub(self):  # noqa: ANN201 - the Hub, typed in broker.hub
        return self.broker.hub

    async def stop(self) -> None:
        await self.broker.hub.shutdown(after_ms=0)
        await self.runner.cleanup()
        await self.broker.close()


@dataclass
class SessionLinks:
    """A scheduled session as the therapist's side sees it: each link carries its own key.

    ``link_key`` is the session secret (the therapist's link); ``seat_keys`` the key each
    client seat's link carries (docs/protocol.md 7.1).
    """

    session: str
    link_key: str
    therapist: str
    clients: list[str]
    peers: dict[str, str]  # link -> peer id
    tokens: dict[str, str]  # peer id -> invite token
    seat_keys: dict[str, str]  # client peer id -> its seat key

    @property
    def secrets(self) -> list[str]:
        """Every key a link of this session carries: none may reach the broker."""
        return [self.link_key, *self.seat_keys.values()]

    @property
    def client(self) -> str:
        return self.clients[0]


async def read_until_broker_closes(
    ws: ClientWebSocketResponse, timeout: float | None = 30
) -> tuple[list[str], int | None]:
    """The text frames a socket receives until it closes, and the code the broker closed it with.

    The code comes from the broker's close frame, not from ``ws.close_code``: aiohttp's server
    drops the connection right after sending its close frame, and when the client's answering
    frame then cannot be written, aiohttp's client replaces the code it received with 1006.
    A browser reports the received code (RFC 6455, 7.1.5), and so do these tests.
    """
    texts: list[str] = []
    while True:
        msg = await ws.receive(timeout=timeout)
        if msg.type is WSMsgType.TEXT:
            texts.append(msg.data)
        elif msg.type is WSMsgType.CLOSE:
            return texts, msg.data
        elif msg.type in (WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
            return texts, ws.close_code


async def start_broker(data_dir: Path, **overrides: object) -> RunningBroker:
    """A real broker (in this process, on the test loop) on a free loopback port."""
    port = free_port()
    settings: dict[str, object] = {
        "data_dir": data_dir,
        "host": "127.0.0.1",
        "port": port,
        "max_connections_per_address": 2000,
    }
    settings.update(overrides)
    config = dataclasses.replace(Config(), **settings)  # type: ignore[arg-type]
    broker = await create_broker(config)
    runner = web.AppRunner(build_app(broker), access_log_class=PrivateAccessLogger)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return RunningBroker(f"http://127.0.0.1:{port}", broker, config, runner)


async def start_broker_pair(tmp_path: Path, redis_url: str, **overrides: object) -> tuple[RunningBroker, RunningBroker]:
    """Two brokers of one installation (one server secret) on one Redis, as two processes would be."""
    secret = tmp_path / "server.secret"
    secret.write_text(os.urandom(32).hex())
    secret.chmod(0o600)
    common: dict[str, object] = {"redis_url": redis_url, "secret_file": str(secret), **overrides}
    return await start_broker(tmp_path / "a", **common), await start_broker(tmp_path / "b", **common)


def client_link_key(secret: str, session: str, peer: str) -> str:
    """The key a client seat's link carries: its seat key, from the session secret (protocol 7.1)."""
    return b64url_encode(seat_key(decode_link_key(secret), session, peer))


async def schedule(running: RunningBroker, clients: int = 1, **kwargs: object) -> SessionLinks:
    """Schedule a session the way the CLI does: a fresh session secret, and a seat key per client link."""
    session, tokens = await running.hub.create_session(clients=clients, **kwargs)
    secret = new_link_key()
    therapist = session.therapist()
    seat_keys = {seat.id: client_link_key(secret, session.id, seat.id) for seat in session.clients()}
    links = {
        seat.id: f"{running.url}/{'t' if seat is therapist else 'j'}/{tokens[seat.id]}#{seat_keys.get(seat.id, secret)}"
        for seat in session.seats
    }
    return SessionLinks(
        session=session.id,
        link_key=secret,
        therapist=links[therapist.id],
        clients=[links[s.id] for s in session.clients()],
        peers={link: peer for peer, link in links.items()},
        tokens=tokens,
        seat_keys=seat_keys,
    )


@pytest.fixture(scope="session")
async def broker(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningBroker]:
    running = await start_broker(tmp_path_factory.mktemp("broker-data"))
    yield running
    await running.stop()
