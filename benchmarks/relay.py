"""P1 relay cost: the broker's CPU per relayed signaling message against bare relays (the least
a relay does on aiohttp, and on Node.js with the ``ws`` package), with the throughput beside it.

Three servers, each its own process, same WebSocket settings (64 KiB frames, no compression,
a ping every 20 s), under the same closed-loop load:

- the bare aiohttp relay written here (on uvloop, as the broker): read a frame, find the peer
  named in ``to``, write the frame, on aiohttp's public API;
- ``node_relay.mjs``: the same relay on Node.js and ``ws`` 8, installed from the npm registry at
  run time into ``benchmarks/runs/node/`` (not committed) when missing; when Node, npm or the
  install is missing, its figures are null with the reason and the other two are still measured;
- the broker, on public APIs only, doing for every ``candidate`` what it does in production: rate
  limit, strict decoding, the session and admission checks, sender overwrite, the relay sequence,
  the resume buffer, the per-connection send queue.

Load: every pair streams ``candidate`` messages both ways with a fixed window in flight, so
each server runs as fast as it can. The broker's per-connection rate limit is raised for the
run (BROKER_RATE_PER_S/BURST) so that it bounds nothing; its bookkeeping still runs.

**Goal: the broker's CPU per message <= 2.5 x the bare aiohttp relay's** (``cpu_ratio``). CPU per
message is the figure that holds still on a shared machine (throughput and latency move with
the load average; the CPU a message costs hardly does), and it is what a user pays for: a
practice's CPU per call set-up, and the sessions one core holds. The bound, measured: the broker
on public APIs costs 1.7-2.0 x the bare relay (20.5-25.5 µs against 10.5-12.7 µs per message in
seven quick runs at load 1-10, 2026-12-06; the ratio moves less than either figure): strict
decoding and the checks of a relay are a second pass over every frame, with the relay sequence
and the resume buffer on top. 2.5 x leaves room for that spread and fails on what users would
feel first: a cost per relay that grows with the session's history, a coroutine or a task per
message, a second decoding (b3f0112 fixed a check that made a relay cost 30 x). At 2.5 x (about
30 µs) one core still relays some 33,000 messages a second: the 20-60 messages of 500 calls
setting up in the same second. Throughput (and its ratios) is reported beside it, informational.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    HERE,
    RUNS,
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
GOAL_CPU_RATIO = 2.5  # the broker's CPU per message against the bare aiohttp relay's, at most (the docstring says why)
#: Where the Node relay's ``ws`` is installed at run time: inside benchmarks/runs/, which .gitignore keeps out of git.
NODE_MODULES = RUNS / "node"
WS_PACKAGE = "ws@8"  # one major version: a new major is a new peer, compared on purpose
WS_MAJOR = "8"
NPM_TIMEOUT_S = 180


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
    return await _relay_pairs(server, window, pairs, warmup, measure)


async def _relay_pairs(
    server: ServerProcess, window: int, pairs: int, warmup: float, measure: float
) -> dict[str, float]:
    """Start a bare relay (peers named in the URL), stream ``pairs`` pairs through it, stop it."""
    port = server.port
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


def node_ws(modules: Path, install: bool = True) -> tuple[Path | None, str]:
    """Node.js with ``ws`` for the Node relay: ``(modules, "ws X on Node Y")``, or ``(None, reason)``
    when it cannot run. Installs ``ws`` from the npm registry into ``modules`` when it is missing
    there (``npm install --no-save``: no package.json, nothing in the repository)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None:
        return None, "not measured: node is not installed (Debian: apt-get install nodejs npm)"
    manifest = modules / "node_modules" / "ws" / "package.json"

    def installed() -> str | None:
        try:
            version = str(json.loads(manifest.read_text())["version"])
        except (OSError, ValueError, KeyError):
            return None
        return version if version.split(".")[0] == WS_MAJOR else None

    if installed() is None:
        if not install:
            return None, f"not measured: {WS_PACKAGE} is not installed in {modules} (and --no-npm-install)"
        if npm is None:
            return None, "not measured: npm is not installed, so ws cannot be installed"
        modules.mkdir(parents=True, exist_ok=True)
        command = [npm, "install", "--no-save", "--no-audit", "--no-fund", "--ignore-scripts", "--prefix", str(modules)]
        print(f"installing {WS_PACKAGE} from the npm registry into {modules} ...", file=sys.stderr, flush=True)
        try:
            done = subprocess.run(
                [*command, WS_PACKAGE], capture_output=True, text=True, timeout=NPM_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired:
            return None, f"not measured: npm install {WS_PACKAGE} took over {NPM_TIMEOUT_S} s"
        if done.returncode != 0 or installed() is None:
            return (
                None,
                f"not measured: npm install {WS_PACKAGE} failed (exit {done.returncode}: {npm_error(done.stderr)})",
            )
    node_version = subprocess.run([node, "--version"], capture_output=True, text=True, check=False).stdout.strip()
    return modules, f"ws {installed()} on Node {node_version}"


def npm_error(stderr: str) -> str:
    """The line of npm's error output that says what went wrong (not its codes, stack or log path)."""
    lines = [line.removeprefix("npm error").strip() for line in stderr.splitlines() if line.strip()]
    telling = [line for line in lines if len(line) > 30 and not line.startswith(("at ", "A complete log"))]
    return (telling or lines or ["no message"])[0]


async def run_node(
    modules: Path, window: int, pairs: int, warmup: float, measure: float, tmp: Path
) -> dict[str, float]:
    """The same load as ``run_bare``, against ``node_relay.mjs``."""
    port = free_port()
    node = shutil.which("node") or "node"
    argv = [node, str(HERE / "node_relay.mjs"), str(port), str(modules)]
    return await _relay_pairs(ServerProcess(argv, port, log=tmp / "node.log"), window, pairs, warmup, measure)


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
    parser.add_argument(
        "--rounds", type=int, help="rounds, each: bare aiohttp, Node ws, broker (default 1 quick, 3 full)"
    )
    parser.add_argument("--window", type=int, default=WINDOW, help="messages in flight per direction")
    parser.add_argument("--no-node", action="store_true", help="leave out the Node.js ws relay")
    parser.add_argument(
        "--node-modules",
        type=Path,
        default=NODE_MODULES,
        help=f"where {WS_PACKAGE} is installed for the Node relay (default benchmarks/runs/node, not committed)",
    )
    parser.add_argument(
        "--no-npm-install", action="store_true", help=f"never install {WS_PACKAGE}: without it, no Node figures"
    )
    parser.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)


