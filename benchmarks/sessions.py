"""Sessions per process: realistic therapy sessions ramped against a broker, with sessions ending and beginning throughout.

Each step of the ramp schedules new sessions (the admin socket, as ``broker session create``
does) arriving at a fixed rate, then holds every session so far for ``--hold`` seconds while
sessions **churn**: held ones end (the therapist sends ``end``) and new ones begin, ``--churn``
of each a second, so the number held stays the same. ``--load`` says what a session is
(``_session_load.LOADS``): ``varied`` (the default: a therapist and 1-5 clients, 20-60 clear
candidates per pair) or ``practice`` (issue 32's load: a therapist and one client, two in every
fifth; per pair a sealed offer and answer and ten sealed candidates each way, about 30 relays a
session). Every peer opens a WebSocket, says ``hello`` and joins its seat; each client submits
the checklist (the benchmark policy: no network pre-flight, which would start aiortc peers and
dominate); the therapist admits each client; then each pair relays its set-up burst. **Call
set-up time**: from the first peer's connection to the burst's last message delivered. Held
peers send a ``ping`` every 20 s (**ping time**: until its ``pong``), and each session asks for
an ICE restart now and then (``--restart-every``); each ``ping`` acknowledges the relays read
(``ack``, so the broker forgets them; ``--no-ack`` leaves them in its resume buffers, as before
that existed). The broker keeps its default limits.

Per step: set-up p50/p99 of the step's new sessions and of the churn's; the broker's event-loop
stall maximum and p99 (``_serve.py --lag-file``: a 10 ms sleep on its loop, how late it wakes),
its longest GC pass (``gc.callbacks``; wall time, and the CPU time of the thread, which leaves
out what the system gave other processes meanwhile), ping p99, the broker's RSS and RSS per
session over its RSS at rest, its CPU as a share of one core; the load generator's CPU and its
own stall maximum (it runs in ``--workers`` processes, ``_session_load.py``, each watching its
loop), and the same stall probe in an idle process beside them (the machine's own noise).

The ramp stops when a step's set-up p99 (new or churn) passes ``--stop-p99`` (100 ms; 0: never),
at the first error (an ``error`` frame, a refused join, a closed connection, a time-out), at the
open-file limit (the broker's or the load generator's, raised as far as the system allows: the
report says what stopped it), at ``--max-sessions`` or at the time limit. The figure is the
sessions held at the last step that passed. Set-ups: one broker process, embedded store; with
``--redis`` (the default of a full run) also two broker processes on one Redis, every session's
peers spread over both, as a load balancer without affinity would.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    HERE,
    BrokerProcess,
    Report,
    cleanup,
    cpu_seconds,
    file_limit_note,
    open_fds,
    parse_args,
    percentile,
    rss_bytes,
    use_uvloop,
    workdir,
)
from _session_load import ADMIN_KEY_ENV, LOADS, PING_EVERY_S, fd_limit
from capacity import lag_samples, monitor_rows
from redis_scale import RedisServer, shared_broker_env

#: BENCH_PROFILE=FILE writes a cProfile of the (embedded) broker during the run (for finding where the time goes).
#: The longest reply line a load-generator process may send (its samples of a step: tens of thousands of pings).
REPLY_LIMIT = 1 << 26
#: The ramp's default stop: a step's set-up p99 past this.
STOP_SETUP_P99_MS = 100.0
#: docs/deploy.md's rule of thumb: "one broker process serves thousands of concurrent sessions".
GOAL_SESSIONS = 1000
#: Issue 32's goals at the ramp's last step (full runs): with sessions ending and beginning throughout.
GOAL_STALL_MS = 50.0
GOAL_GC_MS = 50.0
GOAL_SETUP_P99_MS = 50.0
GOAL_KB_PER_SESSION = 40.0


class WorkerProcess:
    """A load-generator process (``_session_load.py``), driven over its stdin and stdout."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls, index: int, brokers: list[BrokerProcess], args: argparse.Namespace) -> WorkerProcess:
        argv = [
            sys.executable,
            str(HERE / "_session_load.py"),
            "--worker",
            str(index),
            "--ports",
            ",".join(str(b.port) for b in brokers),
            "--admin-socket",
            str(brokers[0].admin_socket),
            "--load",
            args.load,
            "--restart-every",
            str(args.restart_every),
            *([] if args.ack else ["--no-ack"]),
        ]
        env = {**os.environ, ADMIN_KEY_ENV: brokers[0].admin_key()}
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env, limit=REPLY_LIMIT
        )
        return cls(process)

    async def ask(self, **command: Any) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write((json.dumps(command) + "\n").encode())
        await self.process.stdin.drain()
        line = await self.process.stdout.readline()
        if not line:
            raise RuntimeError("a load-generator process exited")
        return json.loads(line)  # type: ignore[no-any-return]

    async def stop(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(b'{"cmd": "stop"}\n')
        self.process.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), 15)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


