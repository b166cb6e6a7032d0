"""Arrivals pushed to the dashboard (docs/protocol.md 15.20 ``GET /api/arrivals``): a logged-in
therapist's stream hears at once that a client waits in one of their sessions (opaque ids and
counts only), another therapist's stream hears nothing of it, a logged-out stream ends, and on
Redis the count crosses between broker processes.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import ClientSession, DummyCookieJar

from broker.crypto.link_key import new_link_key
from tests.client.test_client import waiting_client
from tests.conftest import SessionLinks, client_link_key
from tests.http.test_dashboard import Therapist, login
from tests.http.test_web_auth import PASSWORD, FullBroker, start_full_broker
from tests.redis_server import RedisServer, redis_server  # noqa: F401 - the fixture

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def full(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[FullBroker]:
    running = await start_full_broker(tmp_path_factory.mktemp("arrivals"))
    for name in ("alex", "blair"):
        await running.auth.accounts.add(name, PASSWORD)
    yield running
    await running.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def http() -> AsyncIterator[ClientSession]:
    async with ClientSession(cookie_jar=DummyCookieJar()) as session:
        yield session


class Stream:
    """The arrivals stream as the dashboard reads it (``fetch`` with X-Broker-Background: 1)."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response

    @classmethod
    async def open(cls, therapist: Therapist) -> Stream:
        headers = {"Cookie": f"__Host-broker_login={therapist.cookie}", "X-Broker-Background": "1"}
        response = await therapist.http.get(therapist.full.url + "/api/arrivals", headers=headers)
        assert response.status == 200 and response.content_type == "text/event-stream"
        return cls(response)

    async def event(self, timeout: float = 5.0) -> dict[str, Any] | None:
        """The next event (comments skipped); None when the stream ended."""
        deadline = time.monotonic() + timeout
        while True:
            line = await asyncio.wait_for(self.response.content.readline(), max(0.01, deadline - time.monotonic()))
            if not line:
                return None
            if line.startswith(b"data: "):
                event: dict[str, Any] = json.loads(line[6:])
                return event

    async def until(self, session: str, waiting: int, timeout: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            event = await self.event(max(0.01, deadline - time.monotonic()))
            assert event is not None, "the stream ended"
            assert set(event) == {"session", "waiting"}  # opaque ids and counts, nothing else
            if event == {"session": session, "waiting": waiting}:
                return event

    def close(self) -> None:
        self.response.close()


async def scheduled(therapist: Therapist, clients: int = 1) -> SessionLinks:
    """A session scheduled from the dashboard API, with links as the page assembles them."""
    status, created = await therapist.call("POST", "/api/sessions", {"clients": clients})
    assert status == 200, created
    secret, session, url = new_link_key(), created["session"], therapist.full.url
    seats = created["seats"]
    keys = {s["peer"]: client_link_key(secret, session, s["peer"]) for s in seats if s["role"] == "client"}
    links = {
        s["peer"]: f"{url}/{'t' if s['role'] == 'therapist' else 'j'}/{s['token']}#{keys.get(s['peer'], secret)}"
        for s in seats
    }
    therapist_peer = next(s["peer"] for s in seats if s["role"] == "therapist")
    return SessionLinks(
        session=session,
        link_key=secret,
        therapist=links[therapist_peer],
        clients=[links[p] for p in keys],
        peers={link: peer for peer, link in links.items()},
        tokens={s["peer"]: s["token"] for s in seats},
        seat_keys=keys,
    )


async def test_a_waiting_client_is_pushed_to_the_owner_only(full: FullBroker, http: ClientSession) -> None:
    alex, blair = await login(full, http, "alex"), await login(full, http, "blair")
    links = await scheduled(alex)
    alex_stream, blair_stream = await Stream.open(alex), await Stream.open(blair)
    try:
        assert await alex_stream.until(links.session, 0)  # the snapshot of every open session
        client = await waiting_client(links)
        await alex_stream.until(links.session, 1)
        await client.leave()
        await alex_stream.until(links.session, 0)
        # Blair's stream carries nothing about Alex's session (only keepalives, if anything).
        with pytest.raises(TimeoutError):
            while True:
                event = await blair_stream.event(timeout=0.5)
                assert event is None or event["session"] != links.session
    finally:
        alex_stream.close()
        blair_stream.close()


async def test_no_stream_without_login_and_a_logged_out_stream_ends(full: FullBroker, http: ClientSession) -> None:
    async with http.get(full.url + "/api/arrivals") as r:
        assert r.status == 401 and (await r.json())["error"] == "login_required"
    alex = await login(full, http, "alex")
    links = await scheduled(alex)
    stream = await Stream.open(alex)
    try:
        await stream.until(links.session, 0)
        status, _ = await alex.call("POST", "/api/logout", {})
        assert status == 200
        client = await waiting_client(links)  # a change after the logout: not delivered, the stream ends
        assert await stream.event() is None
        await client.close()
    finally:
        stream.close()


async def test_arrivals_cross_broker_processes_on_redis(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    """The dashboard's stream on one process, the client on another: the count still arrives."""
    secret = tmp_path / "server.secret"
    secret.write_text("ab" * 32)
    secret.chmod(0o600)
    url = redis_server.empty_database()
    a = await start_full_broker(tmp_path / "a", redis_url=url, secret_file=str(secret))
    b = await start_full_broker(tmp_path / "b", redis_url=url, secret_file=str(secret))
    try:
        await a.auth.accounts.add("casey", PASSWORD)
        async with ClientSession(cookie_jar=DummyCookieJar()) as http:
            casey = await login(a, http, "casey")
            links = await scheduled(casey)
            stream = await Stream.open(casey)
            try:
                await stream.until(links.session, 0)
                client = await waiting_client(links, link=links.clients[0].replace(a.url, b.url))
                await stream.until(links.session, 1)
                await client.close()
            finally:
                stream.close()
    finally:
        await a.stop()
        await b.stop()
