"""The metrics an operator scrapes (issue 35, items 1 and 2): a real broker, real peers, real scrapes.

A broker process is started as a practice starts it (``python -m broker serve``) with its metrics
on an address of their own; two Python peers go through a whole session (join, pre-flight,
checklist, admission, relayed offer and answer, end) between scrapes. The documented counters and
histograms must move, the public port must not serve ``/metrics``, and nothing seen during the
run that names a session, a peer, a token or an address may appear anywhere in what is scraped.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.client.broker_client import BrokerClient
from broker.metrics.labels import ALLOWED
from broker.metrics.registry import Metrics
from broker.metrics.site import parse_address, start_metrics_site
from broker.signaling.protocol import Error, ErrorCode, WaitingRoom
from tests.conftest import free_port, start_broker_pair
from tests.redis_server import RedisServer, redis_server  # noqa: F401 - the fixture
from tests.signaling.test_hub_redis import split_call

BROKER = [sys.executable, "-m", "broker"]

#: What every scrape must hold, as docs/deploy.md documents it (the samples' family names).
DOCUMENTED = {
    "broker_sessions",
    "broker_websocket_connections",
    "broker_joins",
    "broker_admissions",
    "broker_relayed_messages",
    "broker_error_replies",
    "broker_websocket_closes",
    "broker_message_size_bytes",
    "broker_call_setup_seconds",
    "broker_preflights",
    "broker_store_command_seconds",
    "broker_store_errors",
    "broker_bus_reconnects",
    "broker_event_loop_lag_seconds",
    "broker_event_loop_stall_max_seconds",
    "broker_gc_pause_seconds",
    "process_resident_memory_bytes",
    "broker_login_attempts",
    "broker_throttled",
    "broker_ready",
    "broker_store_emptied_timestamp_seconds",
}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass
class Scrape:
    text: str
    families: set[str]
    samples: Samples

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)


def parse(text: str) -> Scrape:
    families: set[str] = set()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        families.add(family.name)
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return Scrape(text, families, samples)


async def scrape(url: str) -> Scrape:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return parse(await response.text())


def label_problems(scraped: Scrape) -> list[str]:
    """Every label that is not one of the small fixed sets (labels.ALLOWED) the rule allows."""
    problems = []
    for (name, labels), _ in scraped.samples.items():
        for label, value in labels:
            if label == "le" and name.endswith("_bucket"):
                continue  # a histogram's bucket bound: a number
            if value not in ALLOWED.get(label, frozenset()):
                problems.append(f"{name}{{{label}={value!r}}}")
    return problems


@dataclass
class Served:
    url: str
    metrics_url: str
    data_dir: Path
    process: subprocess.Popen[str]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    """``broker serve`` as a practice runs it, its metrics on a loopback address of their own."""
    port, metrics_port = free_port(), free_port()
    env = {**os.environ, "BROKER_METRICS_ADDRESS": f"127.0.0.1:{metrics_port}"}
    process = subprocess.Popen(
        [*BROKER, "serve", "--data-dir", str(tmp_path), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    assert process.stdout is not None
    banner, deadline = "", time.monotonic() + 30
    while "broker session create" not in banner:
        line = process.stdout.readline()
        if not line or time.monotonic() > deadline:
            process.kill()
            raise AssertionError("broker serve did not start:\n" + banner)
        banner += line
    import threading

    threading.Thread(target=process.stdout.read, daemon=True).start()
    yield Served(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics", tmp_path, process)
    process.terminate()
    process.wait(10)


def create_session(served: Served) -> dict[str, object]:
    result = subprocess.run(
        [*BROKER, "session", "create", "--data-dir", str(served.data_dir), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


async def test_a_whole_session_moves_the_documented_metrics_and_nothing_identifying_is_exported(
    served: Served,
) -> None:
    before = await scrape(served.metrics_url)
    assert DOCUMENTED <= before.families, DOCUMENTED - before.families

    async with aiohttp.ClientSession() as http:
        async with http.get(served.url + "/metrics") as response:
            assert response.status == 404, "the public port must not serve the metrics"
        async with http.post(
            served.url + "/api/login",
            json={"username": "nobody-here", "password": "not the password at all"},
            headers={"Origin": served.url},
        ) as response:
            assert response.status == 401

    created = create_session(served)
    links = {str(seat["role"]): str(seat["link"]) for seat in created["seats"]}  # type: ignore[attr-defined]
    therapist = BrokerClient(links["therapist"])
    await therapist.connect()
    client = BrokerClient(links["client"])
    await client.connect()
    try:
        report = await client.preflight()
        assert report.connected
        await client.send_raw('{"type": "no_such_message"}')  # one error reply: bad_message
        await client.expect(Error, where=lambda m: m.code is ErrorCode.BAD_MESSAGE)
        await client.submit_checklist(details={"location": "home", "contact": "a friend"})
        await therapist.expect(WaitingRoom, where=lambda m: any(s.peer == client.peer_id for s in m.seats))
        waiting = await scrape(served.metrics_url)
        await therapist.admit(client.peer_id)
        await therapist.wait_connected(client.peer_id)
        await client.wait_connected(therapist.peer_id)
        during = await scrape(served.metrics_url)
        identifiers = {
            therapist.session_id,
            therapist.peer_id,
            client.peer_id,
            *(link.split("#")[0].rsplit("/", 1)[1] for link in links.values()),  # the invite tokens
            *(link.split("#")[1] for link in links.values()),  # the link key
            "127.0.0.1",
            str(created.get("session", "")),
        }
        await therapist.end()
    finally:
        await client.close()
        await therapist.close()
    await asyncio.sleep(0.3)  # the broker sees both sockets close
    after = await scrape(served.metrics_url)

    # The session's phases, while it lasts, and the connections by role.
    assert waiting.value("broker_sessions", state="waiting") == 1
    assert during.value("broker_sessions", state="live") == 1
    assert during.value("broker_websocket_connections", role="therapist") == 1
    assert during.value("broker_websocket_connections", role="client") == 1
    assert after.value("broker_websocket_connections", role="client") == 0
    assert after.value("broker_sessions", state="live") == 0

    def moved(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    assert moved("broker_joins_total", outcome="ok") == 2
    assert moved("broker_admissions_total", decision="admitted") == 1
    assert moved("broker_relayed_messages_total", type="offer") >= 1
    assert moved("broker_relayed_messages_total", type="answer") >= 1
    assert moved("broker_error_replies_total", code="bad_message") == 1
    assert moved("broker_websocket_closes_total", code="4010") == 2  # the session ended: both closed
    assert moved("broker_message_size_bytes_count") >= 8  # hellos, joins, pre-flight, checklist, relays, end
    assert moved("broker_message_size_bytes_sum") > 1000  # an offer alone is over a kilobyte
    assert moved("broker_call_setup_seconds_count") == 1
    assert 0 < moved("broker_call_setup_seconds_sum") < 30
    assert moved("broker_preflights_total", outcome="connected") == 1
    assert moved("broker_login_attempts_total", outcome="invalid") == 1
    assert after.value("broker_event_loop_lag_seconds_count") > before.value("broker_event_loop_lag_seconds_count")
    assert after.value("process_resident_memory_bytes") > 10 * 1024 * 1024
    assert after.value("broker_bus_reconnects_total") == 0

    # No label is anything but a small fixed set; nothing seen in the run appears anywhere.
    for scraped in (before, waiting, during, after):
        assert label_problems(scraped) == []
        for identifier in identifiers:
            assert identifier and identifier not in scraped.text, identifier


async def test_the_rule_catches_a_label_that_names_someone() -> None:
    """The check above would see an identifying label (a metric built against the rule)."""
    from prometheus_client import Counter

    metrics = Metrics()
    Counter("broker_bad", "A metric against the rule.", ["session"], registry=metrics.registry).labels("s-1234").inc()
    from prometheus_client import generate_latest

    scraped = parse(generate_latest(metrics.registry).decode())
    assert "broker_bad_total{session='s-1234'}" in label_problems(scraped)


async def test_every_label_a_fresh_broker_exports_is_from_a_fixed_set() -> None:
    metrics = Metrics()
    scraped = parse((await metrics.scrape()).decode())
    assert label_problems(scraped) == []
    assert scraped.value("broker_error_replies_total", code="internal") == 0  # every child exported from the start


def test_metrics_address_parsing() -> None:
    assert parse_address("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_address("[::1]:9464") == ("::1", 9464)
    assert parse_address("0.0.0.0:9100") == ("0.0.0.0", 9100)
    assert parse_address("off") is None
    assert parse_address("") is None
    for bad in ("9464", "localhost", "host:port", "host:0", "host:70000", ":9464", "[::1:9464"):
        with pytest.raises(ValueError, match="host:port"):
            parse_address(bad)


async def test_a_taken_metrics_address_does_not_stop_the_broker(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    metrics = Metrics()
    first = await start_metrics_site(metrics, f"127.0.0.1:{port}")
    assert first is not None
    try:
        assert await start_metrics_site(Metrics(), f"127.0.0.1:{port}") is None
        assert "event=metrics_unavailable" in caplog.text
        assert await start_metrics_site(metrics, "off") is None
    finally:
        await first.cleanup()


@pytest.mark.redis
async def test_two_brokers_on_redis_count_store_commands_and_export_nothing_identifying(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    """Two processes on one Redis: each counts its own share; the Redis store's operations are timed."""
    a, b = await start_broker_pair(tmp_path, redis_server.empty_database())
    sites = [await start_metrics_site(x.broker.metrics, f"127.0.0.1:{free_port()}") for x in (a, b)]
    urls = [f"http://{runner.addresses[0][0]}:{runner.addresses[0][1]}/metrics" for runner in sites if runner]
    try:
        before = [await scrape(url) for url in urls]
        therapist, client = await split_call(a, b)
        identifiers = {therapist.session_id, therapist.peer_id, client.peer_id, "127.0.0.1"}
        await therapist.end()
        await client.close()
        await therapist.close()
        await asyncio.sleep(0.3)
        after = [await scrape(url) for url in urls]
    finally:
        for runner in sites:
            if runner is not None:
                await runner.cleanup()
        await a.stop()
        await b.stop()

    def moved(name: str, **labels: str) -> float:
        return sum(x.value(name, **labels) - y.value(name, **labels) for x, y in zip(after, before, strict=True))

    assert moved("broker_joins_total", outcome="ok") == 2
    assert moved("broker_admissions_total", decision="admitted") == 1
    assert moved("broker_relayed_messages_total", type="answer") >= 1
    assert moved("broker_store_command_seconds_count", operation="update") >= 4  # joins, checklist, admit, end
    assert moved("broker_store_command_seconds_count", operation="get") >= 1
    assert moved("broker_store_errors_total", operation="update") == 0
    for scraped in (*before, *after):
        assert label_problems(scraped) == []
        for identifier in identifiers:
            assert identifier not in scraped.text, identifier


