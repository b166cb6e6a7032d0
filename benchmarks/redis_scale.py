"""P4 across two processes with Redis: throughput and p95 latency against one process.

Three set-ups, each with the same peer pairs streaming ``candidate`` messages:

- one broker process, embedded store (the default; the baseline);
- one broker process on Redis (informational: what the Redis store costs alone);
- two broker processes on one Redis, every pair split across them (the
  therapist on one, the client on the other), so every relayed message goes
  through the Redis store and the Redis bus to reach the other process.

Throughput: closed loop with a window in flight per direction (as P1).
Latency: open loop at a fixed offered rate (the same for every set-up, well
under the capacity of each), so the p95 compares the paths, not the queues.
A real ``redis-server`` runs on a free port without persistence and is stopped
by its PID. The per-connection rate limit is raised as in P1.

Goals: two-process throughput >= 0.5 x one process; two-process p95 latency <= 2 x.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    Admin,
    BrokerProcess,
    LeanSocket,
    Report,
    admitted_pair,
    candidate_frame,
    cleanup,
    closed_loop,
    cpu_seconds,
    free_port,
    median,
    parse_args,
    percentile,
    raise_file_limit,
    use_uvloop,
    workdir,
)

GOAL_THROUGHPUT = 0.5
GOAL_LATENCY = 2.0
WINDOW = 4
#: The open loop sends every 5 ms: every process sleeps between bursts, as between a session's messages.
TICK_S = 0.005


class RedisServer:
    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(tmp),
                "--loglevel",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def ready(self) -> None:
        import redis.asyncio as aioredis

        client = aioredis.Redis(port=self.port)
        try:
            for _ in range(100):
                try:
                    if await client.ping():
                        return
                except Exception:  # noqa: BLE001 - still starting
                    await asyncio.sleep(0.05)
            raise RuntimeError("redis-server did not answer")
        finally:
            await client.aclose()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


async def open_loop(streams: list[tuple[LeanSocket, LeanSocket, bytes]], rate: float, seconds: float) -> list[float]:
    """Send ``rate`` messages per second in all, every ``TICK_S`` seconds, round-robin over the
    streams; latencies (s) of each."""
    pending: list[deque[float]] = [deque() for _ in streams]
    latencies: list[float] = []

    def receiver(queue: deque[float]) -> Callable[[bytes], None]:
        def on_frame(payload: bytes) -> None:
            if payload.startswith(b'{"type":"candidate"') and queue:
                latencies.append(time.perf_counter() - queue.popleft())

        return on_frame

    for (_, rx, _), queue in zip(streams, pending, strict=True):
        rx.on_frame = receiver(queue)
    per_tick = rate * TICK_S
    owed, i = 0.0, 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        owed += per_tick
        while owed >= 1.0:
            tx, _, frame = streams[i % len(streams)]
            pending[i % len(streams)].append(time.perf_counter())
            tx.send(frame)
            i += 1
            owed -= 1.0
        await asyncio.sleep(TICK_S)
    await asyncio.sleep(1.0)
    for _, rx, _ in streams:
        rx.on_frame = None
    return latencies


def shared_broker_env(tmp: Path) -> dict[str, str]:
    """What every broker process of a run shares: one secret (processes on one Redis must, to open
    each other's sealed messages) and the per-connection rate limit raised, as in P1."""
    secret = tmp / "shared.secret"
    secret.write_text(secrets.token_hex(32) + "\n")
    secret.chmod(0o600)
    return {"BROKER_RATE_PER_S": "1000000", "BROKER_RATE_BURST": "1000000", "BROKER_SECRET_FILE": str(secret)}


async def measured_open_loop(
    streams: list[tuple[LeanSocket, LeanSocket, bytes]],
    rate: float,
    seconds: float,
    servers: list[int],
    redis: int | None,
) -> tuple[list[float], dict[str, float]]:
    """``open_loop``, and the CPU per message received it cost the server processes (and redis-server,
    when they are on it).

    At this load every process sleeps between sends, so a message costs far more CPU than in
    the closed loop (waking up, cold caches): the more of it on the path, the later the message."""
    before = {pid: cpu_seconds(pid) for pid in servers}
    redis_before = 0.0 if redis is None else cpu_seconds(redis)
    latencies = await open_loop(streams, rate, seconds)
    received = max(len(latencies), 1)
    figures = {"latency_cpu_us_per_msg": sum(cpu_seconds(pid) - cpu for pid, cpu in before.items()) / received * 1e6}
    if redis is not None:
        figures["latency_redis_cpu_us_per_msg"] = (cpu_seconds(redis) - redis_before) / received * 1e6
    return latencies, figures


def path_figures(loop: dict[str, float], latencies: list[float], latency_cpu: dict[str, float]) -> dict[str, float]:
    """One set-up's figures: the closed loop's throughput and CPU, the open loop's latency and CPU."""
    return {
        "msgs_per_s": loop["msgs_per_s"],
        "cpu_us_per_msg": loop["server_cpu_us_per_msg"],
        "p50_ms": percentile(latencies, 50) * 1e3,
        "p95_ms": percentile(latencies, 95) * 1e3,
        "p99_ms": percentile(latencies, 99) * 1e3,
        "samples": len(latencies),
        **latency_cpu,
    }


def path_ratios(results: dict[str, list[dict[str, float]]], two: str, one: str) -> tuple[float, float]:
    """Set-up ``two`` against ``one``: throughput ratio and p95 latency ratio, from medians over the rounds."""

    def med(kind: str, key: str) -> float:
        return median([x[key] for x in results[kind]])

    return med(two, "msgs_per_s") / med(one, "msgs_per_s"), med(two, "p95_ms") / med(one, "p95_ms")


def add_path_figures(
    report: Report, kind: str, label: str, cpu: str, runs: list[dict[str, float]], rate: float
) -> None:
    """The medians of one set-up's rounds, as rows of the report (``kind`` prefixes their JSON keys)."""

    def med(key: str) -> float:
        return median([run[key] for run in runs])

    report.add(f"{kind}_msgs_per_s", f"{label}: throughput", round(med("msgs_per_s")), "msg/s")
    report.add(f"{kind}_cpu_us_per_msg", f"{label}: {cpu}", round(med("cpu_us_per_msg"), 1), "µs")
    report.add(f"{kind}_p50_ms", f"{label}: latency p50 at {rate:.0f} msg/s offered", round(med("p50_ms"), 2), "ms")
    report.add(f"{kind}_p95_ms", f"{label}: latency p95 at {rate:.0f} msg/s offered", round(med("p95_ms"), 2), "ms")
    report.add(
        f"{kind}_latency_cpu_us_per_msg",
        f"{label}: {cpu} at {rate:.0f} msg/s offered",
        round(med("latency_cpu_us_per_msg")),
        "µs",
    )
    if all("latency_redis_cpu_us_per_msg" in run for run in runs):
        report.add(
            f"{kind}_latency_redis_cpu_us_per_msg",
            f"{label}: redis-server CPU per message at {rate:.0f} msg/s offered",
            round(med("latency_redis_cpu_us_per_msg")),
            "µs",
        )


async def measure(
    label: str,
    brokers: list[BrokerProcess],
    pairs: int,
    args: argparse.Namespace,
    rate: float,
    redis: RedisServer | None,
) -> dict[str, float]:
    for b in brokers:
        await b.start()
    admin = Admin(brokers[0])
    try:
        ports = [b.port for b in brokers]
        made = [await admitted_pair(admin, ports[-1], therapist_port=ports[0]) for _ in range(pairs)]
        streams = []
        for p in made:
            streams.append((p.therapist, p.client, candidate_frame(p.client_peer)))
            streams.append((p.client, p.therapist, candidate_frame(p.therapist_peer)))
        warm, span = (2.0, 5.0) if args.quick else (3.0, 12.0)
        loop = await closed_loop(
            streams, window=args.window, warmup_s=warm, measure_s=span, pids=[b.pid for b in brokers]
        )
        latencies, latency_cpu = await measured_open_loop(
            streams,
            rate,
            4.0 if args.quick else 10.0,
            [b.pid for b in brokers],
            None if redis is None else redis.process.pid,
        )
        for p in made:
            p.close()
        return path_figures(loop, latencies, latency_cpu)
    finally:
        await admin.close()
        for b in brokers:
            b.stop()
        print(f"{label}: done", file=sys.stderr)


def _extra(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pairs", type=int, help="peer pairs (default 40 quick, 100 full)")
    parser.add_argument("--window", type=int, default=WINDOW, help="messages in flight per direction (throughput runs)")
    parser.add_argument("--rate", type=float, default=1000.0, help="offered messages/s for the latency runs")


async def main(args: argparse.Namespace) -> None:
    pairs = args.pairs or (40 if args.quick else 100)
    rounds = 1 if args.quick else 3
    tmp = workdir("redis")
    redis = RedisServer(tmp)
    await redis.ready()
    limits = shared_broker_env(tmp)
    on_redis = {**limits, "BROKER_REDIS_URL": redis.url}
    results: dict[str, list[dict[str, float]]] = {"one": [], "one_redis": [], "two_redis": []}
    try:
        for r in range(rounds):
            results["one"].append(
                await measure(
                    "one process", [BrokerProcess(tmp, env=limits, name=f"one{r}")], pairs, args, args.rate, None
                )
            )
            results["one_redis"].append(
                await measure(
                    "one on redis", [BrokerProcess(tmp, env=on_redis, name=f"oner{r}")], pairs, args, args.rate, redis
                )
            )
            two = [BrokerProcess(tmp, env=on_redis, name=f"two{r}{i}") for i in "ab"]
            results["two_redis"].append(await measure("two on redis", two, pairs, args, args.rate, redis))
    finally:
        redis.stop()
        cleanup(tmp)

    tput, lat = path_ratios(results, "two_redis", "one")
    report = Report("redis_scale", "P4 two processes on Redis", args, tools=("redis-server",))
    report.add("pairs", "peer pairs (each split across the two processes in the two-process set-up)", pairs)
    for kind, label in (
        ("one", "one process, embedded"),
        ("one_redis", "one process on Redis"),
        ("two_redis", "two processes on Redis"),
    ):
        add_path_figures(report, kind, label, "broker CPU per message (all broker processes)", results[kind], args.rate)
    report.add(
        "ratio",
        "throughput ratio two processes on Redis / one process (embedded)",
        round(tput, 3),
        "",
        f">= {GOAL_THROUGHPUT}",
        tput >= GOAL_THROUGHPUT,
    )
    report.add(
        "latency_ratio",
        "p95 latency ratio two processes on Redis / one process (embedded)",
        round(lat, 3),
        "",
        f"<= {GOAL_LATENCY:g}",
        lat <= GOAL_LATENCY,
    )
    tput_r, lat_r = path_ratios(results, "two_redis", "one_redis")
    report.add(
        "ratio_vs_one_redis",
        "throughput ratio two processes / one process, both on Redis",
        round(tput_r, 3),
        "",
        f"(>= {GOAL_THROUGHPUT})",
    )
    report.add(
        "latency_ratio_vs_one_redis",
        "p95 latency ratio two processes / one process, both on Redis",
        round(lat_r, 3),
        "",
        f"(<= {GOAL_LATENCY:g})",
    )
    report.notes.append(
        "The goals are judged against one process as deployed by default (embedded store); the same ratios against "
        "one process on Redis (the cost of crossing processes alone) follow, goals in brackets for comparison. "
        f"{rounds} round(s); medians. Throughput: window {args.window} per direction; "
        "redis-server's own CPU is not in the broker CPU figures; at the latency load it is shown apart. "
        "One 2-core machine runs the brokers, redis-server and the load generator together."
    )
    report.finish()


if __name__ == "__main__":
    arguments = parse_args(__doc__.splitlines()[0], _extra)
    raise_file_limit()
    use_uvloop()
    asyncio.run(main(arguments))