async def main(args: argparse.Namespace) -> None:
    pairs = args.pairs or (50 if args.quick else 200)
    rounds = args.rounds or (1 if args.quick else 3)
    warmup, measure = (2.0, 6.0) if args.quick else (3.0, 15.0)
    if args.no_node:
        modules, node_about = None, "not measured: --no-node"
    else:
        modules, node_about = node_ws(args.node_modules.resolve(), install=not args.no_npm_install)
    print(f"Node relay: {node_about}", file=sys.stderr, flush=True)
    tmp = workdir("relay")
    runs: dict[str, list[dict[str, float]]] = {"bare": [], "node": [], "broker": []}
    try:
        for _ in range(rounds):
            runs["bare"].append(await run_bare(args.window, pairs, warmup, measure, tmp))
            if modules is not None:
                runs["node"].append(await run_node(modules, args.window, pairs, warmup, measure, tmp))
            runs["broker"].append(await run_broker(args.window, pairs, warmup, measure, tmp))
    finally:
        cleanup(tmp)

    def med(name: str, key: str) -> float | None:
        """The median of a figure over the rounds; None for a relay that did not run."""
        return median([r[key] for r in runs[name]]) if runs[name] else None

    def rounded(value: float | None, digits: int) -> float | None:
        return None if value is None else round(value, digits)

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or not b else a / b

    cpu = {name: med(name, "server_cpu_us_per_msg") for name in runs}
    rate = {name: med(name, "msgs_per_s") for name in runs}
    cpu_ratio = ratio(cpu["broker"], cpu["bare"])
    report = Report("relay", "P1 relay cost", args, tools=("node",))
    report.add("pairs", "peer pairs (both directions streaming)", pairs)
    report.add(
        "cpu_ratio",
        "**broker CPU per message / bare aiohttp relay's**",
        rounded(cpu_ratio, 2),
        "",
        f"<= {GOAL_CPU_RATIO}",
        cpu_ratio is not None and cpu_ratio <= GOAL_CPU_RATIO,
    )
    labels = {"bare": "bare aiohttp relay", "node": "bare Node ws relay", "broker": "broker"}
    for name, label in labels.items():
        report.add(f"{name}_cpu_us_per_msg", f"{label}: CPU per message", rounded(cpu[name], 1), "µs")
        report.add(
            f"{name}_msgs_per_s", f"{label}: throughput", None if rate[name] is None else round(rate[name]), "msg/s"
        )
    report.add("ratio", "throughput broker / bare aiohttp relay", rounded(ratio(rate["broker"], rate["bare"]), 3))
    report.add(
        "node_cpu_ratio", "CPU per message, broker / Node ws relay", rounded(ratio(cpu["broker"], cpu["node"]), 2)
    )
    report.add("node_ratio", "throughput broker / Node ws relay", rounded(ratio(rate["broker"], rate["node"]), 3))
    report.add("node_ws", "Node ws relay", node_about)
    for name, label in labels.items():
        report.add(
            f"{name}_server_cpu_share",
            f"{label}: server CPU (1.0 = one core)",
            rounded(med(name, "server_cpu_share"), 2),
        )
    report.add(
        "loadgen_cpu_share", "load generator CPU during broker runs", rounded(med("broker", "loadgen_cpu_share"), 2)
    )
    for name, label in labels.items():
        for q in ("p50", "p95", "p99"):
            report.add(
                f"{name}_{q}_ms",
                f"{label}: latency {q} (window {args.window} in flight per direction)",
                rounded(med(name, f"{q}_ms"), 2),
                "ms",
            )
    report.notes.append(
        f"{rounds} round(s) of {measure:.0f} s after {warmup:.0f} s warm-up, alternating the relays; medians. "
        "CPU per message = the server process's CPU time / messages delivered. A server near 1.0 CPU is "
        "saturated; below it, the load generator (one core) is the bound and throughputs compare less."
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
