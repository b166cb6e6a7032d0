"""Every page for a link or an address that cannot be used has the normal page layout (title,
language, one header, one heading, one sentence), its status and code, and the security headers.
The store outage (503) and the lost session (session_not_found) are checked against a real Redis in
tests/store/test_redis_outage.py with the same checker."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio

from tests.conftest import RunningBroker, schedule
from tests.http.test_security_headers import check_caching, check_headers
from tests.notice_page import check_notice

pytestmark = pytest.mark.asyncio(loop_scope="session")

DAY = 86400


@pytest_asyncio.fixture(loop_scope="session")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def fetch(http: aiohttp.ClientSession, url: str) -> tuple[int, str, str]:
    async with http.get(url, allow_redirects=False) as response:
        what = f"GET {url} -> {response.status}"
        check_headers(response.headers, what)
        check_caching(response.status, response.headers, what)
        return response.status, response.content_type, await response.text()


async def test_a_link_that_does_not_work(broker: RunningBroker, http: aiohttp.ClientSession) -> None:
    links = await schedule(broker)
    client_token = links.tokens[links.peers[links.clients[0]]]
    forged = "A" * 68
    answers = []
    for path in (f"/j/{forged}", f"/t/{forged}", f"/t/{client_token}"):  # the last: a client's token on /t/
        status, kind, body = await fetch(http, broker.url + path)
        assert (status, kind) == (404, "text/html"), path
        shape = check_notice(body, "invalid_token")
        assert shape.heading == "This link does not work"
        answers.append(body)
    assert len(set(answers)) == 1, "an unknown, a forged and a misused token get byte-identical pages"


@pytest.mark.parametrize(
    ("shift", "status", "code", "title"),
    [
        (+30 * DAY, 410, "token_expired", "This link has expired"),
        (-30 * DAY, 425, "token_not_yet_valid", "It is a little early"),
    ],
)
async def test_a_link_outside_its_window(
    shift: int, status: int, code: str, title: str, broker: RunningBroker, http: aiohttp.ClientSession
) -> None:
    links = await schedule(broker)
    hub = broker.hub
    real_clock = hub.clock
    hub.clock = lambda: time.time() + shift
    try:
        for link in (links.clients[0], links.therapist):
            got, kind, body = await fetch(http, link.partition("#")[0])
            assert (got, kind) == (status, "text/html"), link
            assert check_notice(body, code).heading == title
    finally:
        hub.clock = real_clock


@pytest.mark.parametrize("path", ["/j/", "/t/", "/no/such/page", "/j/a/b", "/dashboard/x"])
async def test_an_address_that_names_nothing(path: str, broker: RunningBroker, http: aiohttp.ClientSession) -> None:
    status, kind, body = await fetch(http, broker.url + path)
    assert (status, kind) == (404, "text/html"), path
    assert check_notice(body, "not_found").heading == "Page not found"


async def test_the_api_keeps_its_own_answer_for_unknown_paths(
    broker: RunningBroker, http: aiohttp.ClientSession
) -> None:
    async with http.get(broker.url + "/api/no-such-route") as response:
        assert response.status == 404
        assert response.content_type == "text/plain"  # as the API's contract says (docs/openapi.json)