def test_check_config_refuses_a_bad_metrics_address_and_the_public_port(tmp_path: Path) -> None:
    import dataclasses

    from broker.config import Config
    from broker.config_check import check_config

    base = dataclasses.replace(Config(), data_dir=tmp_path, port=8080)
    assert not [p for p in check_config(base) if "metrics" in p]
    assert not [p for p in check_config(dataclasses.replace(base, metrics_address="off")) if "metrics" in p]
    for bad in ("9464", "127.0.0.1:8080", "0.0.0.0:8080"):
        problems = [p for p in check_config(dataclasses.replace(base, metrics_address=bad)) if "metrics" in p]
        assert len(problems) == 1, (bad, problems)


async def test_stalls_gc_pauses_and_limits_are_counted(tmp_path: Path) -> None:
    """A stalled event loop, a full collection, and two limits refusing: each shows in the metrics."""
    import gc

    from aiohttp import WSServerHandshakeError

    from tests.conftest import start_broker

    running = await start_broker(tmp_path, max_connections_per_address=1, rate_per_s=1.0, rate_burst=2)
    metrics = running.broker.metrics
    try:
        time.sleep(0.3)  # a blocking call holds the loop: the monitor wakes late
        await asyncio.sleep(0.25)
        gc.collect()
        origin = {"Origin": running.url}
        async with aiohttp.ClientSession() as http:
            first = await http.ws_connect(running.url + "/ws", headers=origin)
            with pytest.raises(WSServerHandshakeError) as refused:
                await http.ws_connect(running.url + "/ws", headers=origin)
            assert refused.value.status == 429
            for n in range(4):  # past a budget of 2 at once
                await first.send_str(json.dumps({"type": "ping", "n": n}))
            await first.receive(timeout=5)
            await asyncio.sleep(0.1)
            await first.close()
        scraped = parse((await metrics.scrape()).decode())
    finally:
        await running.stop()
    assert scraped.value("broker_event_loop_stall_max_seconds") >= 0.2
    assert scraped.value("broker_event_loop_lag_seconds_count") >= 1
    assert scraped.value("broker_gc_pause_seconds_count", generation="2") >= 1
    assert scraped.value("broker_throttled_total", limit="websocket_per_address") == 1
    assert scraped.value("broker_throttled_total", limit="messages") >= 1
    assert scraped.value("broker_error_replies_total", code="too_many_requests") == 1
