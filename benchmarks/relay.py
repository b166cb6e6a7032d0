"""P1 relay throughput: N peer pairs exchanging signaling-sized messages through the broker,
against a bare aiohttp WebSocket relay (the ceiling of this stack).

Both servers run as their own process on uvloop with the same WebSocket settings
(64 KiB frames, no compression, 20 s heartbeat). The bare relay does the least
any relay must: read a frame, find the recipient named in ``to``, write the frame.
The broker does everything it does in production for a ``candidate``: rate
limit, strict decoding, the session and admission checks, sender overwrite,
the resume buffer, the bus, the per-connection send queue.

Load: every pair streams ``candidate`` messages both ways with a fixed window in
flight (closed loop), so throughput is what the server sustains and latency is
measured at that saturation. The broker's per-connection rate limit is raised
for this run (BROKER_RATE_PER_S/BURST) so that the limiter bounds nothing; its
bookkeeping still runs on every message.

Goal: broker throughput >= 0.8 x the bare relay's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    Admin,
    BrokerProcess,
    LeanSocket,
    Report,
    ServerProcess,
    admitted_pair,
    candidate_frame,
    cleanup,
    closed_loop,
    free_port,
    median,
    parse_args,
    raise_file_limit,
    use_uvloop,
    workdir,
)

#: BENCH_PROFILE=FILE writes a cProfile of the broker during the run (for finding where the time goes).
PROFILE = os.environ.get("BENCH_PROFILE")
WINDOW = 8  # messages in flight per direction (overridable with --window)
GOAL = 0.8


def bare_relay(elsewhere: Callable[[str], None] | None = None) -> tuple[Any, dict[str, Any], Callable[[Any], Any]]:
    """The bare relay's app: peers connect to /ws?peer=ID; each text frame goes to the peer named
    in ``to``, or to ``elsewhere`` when no such peer is here (dropped without it). Also returns the
    peers it holds and its decoder of ``to``, for a relay that receives frames from elsewhere."""
    import msgspec
    from aiohttp import WSMsgType, web

    class Routing(msgspec.Struct):
        to: str

    decode = msgspec.json.Decoder(Routing).decode
    peers: dict[str, web.WebSocketResponse] = {}

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def ws_handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=64 * 1024, compress=False, heartbeat=20.0, autoping=True)
        await ws.prepare(request)
        me = request.query["peer"]
        peers[me] = ws
        try:
            async for msg in ws:
                if msg.type is WSMsgType.TEXT:
                    target = peers.get(decode(msg.data).to)
                    if target is not None:
                        await target.send_str(msg.data)
                    elif elsewhere is not None:
                        elsewhere(msg.data)
        finally:
            peers.pop(me, None)
        return ws

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/ws", ws_handler)
    return app, peers, decode


def serve_bare_app(app: Any, port: int) -> None:
    """Serve a bare relay's app on uvloop, as the broker runs."""
    from aiohttp import web

    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def serve_bare(port: int) -> None:
    serve_bare_app(bare_relay()[0], port)


async def run_bare(window: int, pairs: int, warmup: float, measure: float, tmp: Path) -> dict[str, float]:
    port = free_port()
    server = ServerProcess([sys.executable, __file__, "--serve-bare", str(port)], port, log=tmp / "bare.log")
    await server.start()
    try:
        streams = []
        sockets = []
        for i in range(pairs):
            a = await LeanSocket.connect(port, path=f"/ws?peer=a{i}")
            b = await LeanSocket.connect(port, path=f"/ws?peer=b{i}")
            sockets += [a, b]
            streams += [(a, b, candidate_frame(f"b{i}")), (b, a, candidate_frame(f"a{i}"))]
        result = await closed_loop(streams, window=window, warmup_s=warmup, measure_s=measure, pids=[server.pid])
        for s in sockets:
            s.close()
        return result
    finally:
        server.stop()


