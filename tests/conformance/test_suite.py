"""``broker conformance`` against our own broker, on the embedded store and on Redis: every rule
passes and the count is printed; a broker patched to break one rule makes the suite fail on it.

The brokers are real (tests/conftest.py ``start_broker``, with the admin socket ``broker serve``
opens), and sessions are scheduled through that socket, as an operator running the suite would.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import web

from broker.cli.main import main
from broker.conformance.sessions import AdminSessions
from broker.conformance.suite import SCENARIOS, run_suite, select
from broker.conformance.wire import Target
from broker.http.admin_socket import admin_app, start_admin_site
from broker.signaling.protocol import encode
from broker.signaling.relay import Relays
from broker.store.bus import Envelope
from tests.conftest import RunningBroker, start_broker
from tests.redis_server import RedisServer, redis_server  # noqa: F401 - the fixture

ROOT = Path(__file__).resolve().parents[2]
RULES = sum(len(s.rules) for s in SCENARIOS)
SUMMARY = re.compile(r"^(\d+) of (\d+) rules passed, (\d+) failed", re.MULTILINE)


async def with_admin_socket(running: RunningBroker) -> web.AppRunner:
    """The admin socket ``broker serve`` opens next to the broker (broker/http/serve.py)."""
    runner = web.AppRunner(admin_app(running.hub, running.broker.keys, running.url), access_log=None)
    await runner.setup()
    await start_admin_site(runner.app, runner, running.config)
    return runner


async def serving(data_dir: Path, **overrides: Any) -> AsyncIterator[RunningBroker]:
    running = await start_broker(data_dir, **overrides)
    admin = await with_admin_socket(running)
    try:
        yield running
    finally:
        await admin.cleanup()
        await running.stop()


@pytest.fixture(scope="module")
async def embedded(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningBroker]:
    async for running in serving(tmp_path_factory.mktemp("conformance")):
        yield running


async def run_in_process(running: RunningBroker, only: tuple[str, ...] = ()) -> tuple[str, int]:
    out = io.StringIO()
    sessions = AdminSessions(str(running.config.data_dir))
    summary = await run_suite(Target.of(running.url), sessions, only=only, out=out)
    return out.getvalue(), len(summary.failed)


def assert_all_passed(text: str) -> None:
    lines = text.strip().splitlines()
    failures = [line for line in lines if not line.startswith("PASS ")][:-1]
    assert failures == [], "\n".join(failures)
    assert len(lines) == RULES + 1  # one line per rule, then the count
    found = SUMMARY.search(lines[-1])
    assert found is not None, lines[-1]
    assert found.groups() == (str(RULES), str(RULES), "0")


async def test_the_command_passes_against_our_broker_on_the_embedded_store(embedded: RunningBroker) -> None:
    """``python -m broker conformance URL --data-dir D``, as an operator runs it."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "broker",
        "conformance",
        embedded.url,
        "--data-dir",
        str(embedded.config.data_dir),
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 240)
    assert process.returncode == 0, stdout.decode() + stderr.decode()
    assert_all_passed(stdout.decode())
    assert RULES >= 80


@pytest.mark.redis
async def test_the_suite_passes_against_our_broker_on_redis(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    async for running in serving(tmp_path / "data", redis_url=redis_server.empty_database()):
        text, failed = await run_in_process(running)
        assert failed == 0, text
        assert_all_passed(text)


class TrustingRelays(Relays):
    """A broker that breaks one rule (docs/protocol.md section 3: the broker overwrites the
    ``from`` of every relayed message): it passes on the ``from`` a sender put in."""

    def checked(self, conn: Any, message: Any, session: Any) -> tuple[Any, ...]:
        checked = Relays.checked(self, conn, message, session)
        if message.from_ is None:
            return checked
        session_id, _envelope, *rest = checked
        data = encode(msgspec.structs.replace(message, id=None, seq=None))
        return (session_id, Envelope(message.to, None, data), *rest)


async def test_a_broker_that_keeps_the_senders_from_fails_that_rule(tmp_path: Path) -> None:
    async for running in serving(tmp_path / "data"):
        honest, failed = await run_in_process(running, only=("relay.",))
        assert failed == 0, honest
        running.hub.relays.__class__ = TrustingRelays
        text, failed = await run_in_process(running, only=("relay.",))
    assert failed >= 1
    lines = text.splitlines()
    assert any(line.startswith("FAIL relay.sender-overwritten: ") and "Forged00" in line for line in lines), text
    assert "PASS relay.not-offerer: " in text  # the other relay rules still hold
    found = SUMMARY.search(text)
    assert found is not None and found.group(3) == str(failed)


async def test_the_command_exits_1_when_a_rule_fails(tmp_path: Path) -> None:
    async for running in serving(tmp_path / "data"):
        running.hub.relays.__class__ = TrustingRelays
        args = ["conformance", running.url, "--data-dir", str(running.config.data_dir), "--only", "relay.sender"]
        code = await asyncio.to_thread(main, args)
    assert code == 1


def test_only_selects_the_scenarios_of_the_rules_named() -> None:
    chosen = select(["token."])
    assert chosen and all(any(r.id.startswith("token.") for r in s.rules) for s in chosen)
    assert select([]) == list(SCENARIOS)
    ids = [r.id for s in SCENARIOS for r in s.rules]
    assert len(ids) == len(set(ids))  # every rule is judged by one scenario


def test_the_command_says_why_it_cannot_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["conformance", "ftp://example", "--data-dir", str(tmp_path)]) == 2
    assert "not an http:// or https:// URL" in capsys.readouterr().err
    assert main(["conformance", "http://127.0.0.1:9", "--data-dir", str(tmp_path), "--only", "nothing."]) == 2
    assert "no rule id starts with nothing." in capsys.readouterr().err
    assert main(["conformance", "http://127.0.0.1:9", "--data-dir", str(tmp_path)]) == 2
    assert "No broker is running on the data dir" in capsys.readouterr().err
