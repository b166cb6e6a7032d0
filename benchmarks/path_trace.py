"""P4 diagnosis: where a relayed message's time goes when it crosses two processes on Redis.

Informational, no goal. The set-up of ``redis_scale.py``'s two-process latency phase (pairs
split across two brokers on one Redis, an open loop at a fixed offered rate), with the
``trace_path`` diagnosis from ``experiments.py`` in both brokers. Every message is followed
through six segments, joined by (recipient, seq) on the clock all processes share:

- ``gen_to_frame``: the load generator's write until the sending broker reads the frame
  (waking that process, and aiohttp's read);
- ``frame_to_bus``: the hub's checks until the relay is queued on the bus;
- ``bus_to_write``: the queue until the script call is written to Redis;
- ``write_to_read``: Redis (waking it, the script) until the receiving broker reads the message
  on its pub/sub connection (waking that process);
- ``read_to_done``: opening the message and handing it to the recipient's socket;
- ``done_to_gen``: until the load generator reads it.

``--tick`` sets how often the generator sends (P4 sends every 5 ms, so every process sleeps
between bursts); ``--profile`` runs both brokers under cProfile (does the latency follow the
brokers' Python CPU?).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
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
    parse_args,
    percentile,
    raise_file_limit,
    use_uvloop,
    workdir,
)
from redis_scale import TICK_S, RedisServer, open_loop, shared_broker_env

SEGMENTS = ("gen_to_frame", "frame_to_bus", "bus_to_write", "write_to_read", "read_to_done", "done_to_gen", "total")
_SEQ = re.compile(rb'"seq":(\d+)')


async def traced_loop(
    streams: list[tuple[LeanSocket, LeanSocket, bytes]], recipients: list[str], rate: float, tick: float, seconds: float
) -> list[tuple[str, int, float, float]]:
    """P4's open loop (``redis_scale.open_loop``): (recipient, seq, sent, received) of each message received."""
    received: list[tuple[str, int, float, float]] = []

    def seen(i: int, payload: bytes, sent: float, now: float) -> None:
        seq = _SEQ.search(payload)
        received.append((recipients[i], int(seq.group(1)) if seq else -1, sent, now))

    await open_loop(streams, rate, seconds, tick=tick, seen=seen)
    return received


def join(received: list[tuple[str, int, float, float]], traces: list[dict[str, list]]) -> list[tuple[float, ...]]:
    """Each received message's segments (s), in SEGMENTS order, where both brokers traced it."""
    writes: dict[tuple[str, int], tuple[float, float, float]] = {}
    reads: dict[tuple[str, int], tuple[float, float]] = {}
    for trace in traces:
        for to, seq, (frame, queued), written in trace["writes"]:
            writes[(to, seq)] = (frame, queued, written)
        for to, seq, read, done in trace["reads"]:
            reads[(to, seq)] = (read, done)
    rows = []
    for peer, seq, sent, got in received:
        w, r = writes.get((peer, seq)), reads.get((peer, seq))
        if w is not None and r is not None:
            rows.append((w[0] - sent, w[1] - w[0], w[2] - w[1], r[0] - w[2], r[1] - r[0], got - r[1], got - sent))
    return rows


def _extra(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pairs", type=int, help="peer pairs (default 40 quick, 100 full, as P4)")
    parser.add_argument("--rate", type=float, default=1000.0, help="offered messages/s (P4: 1000)")
    parser.add_argument("--tick", type=float, default=TICK_S, help=f"seconds between the generator's sends (P4: {TICK_S:g})")
    parser.add_argument("--profile", action="store_true", help="run both brokers under cProfile")


async def main(args: argparse.Namespace) -> None:
    pairs = args.pairs or (40 if args.quick else 100)
    seconds = 5.0 if args.quick else 15.0
    tmp = workdir("path-trace")
    redis = RedisServer(tmp)
    await redis.ready()
    env = {**shared_broker_env(tmp), "BROKER_REDIS_URL": redis.url, "TRACE_PATH_DIR": str(tmp)}
    experiment = "trace_path" + (f"+{args.experiment}" if args.experiment else "")
    brokers = [
        BrokerProcess(tmp, env=env, experiment=experiment, name=f"broker-{i}", profile=tmp / f"profile-{i}" if args.profile else None)
        for i in "ab"
    ]
    admin = None
    try:
        for b in brokers:
            await b.start()
        admin = Admin(brokers[0])
        made = [await admitted_pair(admin, brokers[1].port, therapist_port=brokers[0].port) for _ in range(pairs)]
        streams, recipients = [], []
        for p in made:
            streams += [(p.therapist, p.client, candidate_frame(p.client_peer)), (p.client, p.therapist, candidate_frame(p.therapist_peer))]
            recipients += [p.client_peer, p.therapist_peer]
        await open_loop(streams, args.rate, 1.0, tick=args.tick)  # warm-up: every session's record copied
        received = await traced_loop(streams, recipients, args.rate, args.tick, seconds)
        for b in brokers:
            os.kill(b.pid, signal.SIGUSR1)
        await asyncio.sleep(1.0)
        traces = [json.loads((tmp / f"trace_path.{b.pid}.json").read_text()) for b in brokers]
        for p in made:
            p.close()
    finally:
        if admin is not None:
            await admin.close()
        for b in brokers:
            b.stop()
        redis.stop()
        cleanup(tmp)

    rows = join(received, traces)
    report = Report("path_trace", "P4 diagnosis: a relayed message's path across two processes", args, tools=("redis-server",))
    report.add("pairs", "peer pairs (each split across the two processes)", pairs)
    report.add("messages", "messages received (followed through both brokers)", f"{len(received):,} ({len(rows):,})")
    tail = sorted(rows, key=lambda r: r[-1])[int(len(rows) * 0.95):]
    for i, name in enumerate(SEGMENTS):
        values = [r[i] for r in rows]
        report.add(f"{name}_p50_ms", f"{name}: p50", round(percentile(values, 50) * 1e3, 3), "ms")
        report.add(f"{name}_p95_ms", f"{name}: p95", round(percentile(values, 95) * 1e3, 3), "ms")
        report.add(f"{name}_tail_ms", f"{name}: mean over the slowest 5% (by total)", round(sum(r[i] for r in tail) / max(1, len(tail)) * 1e3, 3), "ms")
    report.notes.append(
        f"Offered {args.rate:.0f} msg/s, sent every {args.tick * 1e3:g} ms, for {seconds:g} s after a 1 s warm-up"
        + (", both brokers under cProfile" if args.profile else "")
        + ". Segments are joined by (recipient, seq) on CLOCK_MONOTONIC, shared by the processes; the trace's own "
        "cost is in them. One 2-core machine runs the brokers, redis-server and the load generator together."
    )
    report.finish()


if __name__ == "__main__":
    arguments = parse_args(__doc__.splitlines()[0], _extra)
    raise_file_limit()
    use_uvloop()
    asyncio.run(main(arguments))
