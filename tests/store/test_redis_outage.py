"""Every Redis fault ends in a clear answer: real broker processes on a real redis-server of their own.

Redis stopped: link pages and the dashboard answer the 503 notice, the JSON API 503
``unavailable``, the CLI one line and a non-zero exit. Redis hung (SIGSTOP): a join is answered
within a second. Redis killed and started again with the persistence the deployment files
prescribe: a scheduled link still works. Redis started again empty: the link page says the
session could not be found, /readyz and the log report it; a first start on an empty Redis does not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from broker.config import Keys
from broker.signaling.hub import Hub
from broker.signaling.tokens import TokenCodec
from broker.store.backends import connect_redis
from tests.notice_page import check_notice
from tests.redis_server import RedisServer, free_port
from tests.store.test_redis_cluster import BrokerProcess, Wire

pytestmark = pytest.mark.redis

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "deploy" / "compose.yaml"


def prescribed_persistence() -> tuple[str, ...]:
    """The session Redis's persistence options as deploy/compose.yaml gives them (tests/test_deploy.py
    checks the Kubernetes manifest gives the same)."""
    entrypoint = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))["services"]["redis"]["entrypoint"]
    words = shlex.split(entrypoint[-1].split("exec redis-server", 1)[1])
    options: list[str] = []
    for name in ("--save", "--appendonly", "--appendfsync"):
        if name in words:
            options += [name, words[words.index(name) + 1]]
    return tuple(options)


@dataclass
class Deployment:
    redis: RedisServer
    brokers: list[BrokerProcess]
    secret: bytes

    async def schedule(self) -> tuple[str, str]:
        """A session scheduled through the shared store, as the CLI would: (therapist token, client token)."""
        keys = Keys(self.secret)
        store, bus = await connect_redis(self.redis.url, keys.store)
        try:
            session, tokens = await Hub(store, bus, TokenCodec(keys.token)).create_session(clients=1)
        finally:
            await bus.close()
            await store.close()
        return tokens[session.therapist().id], tokens[session.clients()[0].id]

    def cli(self, *args: str, broker: int = 0) -> subprocess.CompletedProcess[str]:
        process = self.brokers[broker]
        return subprocess.run(
            [sys.executable, "-m", "broker", *args, "--data-dir", str(process.data_dir)],
            env=process.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def log(self, broker: int = 0) -> str:
        process = self.brokers[broker]
        return (process.data_dir / f"broker-{process.name}.log").read_text(encoding="utf-8", errors="replace")


async def start_deployment(root: Path, *, brokers: int = 1, persistence: tuple[str, ...] | None = None) -> Deployment:
    """A redis-server and ``brokers`` broker processes of one installation, all started at once."""
    redis = RedisServer(free_port(), root / "redis")
    redis.workdir.mkdir()
    if persistence is not None:
        redis.persistence = persistence
    redis.start()
    secret = os.urandom(32)
    secret_file = root / "server.secret"
    secret_file.write_text(secret.hex() + "\n")
    secret_file.chmod(0o600)
    env = {
        **os.environ,
        "BROKER_REDIS_URL": redis.url,
        "BROKER_SECRET_FILE": str(secret_file),
        "BROKER_LOG_LEVEL": "warning",
        "PYTHONPATH": str(REPO),
    }
    processes = []
    for name in "abcdefgh"[:brokers]:
        data_dir = root / f"data-{name}"
        data_dir.mkdir(mode=0o700)
        processes.append(BrokerProcess(name, free_port(), data_dir, env))
    for process in processes:
        process.start()
    deployment = Deployment(redis, processes, secret)
    await asyncio.gather(*(p.wait_ready() for p in processes))
    return deployment


@pytest.fixture
async def deployment(tmp_path: Path) -> AsyncIterator[Deployment]:
    made = await start_deployment(tmp_path)
    try:
        yield made
    finally:
        await stop_deployment(made)


async def stop_deployment(deployment: Deployment) -> None:
    if deployment.redis.running:
        assert deployment.redis.pid is not None
        os.kill(deployment.redis.pid, signal.SIGCONT)  # in case a test left it stopped
    for process in deployment.brokers:
        process.stop()
    deployment.redis.stop()


async def get(url: str, **kwargs: Any) -> tuple[int, str, str]:
    """(status, content type, body) of one GET, following no redirect."""
    async with aiohttp.ClientSession() as http:
        async with http.get(url, allow_redirects=False, timeout=aiohttp.ClientTimeout(total=10), **kwargs) as response:
            return response.status, response.content_type, await response.text()


async def readyz(broker: BrokerProcess) -> tuple[int, dict[str, Any]]:
    status, _, body = await get(broker.url + "/readyz")
    return status, json.loads(body)


async def join(broker: BrokerProcess, token: str) -> tuple[dict[str, Any], float]:
    """A bare WebSocket join: the broker's answer and how long it took, from the join to the answer."""
    async with aiohttp.ClientSession() as http:
        wire = await Wire.open(http, broker.url)
        try:
            await wire.send(type="hello", protocol=1)
            await wire.recv_until(lambda m: m["type"] == "welcome")
            started = time.monotonic()
            await wire.send(type="join", token=token)
            reply = await wire.recv_until(lambda m: m["type"] in ("joined", "error"), timeout=10)
            return reply, time.monotonic() - started
        finally:
            await wire.close()


