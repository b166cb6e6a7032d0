"""Soak: sessions churned for minutes; the broker's memory, file descriptors and store keys stay put.

Selected by ``BROKER_SOAK=1`` (``BROKER_SOAK_MINUTES``, default 5, per store);
otherwise every test here is skipped, with that reason, because a soak is by
nature long and the issue asks for it to be opt-in.

A broker process (the probed ``broker serve`` of test_attacker: live RSS after a
garbage collection and malloc_trim, its open file descriptors, its store's key
count) serves workers that each schedule sessions over and over and play one
of these life cycles through the Python client:

- a full call (pre-flight, checklist, admit, data channel, a message), ended by the therapist;
- a client who leaves from the waiting room, then the therapist ends;
- a client declined by the therapist, then the therapist ends;
- both peers dropping their WebSockets mid-call, the therapist coming back to end it.

The first fifth of the run (at most a minute) is the warm-up. Afterwards live RSS
may have grown by less than 5 % over the end of the warm-up, and the file
descriptors and store keys are back where they were before the first session.
Run on the embedded store and on a real Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from pathlib import Path
from typing import Any

import pytest

from broker.client.broker_client import BrokerClient
from broker.signaling.protocol import SeatState, Status
from tests.redis_server import RedisServer, redis_server  # noqa: F401 - the fixture, used by parametrised tests
from tests.test_attacker import BrokerProcess, _links, _preflight, launch_broker

MINUTES = float(os.environ.get("BROKER_SOAK_MINUTES", "5"))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(MINUTES * 60 + 300),  # the run itself, plus start-up and settling
    pytest.mark.skipif(
        os.environ.get("BROKER_SOAK") != "1",
        reason="soak test: runs for BROKER_SOAK_MINUTES (default 5) per store, only when BROKER_SOAK=1",
    ),
]

WORKERS = 4
GROWTH = 0.05
REDIS_POOL = 64  # broker.store_redis.MAX_CONNECTIONS


async def full_call(broker: BrokerProcess) -> None:
    therapist_link, client_link = await _links(broker)
    therapist, client = BrokerClient(therapist_link), BrokerClient(client_link)
    try:
        await therapist.connect(timeout=30)
        await client.connect(timeout=30)
        await _preflight(client)
        await client.submit_checklist(details={"location": "home", "contact": "a friend"})
        await client.expect(Status, where=lambda m: m.seat_state is SeatState.WAITING, timeout=30)
        await therapist.admit(client.peer_id)
        link = await client.wait_connected(therapist.peer_id, timeout=60)
        await therapist.wait_connected(client.peer_id, timeout=60)
        therapist.send_chat(client.peer_id, "hello")
        assert await asyncio.wait_for(link.messages.get(), 30) == "hello"
        await therapist.end()
    finally:
        await client.close()
        await therapist.close()


async def leaves_while_waiting(broker: BrokerProcess) -> None:
    therapist_link, client_link = await _links(broker)
    therapist, client = BrokerClient(therapist_link), BrokerClient(client_link, reconnect=False)
    try:
        await therapist.connect(timeout=30)
        await client.connect(timeout=30)
        await _preflight(client)
        await client.submit_checklist(details={"location": "home", "contact": "a friend"})
        await client.expect(Status, where=lambda m: m.seat_state is SeatState.WAITING, timeout=30)
        await client.leave()
        await therapist.end()
    finally:
        await client.close()
        await therapist.close()


async def declined(broker: BrokerProcess) -> None:
    therapist_link, client_link = await _links(broker)
    therapist, client = BrokerClient(therapist_link), BrokerClient(client_link, reconnect=False)
    try:
        await therapist.connect(timeout=30)
        await client.connect(timeout=30)
        await therapist.decline(client.peer_id)
        await client.expect(type(_declined()), timeout=30)
        await therapist.end()
    finally:
        await client.close()
        await therapist.close()


async def dropped_mid_call(broker: BrokerProcess) -> None:
    therapist_link, client_link = await _links(broker)
    therapist, client = BrokerClient(therapist_link, reconnect=False), BrokerClient(client_link, reconnect=False)
    try:
        await therapist.connect(timeout=30)
        await client.connect(timeout=30)
        await _preflight(client)
        await client.submit_checklist(details={"location": "home", "contact": "a friend"})
        await client.expect(Status, where=lambda m: m.seat_state is SeatState.WAITING, timeout=30)
        await therapist.admit(client.peer_id)
        await client.wait_connected(therapist.peer_id, timeout=60)
    finally:
        await client.close()  # both WebSockets drop without a word
        await therapist.close()
    back = BrokerClient(therapist_link)
    try:
        await back.connect(timeout=30)
        await back.end()
    finally:
        await back.close()


def _declined() -> Any:
    from broker.signaling.protocol import Declined

    return Declined()


LIFE_CYCLES = (full_call, leaves_while_waiting, declined, dropped_mid_call)


async def churn(broker: BrokerProcess, until: float, counts: dict[str, int]) -> None:
    for cycle in itertools.cycle(LIFE_CYCLES):
        if time.monotonic() >= until:
            return
        await cycle(broker)
        counts[cycle.__name__] = counts.get(cycle.__name__, 0) + 1


async def soak(broker: BrokerProcess, redis_port: int | None = None) -> None:
    """Churn, then compare. With Redis, the pooled Redis connections are counted apart from the other descriptors:
    the pool keeps up to its size (64, plus the bus's one) open once a burst needed them, by design."""

    async def probe() -> dict[str, Any]:
        stats = await broker.probe()
        stats["redis_sockets"] = broker.sockets_to(redis_port) if redis_port else 0
        stats["fds"] -= stats["redis_sockets"]
        return stats

    await asyncio.sleep(1.0)
    before = await probe()
    total = MINUTES * 60
    warmup = min(60.0, total / 5)
    counts: dict[str, int] = {}
    started = time.monotonic()
    workers = [asyncio.ensure_future(churn(broker, started + total, counts)) for _ in range(WORKERS)]
    try:
        await asyncio.sleep(warmup)
        warm = await probe()
        samples = []
        while not all(w.done() for w in workers):
            await asyncio.sleep(min(30.0, total / 10))
            samples.append((await probe())["rss"] >> 20)
        await asyncio.gather(*workers)
    finally:
        for w in workers:
            w.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*workers)
    await asyncio.sleep(2.0)
    after = await probe()
    print(
        f"soak: {counts} in {MINUTES:g} min; live RSS MiB before {before['rss'] >> 20}, warm {warm['rss'] >> 20}, "
        f"samples {samples}, after {after['rss'] >> 20}; fds {before['fds']} -> {after['fds']}; "
        f"store keys {before['store_keys']} -> {after['store_keys']}; Redis sockets {after['redis_sockets']}"
    )
    assert sum(counts.values()) >= WORKERS * len(LIFE_CYCLES)
    assert after["rss"] < warm["rss"] * (1 + GROWTH), (warm, after)
    assert after["fds"] <= before["fds"], (before, after)
    assert after["store_keys"] == before["store_keys"], (before, after)
    assert after["connections"] == 0
    assert after["redis_sockets"] <= REDIS_POOL + 1
    log = broker.log_text()
    assert "event=internal_error" not in log and "Traceback" not in log


async def test_soak_on_the_embedded_store(tmp_path: Path) -> None:
    async with launch_broker(tmp_path) as broker:
        await soak(broker)


async def test_soak_on_redis(tmp_path: Path, redis_server: RedisServer) -> None:  # noqa: F811 - the fixture
    redis_server.client().flushdb()
    async with launch_broker(tmp_path, {"BROKER_REDIS_URL": redis_server.url}) as broker:
        await soak(broker, redis_server.port)