def lag_file(broker: BrokerProcess) -> Path:
    """Where ``_serve.py --lag-file`` writes this broker's event-loop lag and GC passes."""
    return Path(broker.argv[broker.argv.index("--lag-file") + 1])


def gc_max(rows: list[dict[str, Any]], column: int) -> float:
    """The longest GC pass in the rows: column 1 wall ms, 2 CPU ms (``_serve.GcTimes``)."""
    return round(max((p[column] for r in rows for p in r["gc"]), default=0.0), 1)


def share(values: list[int], total: int) -> list[int]:
    """``total`` spread over len(values) workers as evenly as whole numbers allow."""
    return [total // len(values) + (1 if i < total % len(values) else 0) for i in range(len(values))]


async def ramp(
    label: str, brokers: list[BrokerProcess], args: argparse.Namespace, deadline: float, tmp: Path
) -> dict[str, Any]:
    """Steps of ``args.step`` sessions until a stop condition; the steps' rows and the stop reason."""
    for b in brokers:
        await b.start()
    pids = [b.pid for b in brokers]
    control_file = tmp / f"control-{label.replace(' ', '-')}.jsonl"
    control = subprocess.Popen([sys.executable, str(HERE / "_serve.py"), "--control-lag", str(control_file)])
    workers = [await WorkerProcess.start(i, brokers, args) for i in range(args.workers)]
    steps: list[dict[str, Any]] = []
    reached, stop = 0, ""
    await asyncio.sleep(1.0)
    rss_at_rest = sum(rss_bytes(p) for p in pids)
    held = await asyncio.gather(*(w.ask(cmd="status") for w in workers))
    loadgen0 = sum(r["cpu_s"] for r in held)
    ramp_started = time.perf_counter()
    peers_per_session = sum(n * w for n, w in LOADS[args.load].clients.items()) / sum(LOADS[args.load].clients.values())
    try:
        while True:
            cpu0, t0, wall0 = [cpu_seconds(p) for p in pids], time.perf_counter(), time.time()
            loadgen_step0 = sum(r["cpu_s"] for r in held)
            per = share(list(range(args.workers)), args.step)
            added = await asyncio.gather(
                *(w.ask(cmd="add", count=n, rate=args.rate / args.workers) for w, n in zip(workers, per, strict=True))
            )
            if args.churn > 0:
                held = await asyncio.gather(
                    *(w.ask(cmd="churn", seconds=args.hold, rate=args.churn / args.workers) for w in workers)
                )
            else:
                await asyncio.sleep(args.hold)
                held = await asyncio.gather(*(w.ask(cmd="status") for w in workers))
            elapsed = time.perf_counter() - t0
            await asyncio.sleep(1.2)  # the lag monitors write once a second
            rows = [r for b in brokers for r in monitor_rows(lag_file(b), wall0, time.time())]
            control_lag = lag_samples(monitor_rows(control_file, wall0, time.time()))
            setup = [t for r in added for t in r["setup_ms"]]
            churned = [t for r in held for t in r.get("churn_setup_ms", [])]
            pings = [t for r in (*added, *held) for t in r["ping_ms"]]
            errors: Counter[str] = Counter()
            for r in (*added, *held):
                errors.update(r["errors"])
            sessions = sum(r["sessions"] for r in held)
            rss = sum(rss_bytes(p) for p in pids)
            lags = lag_samples(rows)
            row = {
                "sessions": sessions,
                "peers": sum(r["peers"] for r in held),
                "set_ups_so_far": sum(r["set_ups"] for r in held),
                "ends_so_far": sum(r["ends"] for r in held),
                "setup_p50_ms": round(percentile(setup, 50), 1),
                "setup_p99_ms": round(percentile(setup, 99), 1),
                "churned": sum(r.get("ended", 0) for r in held),
                "churn_setup_p50_ms": round(percentile(churned, 50), 1) if churned else None,
                "churn_setup_p99_ms": round(percentile(churned, 99), 1) if churned else None,
                "ping_p99_ms": round(percentile(pings, 99), 1) if pings else None,
                "pings": len(pings),
                "errors": dict(errors),
                "broker_rss_mib": round(rss / 2**20, 1),
                "kb_per_session": round((rss - rss_at_rest) / max(1, sessions) / 1000, 1),
                "broker_cpu_share": round(
                    max(cpu_seconds(p) - c for p, c in zip(pids, cpu0, strict=True)) / elapsed, 2
                ),
                "broker_stall_max_ms": round(max(lags, default=0.0), 1),
                "broker_lag_p99_ms": round(percentile(lags, 99), 1),
                "broker_gc_max_ms": gc_max(rows, 1),
                "broker_gc_max_cpu_ms": gc_max(rows, 2),
                "broker_fds": max(open_fds(p) for p in pids),
                "loadgen_cpu_share": round((sum(r["cpu_s"] for r in held) - loadgen_step0) / elapsed, 2),
                "loadgen_stall_max_ms": max(r["stall_max_ms"] for r in (*added, *held)),
                "loadgen_gc_max_ms": max(r["gc_max_ms"] for r in (*added, *held)),
                "control_stall_max_ms": round(max(control_lag, default=0.0), 1),
            }
            steps.append(row)
            print(
                f"{label}: {sessions} sessions, {row['peers']} peers; set-up p50/p99 {row['setup_p50_ms']}/"
                f"{row['setup_p99_ms']} ms, churn {row['churned']} ({row['churn_setup_p50_ms']}/"
                f"{row['churn_setup_p99_ms']} ms), ping p99 {row['ping_p99_ms']} ms, errors {sum(errors.values())}; "
                f"broker {row['broker_rss_mib']} MiB ({row['kb_per_session']} KB a session), CPU "
                f"{row['broker_cpu_share']}, stall max {row['broker_stall_max_ms']} ms (p99 {row['broker_lag_p99_ms']}), "
                f"GC max {row['broker_gc_max_ms']} ms ({row['broker_gc_max_cpu_ms']} CPU); load generator CPU "
                f"{row['loadgen_cpu_share']}, stall max {row['loadgen_stall_max_ms']} ms; idle process's stall max "
                f"{row['control_stall_max_ms']} ms; load {os.getloadavg()[0]:.1f}",
                file=sys.stderr,
                flush=True,
            )
            worst_p99 = max(row["setup_p99_ms"], row["churn_setup_p99_ms"] or 0.0)
            if errors:
                stop = f"errors: {', '.join(f'{k} x{v}' for k, v in errors.most_common(3))}"
                break
            if not setup or (args.stop_p99 and worst_p99 > args.stop_p99):
                stop = f"set-up p99 {worst_p99} ms > {args.stop_p99:g} ms"
                break
            reached = sessions
            next_peers = int(args.step * peers_per_session * 1.3) // max(1, len(brokers)) + 200
            if any(open_fds(p) + next_peers > fd_limit(p) for p in pids) or any(
                r["fds"] + next_peers > r["fd_limit"] for r in held
            ):
                stop = f"open-file limit before the next step ({args.fd_note})"
                break
            if (len(steps) + 1) * args.step > args.max_sessions:
                stop = f"ceiling of {args.max_sessions} sessions (--max-sessions)"
                break
            if time.monotonic() + elapsed > deadline:
                stop = "time limit (--max-minutes)"
                break
        last_good = next((s for s in reversed(steps) if s["sessions"] == reached), None)
        return {
            "steps": steps,
            "reached": reached,
            "stop": stop,
            "rss_at_rest_mib": round(rss_at_rest / 2**20, 1),
            "last_good": last_good,
            "loadgen_cpu_share": round(
                (sum(r["cpu_s"] for r in held) - loadgen0) / (time.perf_counter() - ramp_started), 2
            ),
        }
    finally:
        for w in workers:
            await w.stop()
        for b in brokers:
            b.stop()
        control.terminate()
        control.wait(10)


def _extra(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--load", choices=sorted(LOADS), default="varied", help="what a session is (default varied)")
    parser.add_argument("--step", type=int, help="new sessions per step (default 100 quick, 400 full)")
    parser.add_argument("--rate", type=float, help="new sessions arriving per second (default 50 quick, 25 full)")
    parser.add_argument(
        "--hold", type=float, help="seconds every session is held after a step, churning (default 2 quick, 20 full)"
    )
    parser.add_argument(
        "--churn",
        type=float,
        help="sessions ending, and as many beginning, per second while held (default 10; 0: none)",
    )
    parser.add_argument("--max-sessions", type=int, help="ceiling of the ramp (default 300 quick, 10,000 full)")
    parser.add_argument("--max-minutes", type=float, help="time limit of the whole run (default 0.75 quick, 20 full)")
    parser.add_argument(
        "--stop-p99",
        type=float,
        default=STOP_SETUP_P99_MS,
        help="stop when a step's set-up p99 passes this (ms; 0: never)",
    )
    parser.add_argument("--workers", type=int, help="load-generator processes (default 1 quick, 2 full)")
    parser.add_argument(
        "--restart-every", type=float, default=300.0, help="mean seconds between a session's ICE restarts"
    )
    parser.add_argument(
        "--redis", action=argparse.BooleanOptionalAction, help="also two brokers on one Redis (default: full runs)"
    )
    parser.add_argument(
        "--ack",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="peers acknowledge what they read on their pings (ping.ack; --no-ack: as before, the buffers stay full)",
    )


def report_ramp(report: Report, kind: str, label: str, processes: int, r: dict[str, Any], quick: bool) -> None:
    good = r["last_good"] or {}
    last = r["steps"][-1] if r["steps"] else {}
    per_process = r["reached"] // processes
    full = not quick
    report.add(
        f"{kind}_sessions_per_process",
        f"{label}: sessions held per process at the last step that passed",
        per_process,
        "",
        f">= {GOAL_SESSIONS:,}" if full else "",
        per_process >= GOAL_SESSIONS if full else None,
    )
    report.add(
        f"{kind}_sessions_per_core",
        f"{label}: sessions per core (a broker process uses one core at most)",
        r["reached"] // min(processes, os.cpu_count() or 1),
    )
    report.add(f"{kind}_peers", f"{label}: connected peers at that step", good.get("peers", 0))
    for key, name, unit, goal in (
        ("setup_p50_ms", "call set-up p50 (the step's new sessions)", "ms", None),
        ("setup_p99_ms", "call set-up p99 (the step's new sessions)", "ms", None),
        ("churn_setup_p99_ms", "call set-up p99 while sessions churn", "ms", GOAL_SETUP_P99_MS),
        ("ping_p99_ms", "ping to pong p99", "ms", None),
        ("broker_stall_max_ms", "broker event-loop stall, longest", "ms", GOAL_STALL_MS),
        ("broker_gc_max_ms", "broker GC pass, longest (wall)", "ms", GOAL_GC_MS),
        ("broker_gc_max_cpu_ms", "broker GC pass, longest (CPU)", "ms", None),
        ("kb_per_session", "broker RSS per session over its RSS at rest", "KB", GOAL_KB_PER_SESSION),
        ("broker_cpu_share", "broker CPU (1.0 = one core)", "", None),
        ("loadgen_stall_max_ms", "load generator's own stall, longest", "ms", None),
        ("control_stall_max_ms", "an idle process's stall, longest (the machine's noise)", "ms", None),
    ):
        value = good.get(key)
        checked = full and goal is not None and value is not None
        report.add(
            f"{kind}_{key}",
            f"{label}: {name} at that step",
            value,
            unit,
            f"<= {goal:g} {unit}".strip() if checked else "",
            value <= goal if checked else None,
        )
    report.add(
        f"{kind}_rss_mib",
        f"{label}: broker RSS at rest / at that step (all processes)",
        f"{r['rss_at_rest_mib']} / {good.get('broker_rss_mib', 0)}",
        "MiB",
    )
    report.add(
        f"{kind}_loadgen_cpu_share",
        f"{label}: load-generator CPU over the ramp, all its processes (1.0 = one core)",
        r["loadgen_cpu_share"],
    )
    report.add(f"{kind}_stop", f"{label}: what stopped the ramp", r["stop"])
    if last and last is not good:
        report.notes.append(f"{label}, the step that stopped the ramp: {json.dumps(last)}")
    report.data[f"{kind}_steps"] = r["steps"]
    report.notes.append(
        f"{label}, per step: "
        + "; ".join(
            f"{s['sessions']} sessions ({s['peers']} peers) set-up p50/p99 {s['setup_p50_ms']}/{s['setup_p99_ms']} ms, "
            f"churn {s['churned']} p50/p99 {s['churn_setup_p50_ms']}/{s['churn_setup_p99_ms']} ms, ping p99 "
            f"{s['ping_p99_ms']} ms, {sum(s['errors'].values())} errors, {s['broker_rss_mib']} MiB "
            f"({s['kb_per_session']} KB a session), CPU {s['broker_cpu_share']}, stall max {s['broker_stall_max_ms']} ms, "
            f"GC max {s['broker_gc_max_ms']} ms ({s['broker_gc_max_cpu_ms']} CPU), load generator CPU "
            f"{s['loadgen_cpu_share']} stall max {s['loadgen_stall_max_ms']} ms, idle process stall max "
            f"{s['control_stall_max_ms']} ms"
            for s in r["steps"]
        )
    )


async def main(args: argparse.Namespace) -> None:
    args.step = args.step or (100 if args.quick else 400)
    args.rate = args.rate or (50.0 if args.quick else 25.0)
    args.hold = args.hold if args.hold is not None else (2.0 if args.quick else 20.0)
    args.churn = args.churn if args.churn is not None else 10.0
    args.max_sessions = args.max_sessions or (300 if args.quick else 10_000)
    args.workers = args.workers or (1 if args.quick else 2)
    minutes = args.max_minutes or (0.75 if args.quick else 20.0)
    with_redis = args.redis if args.redis is not None else not args.quick
    start = time.monotonic()
    tmp = workdir("sessions")
    results: dict[str, dict[str, Any]] = {}
    own0 = time.process_time()
    try:
        portion = 0.5 if with_redis else 1.0
        profile = Path(os.environ["BENCH_PROFILE"]) if os.environ.get("BENCH_PROFILE") else None
        results["embedded"] = await ramp(
            "one process",
            [BrokerProcess(tmp, lag_file=tmp / "broker-lag.jsonl", profile=profile)],
            args,
            start + minutes * 60 * portion,
            tmp,
        )
        if with_redis:
            redis = RedisServer(tmp)
            try:
                await redis.ready()
                env = {
                    **{k: v for k, v in shared_broker_env(tmp).items() if not k.startswith("BROKER_RATE")},
                    "BROKER_REDIS_URL": redis.url,
                }
                brokers = [
                    BrokerProcess(tmp, env=env, name=f"redis-{i}", lag_file=tmp / f"redis-{i}-lag.jsonl") for i in "ab"
                ]
                results["two_redis"] = await ramp("two on redis", brokers, args, start + minutes * 60, tmp)
            finally:
                redis.stop()
    finally:
        cleanup(tmp)

    report = Report("sessions", "Sessions per process", args, tools=("redis-server",) if with_redis else ())
    for kind, label, processes in (
        ("embedded", "one process, embedded", 1),
        ("two_redis", "two processes on Redis", 2),
    ):
        if kind in results:
            report_ramp(report, kind, label, processes, results[kind], args.quick)
    report.add("file_limit", "open-file limit of every process of the run", f"{args.fd_limit:,}: {args.fd_note}")
    report.add("orchestrator_cpu_s", "orchestrating process CPU (s)", round(time.process_time() - own0, 1))
    report.add("run_s", "run time", round(time.monotonic() - start), "s")
    report.notes.append(
        f"Load {args.load}: {LOADS[args.load].description}. Steps of {args.step} sessions arriving at {args.rate:g}/s, "
        f"then held {args.hold:g} s while {args.churn:g} sessions a second end and as many begin; "
        f"{args.workers} load-generator process(es); a ping every {PING_EVERY_S} s per peer, an ICE restart per "
        f"session every {args.restart_every:g} s on average; the broker's default limits. Broker CPU: the busiest "
        "broker process's share of one core over the step. RSS per session: the broker's RSS over its RSS at rest, "
        "per session held. One 2-core machine runs the broker(s), redis-server and the load generator together."
    )
    report.finish()


if __name__ == "__main__":
    arguments = parse_args(__doc__.splitlines()[0], _extra)
    arguments.fd_limit, arguments.fd_note = file_limit_note()
    use_uvloop()
    asyncio.run(main(arguments))