async def run_broker(window: int, pairs: int, warmup: float, measure: float, tmp: Path) -> dict[str, float]:
    broker = BrokerProcess(
        tmp,
        env={"BROKER_RATE_PER_S": "1000000", "BROKER_RATE_BURST": "1000000"},
        profile=Path(PROFILE) if PROFILE else None,
    )
    await broker.start()
    admin = Admin(broker)
    try:
        made = [await admitted_pair(admin, broker.port) for _ in range(pairs)]
        streams = []
        for p in made:
            streams.append((p.therapist, p.client, candidate_frame(p.client_peer)))
            streams.append((p.client, p.therapist, candidate_frame(p.therapist_peer)))
        result = await closed_loop(streams, window=window, warmup_s=warmup, measure_s=measure, pids=[broker.pid])
        for p in made:
            p.close()
        return result
    finally:
        await admin.close()
        broker.stop()


def _extra(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pairs", type=int, help="peer pairs (default 50 quick, 200 full)")
    parser.add_argument("--rounds", type=int, help="alternating bare/broker rounds (default 1 quick, 3 full)")
    parser.add_argument("--window", type=int, default=WINDOW, help="messages in flight per direction")
    parser.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)


async def main(args: argparse.Namespace) -> None:
    pairs = args.pairs or (50 if args.quick else 200)
    rounds = args.rounds or (1 if args.quick else 3)
    warmup, measure = (2.0, 6.0) if args.quick else (3.0, 15.0)
    tmp = workdir("relay")
    bare_runs, broker_runs = [], []
    try:
        for _ in range(rounds):
            bare_runs.append(await run_bare(args.window, pairs, warmup, measure, tmp))
            broker_runs.append(await run_broker(args.window, pairs, warmup, measure, tmp))
    finally:
        cleanup(tmp)

    def med(runs: list[dict[str, float]], key: str) -> float:
        return median([r[key] for r in runs])

    bare, brk = med(bare_runs, "msgs_per_s"), med(broker_runs, "msgs_per_s")
    ratio = brk / bare
    cost_ratio = med(bare_runs, "server_cpu_us_per_msg") / med(broker_runs, "server_cpu_us_per_msg")
    report = Report("relay", "P1 relay throughput", args)
    report.add("pairs", "peer pairs (both directions streaming)", pairs)
    report.add("bare_msgs_per_s", "bare aiohttp relay", round(bare), "msg/s")
    report.add("broker_msgs_per_s", "broker relay", round(brk), "msg/s")
    report.add("ratio", "throughput ratio broker / bare", round(ratio, 3), "", f">= {GOAL}", ratio >= GOAL)
    report.add(
        "bare_cpu_us_per_msg", "bare relay CPU per message", round(med(bare_runs, "server_cpu_us_per_msg"), 1), "µs"
    )
    report.add(
        "broker_cpu_us_per_msg", "broker CPU per message", round(med(broker_runs, "server_cpu_us_per_msg"), 1), "µs"
    )
    report.add("cpu_cost_ratio", "CPU cost ratio bare / broker", round(cost_ratio, 3))
    report.add(
        "bare_server_cpu_share", "bare relay process CPU (1.0 = one core)", round(med(bare_runs, "server_cpu_share"), 2)
    )
    report.add(
        "broker_server_cpu_share", "broker process CPU (1.0 = one core)", round(med(broker_runs, "server_cpu_share"), 2)
    )
    report.add(
        "loadgen_cpu_share", "load generator CPU during broker runs", round(med(broker_runs, "loadgen_cpu_share"), 2)
    )
    for name, runs in (("bare", bare_runs), ("broker", broker_runs)):
        for q in ("p50", "p95", "p99"):
            report.add(
                f"{name}_{q}_ms",
                f"{name} relay latency {q} (window {args.window} in flight per direction)",
                round(med(runs, f"{q}_ms"), 2),
                "ms",
            )
    report.notes.append(
        f"{rounds} round(s) of {measure:.0f} s after {warmup:.0f} s warm-up, alternating bare and broker; medians. "
        "A server process near 1.0 CPU is saturated; the throughput ratio is then the capacity ratio."
    )
    report.finish()


if __name__ == "__main__":
    arguments = parse_args(__doc__.splitlines()[0], _extra)
    if arguments.serve_bare:
        serve_bare(arguments.serve_bare)
    else:
        raise_file_limit()
        use_uvloop()
        asyncio.run(main(arguments))
