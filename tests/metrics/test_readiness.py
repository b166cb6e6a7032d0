"""The metrics the alert rules watch for /readyz (issue 35, item 4): ready or not, and a Redis that came back empty.

A real broker on a real redis-server of its own: ``broker_ready`` follows /readyz through an
outage (Redis stopped, then started again empty), and ``broker_store_emptied_timestamp_seconds``
turns from 0 into the time /readyz reports as ``store_emptied_at``.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import RunningBroker, start_broker
from tests.metrics.test_metrics import Scrape, parse
from tests.redis_server import RedisServer, free_port


async def readyz(running: RunningBroker) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(running.url + "/readyz") as response:
        return response.status, await response.json()


async def scraped(running: RunningBroker) -> Scrape:
    return parse((await running.broker.metrics.scrape()).decode())


async def both_until(running: RunningBroker, wanted: Any, timeout: float = 10) -> tuple[int, dict[str, Any], Scrape]:
    """/readyz and a scrape, taken together, until ``wanted(status, body, scrape)`` holds."""
    deadline = time.monotonic() + timeout
    while True:
        status, body = await readyz(running)
        metrics = await scraped(running)
        if wanted(status, body, metrics):
            return status, body, metrics
        assert time.monotonic() < deadline, (status, body, metrics.text[-600:])
        await asyncio.sleep(0.1)


@pytest.mark.redis
async def test_broker_ready_and_the_emptied_store_follow_readyz_through_a_redis_outage(tmp_path: Path) -> None:
    redis = RedisServer(free_port(), tmp_path / "redis")
    redis.workdir.mkdir()
    redis.start()
    secret = tmp_path / "server.secret"
    secret.write_text(os.urandom(32).hex())
    secret.chmod(0o600)
    running = await start_broker(tmp_path / "data", redis_url=redis.url, secret_file=str(secret))
    try:
        # A first start on an empty Redis: ready, and nothing was lost.
        status, body, metrics = await both_until(running, lambda s, b, m: s == 200)
        assert body["store_emptied_at"] is None
        assert metrics.value("broker_ready") == 1
        assert metrics.value("broker_store_emptied_timestamp_seconds") == 0

        # Redis away: /readyz answers 503 and the gauge says 0.
        redis.stop()
        status, body, metrics = await both_until(running, lambda s, b, m: s == 503)
        assert metrics.value("broker_ready") == 0, metrics.text

        # Back, without its data: ready again, and the time it was found emptied is exported.
        before = int(time.time())
        redis.start()
        status, body, metrics = await both_until(
            running, lambda s, b, m: s == 200 and b["store_emptied_at"] is not None and m.value("broker_ready") == 1
        )
        assert body["store_emptied_at"] >= before
        assert metrics.value("broker_store_emptied_timestamp_seconds") == body["store_emptied_at"]
    finally:
        await running.stop()
        redis.stop()


async def test_a_broker_without_redis_is_ready_and_reports_no_emptied_store(tmp_path: Path) -> None:
    """The embedded store cannot come back empty: the gauge is exported, at 0."""
    running = await start_broker(tmp_path)
    try:
        status, _ = await readyz(running)
        metrics = await scraped(running)
    finally:
        await running.stop()
    assert status == 200
    assert metrics.value("broker_ready") == 1
    assert "broker_store_emptied_timestamp_seconds" in metrics.families
    assert metrics.value("broker_store_emptied_timestamp_seconds") == 0
