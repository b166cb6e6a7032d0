"""Two broker processes on one Redis share therapist accounts, login sessions and login throttling.

Both brokers run in this process with their own ``create_broker`` (their own Redis clients, as
two processes would have) against a real redis-server, with one server secret between them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import ClientSession, DummyCookieJar

from broker.accounts.rows_redis import RedisAccountRows
from broker.accounts.throttle_redis import RedisLoginThrottle
from broker.http.login_sessions import LOGIN_COOKIE
from tests.conftest import RunningBroker, start_broker, start_broker_pair
from tests.redis_server import RedisServer, redis_server  # noqa: F401 - the fixture

pytestmark = pytest.mark.asyncio(loop_scope="session")

ORIGIN = "http://portal.test"
PASSWORD = "harbour lantern meadow 2231"
DB = 9


@pytest_asyncio.fixture(loop_scope="session")
async def pair(redis_server: RedisServer, tmp_path: Path) -> AsyncIterator[tuple[RunningBroker, RunningBroker]]:  # noqa: F811
    one, two = await start_broker_pair(tmp_path, redis_server.empty_database(DB), allowed_origins=(ORIGIN,))
    yield one, two
    await one.stop()
    await two.stop()


async def post_login(http: ClientSession, broker: RunningBroker, password: str) -> tuple[int, dict[str, Any], str]:
    async with http.post(
        broker.url + "/api/login", json={"username": "casey", "password": password}, headers={"Origin": ORIGIN}
    ) as r:
        cookie = r.cookies.get(LOGIN_COOKIE)
        return r.status, await r.json(), cookie.value if cookie else ""


async def test_accounts_sessions_and_throttle_are_shared(pair: tuple[RunningBroker, RunningBroker]) -> None:
    one, two = pair
    assert isinstance(one.broker.accounts.rows, RedisAccountRows)
    assert isinstance(two.broker.throttle, RedisLoginThrottle)
    assert not (Path(one.config.data_dir) / "accounts.sqlite3").exists()
    await one.broker.accounts.add("casey", PASSWORD)

    async with ClientSession(cookie_jar=DummyCookieJar()) as http:
        # Added through one process, logs in through the other; the session works on both.
        status, body, cookie = await post_login(http, two, PASSWORD)
        assert status == 200, body
        for broker in (one, two):
            async with http.get(broker.url + "/api/me", headers={"Cookie": f"{LOGIN_COOKIE}={cookie}"}) as r:
                assert r.status == 200

        # Failures spread over both processes are counted together: three are free, then each earns a
        # doubling delay (from 1 s), and an attempt inside it is refused whichever process it reaches.
        # A loaded machine may let a 1 s delay pass between two requests, so the attempts go on until
        # one is refused, but by the eighth at the latest: with counters kept apart, neither process
        # would have seen more than three failures of its own before then.
        answers = []
        for i in range(8):
            status, body, _ = await post_login(http, (one, two)[i % 2], f"a wrong password, attempt {i}")
            answers.append((status, body["error"]))
            if status == 429:
                break
        failed = answers[:-1]
        assert len(failed) >= 4 and failed == [(401, "invalid_credentials")] * len(failed)
        assert answers[-1] == (429, "too_many_attempts")
    account = await two.broker.accounts.get_by_username("casey")
    assert account is not None
    row = await two.broker.accounts.rows.by_id(account.id)
    assert row is not None and row["failures"] == len(failed)  # the refused attempt was not counted


async def test_redis_away_answers_503_on_every_api_route(tmp_path: Path) -> None:
    """With the Redis down, the login API says "briefly unavailable" (JSON 503), never a 500."""
    dead = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    running = await start_broker(tmp_path, redis_url=dead, allowed_origins=(ORIGIN,))
    try:
        async with ClientSession(cookie_jar=DummyCookieJar()) as http:
            calls = [
                ("POST", "/api/login", {"username": "casey", "password": PASSWORD}),
                ("POST", "/api/logout", {}),
                ("POST", "/api/2fa/enrol", {}),
                ("POST", "/api/passkeys/options", {}),
                ("POST", "/api/sessions", {}),
                ("GET", "/api/me", None),
                ("GET", "/api/sessions", None),
            ]
            for method, path, body in calls:
                headers = {"Origin": ORIGIN, "Cookie": f"{LOGIN_COOKIE}=some-old-session-id"}
                async with http.request(method, running.url + path, json=body, headers=headers) as r:
                    assert r.status == 503, (method, path, r.status, await r.text())
                    assert (await r.json())["error"] == "unavailable"
    finally:
        await running.stop()