async def wait_for(predicate: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "not within the deadline"
        await asyncio.sleep(0.1)


# ---------------------------------------------------------------- Redis down


async def test_pages_answer_the_503_notice_and_the_api_503_unavailable_while_redis_is_down(
    deployment: Deployment,
) -> None:
    therapist_token, client_token = await deployment.schedule()
    broker = deployment.brokers[0]
    deployment.redis.stop()
    for path in (f"/j/{client_token}", f"/t/{therapist_token}"):
        status, kind, body = await get(broker.url + path)
        assert (status, kind) == (503, "text/html"), (path, status, body[:200])
        assert 'data-code="unavailable"' in body and "Please try again in a moment" in body
        check_notice(body, "unavailable")
    # The dashboard with a login cookie (its login session is looked up in the store).
    cookie = {"Cookie": "__Host-broker_login=" + "A" * 43}
    status, kind, body = await get(broker.url + "/dashboard", headers=cookie)
    assert (status, kind) == (503, "text/html") and 'data-code="unavailable"' in body, (status, body[:200])
    status, kind, body = await get(broker.url + "/api/sessions", headers=cookie)
    assert (status, kind) == (503, "application/json")
    assert json.loads(body)["error"] == "unavailable"
    assert "Internal Server Error" not in deployment.log()


async def test_the_cli_prints_one_line_and_exits_non_zero_while_redis_is_down(deployment: Deployment) -> None:
    deployment.redis.stop()
    for command in (("session", "create"), ("therapist", "list")):
        result = deployment.cli(*command)
        assert result.returncode != 0, command
        errors = [line for line in result.stderr.splitlines() if " WARNING " not in line]  # log lines aside
        assert len(errors) == 1, (command, result.stderr)
        assert errors[0].startswith("Error: ") and "Redis" in errors[0] and "try again" in errors[0]
        assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- Redis hung


async def test_a_hung_redis_answers_joins_and_link_pages_within_a_second(deployment: Deployment) -> None:
    _, client_token = await deployment.schedule()
    broker = deployment.brokers[0]
    assert deployment.redis.pid is not None
    os.kill(deployment.redis.pid, signal.SIGSTOP)
    try:
        for _ in range(3):
            reply, took = await join(broker, client_token)
            assert reply["type"] == "error" and reply["code"] == "unavailable", reply
            assert took < 1.0, f"a join to a hung Redis took {took:.2f} s"
        started = time.monotonic()
        status, _, _ = await get(broker.url + f"/j/{client_token}")
        took = time.monotonic() - started
        assert status == 503 and took < 1.0, (status, took)
    finally:
        os.kill(deployment.redis.pid, signal.SIGCONT)


# ---------------------------------------------------------------- Redis restarted


async def test_a_redis_killed_and_restarted_with_the_prescribed_persistence_keeps_a_scheduled_link(
    tmp_path: Path,
) -> None:
    made = await start_deployment(tmp_path, persistence=prescribed_persistence())
    try:
        broker = made.brokers[0]
        _, client_token = await made.schedule()
        await asyncio.sleep(1.5)  # appendfsync everysec: what was scheduled a second ago is on disk
        assert made.redis.process is not None
        made.redis.process.kill()  # a crash, not a clean shutdown
        made.redis.process.wait(10)
        made.redis.process = None
        made.redis.start()
        await wait_for(lambda: _ready(broker), 20)
        status, _, body = await get(broker.url + f"/j/{client_token}")
        assert status == 200, body[:300]
        reply, _ = await join(broker, client_token)
        assert reply["type"] == "joined", reply
        assert (await readyz(broker))[1]["store_emptied_at"] is None  # the mark survived too
    finally:
        await stop_deployment(made)


async def _ready(broker: BrokerProcess) -> bool:
    with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
        return (await readyz(broker))[0] == 200
    return False


async def test_a_redis_restarted_empty_is_reported_and_links_say_so_plainly(tmp_path: Path) -> None:
    # Three processes starting at once on a Redis that never held anything: a first start, not a loss.
    made = await start_deployment(tmp_path, brokers=3)
    try:
        for broker in made.brokers:
            status, body = await readyz(broker)
            assert status == 200 and body["store_emptied_at"] is None, body
        with made.redis.client() as raw:
            assert raw.exists("deployment:mark") == 1
        therapist_token, client_token = await made.schedule()
        a, b, _ = made.brokers
        assert (await join(a, client_token))[0]["type"] == "joined"

        before = time.time()
        made.redis.restart()  # no snapshot, no append-only file: it comes back empty
        # At once, before any process's periodic look at the mark: the link page finds out itself.
        status, kind, body = await get(a.url + f"/j/{client_token}")
        assert (status, kind) == (404, "text/html"), body[:300]
        assert 'data-code="session_not_found"' in body
        assert "This session could not be found" in body and "ask your therapist for a new link" in body
        check_notice(body, "session_not_found")
        assert "replaced" not in body and "revoked" not in body
        status, _, body = await get(a.url + f"/t/{therapist_token}")
        assert status == 404 and 'data-code="session_not_found"' in body

        async def all_report() -> bool:
            answers = [await readyz(broker) for broker in made.brokers]
            return all(s == 200 and (body["store_emptied_at"] or 0) >= int(before) for s, body in answers)

        await wait_for(all_report, 5)
        # A join on another process: the same plain answer, as a protocol error code.
        reply, _ = await join(b, client_token)
        assert reply["type"] == "error" and reply["code"] == "session_not_found", reply
        assert "contact your therapist" in reply["message"]
        for index in range(len(made.brokers)):
            assert "event=session_store_emptied" in made.log(index)
        # New sessions work as before.
        _, fresh = await made.schedule()
        assert (await join(b, fresh))[0]["type"] == "joined"
    finally:
        await stop_deployment(made)


async def test_a_join_just_after_redis_came_back_empty_is_told_plainly(tmp_path: Path) -> None:
    """A page whose connection dropped rejoins at once: before any process's periodic look at the
    mark, the join itself looks (it was answered ``invalid_token`` before, and the page then said
    "This link no longer works ... your therapist replaced your link")."""
    made = await start_deployment(tmp_path, brokers=2)
    try:
        _, client_token = await made.schedule()
        for broker in made.brokers:
            assert (await join(broker, client_token))[0]["type"] == "joined"
        made.redis.restart()  # no snapshot, no append-only file: it comes back empty
        for broker in made.brokers:
            reply, _ = await join(broker, client_token)
            assert reply["type"] == "error" and reply["code"] == "session_not_found", reply
    finally:
        await stop_deployment(made)


async def test_a_broker_restarted_together_with_an_emptied_redis_still_reports_it(tmp_path: Path) -> None:
    """A host reboot without the session data: the broker's data directory remembers the mark."""
    made = await start_deployment(tmp_path)
    try:
        broker = made.brokers[0]
        _, client_token = await made.schedule()
        broker.stop()
        made.redis.restart()
        broker.start()
        await broker.wait_ready()
        await wait_for(lambda: _reports_emptied(broker), 5)
        status, _, body = await get(broker.url + f"/j/{client_token}")
        assert status == 404 and 'data-code="session_not_found"' in body
    finally:
        await stop_deployment(made)


async def _reports_emptied(broker: BrokerProcess) -> bool:
    return (await readyz(broker))[1].get("store_emptied_at") is not None
