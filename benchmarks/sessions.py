"""Sessions per process: realistic therapy sessions ramped against a broker until call set-up suffers.

Each step of the ramp schedules new sessions (the admin socket, as ``broker session create``
does) arriving at a fixed rate, then holds every session so far for a while. A session is a
therapist and 1-5 clients (mostly one: 70 % one, 15 % two, 8 % three, 4 % four, 3 % five). Every
peer opens a WebSocket, says ``hello`` and joins its seat; each client submits the checklist
(the benchmark policy: no network pre-flight, which would start aiortc peers and dominate); the
therapist admits each client once its checklist is accepted; then every pair of admitted peers
exchanges a burst of 20-60 relayed ``candidate`` messages (in clear), half each way, as at call
set-up. **Call set-up time**: from the first peer's connection to the last message of the burst
delivered. Then every peer stays connected and sends a ``ping`` every 20 s, and each session asks
for an ICE restart now and then (a client's ``renegotiate`` and four candidates each way, one
session in ``--restart-every`` seconds on average). The broker's limits are its defaults.

The ramp stops when a step's set-up p99 passes 100 ms, at the first error (an ``error`` frame, a
refused join, a closed connection, a time-out), at the open-file limit (the broker's or the load
generator's), at ``--max-sessions`` or at the time limit. The figure is the sessions held at the
last step that passed. The load generator runs in ``--workers`` processes of its own (each with
whole sessions) and reports its CPU. Set-ups: one broker process, embedded store; with
``--redis`` (the default of a full run) also two broker processes on one Redis, every session's
peers spread over both, as a load balancer without affinity would.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    Admin,
    BrokerProcess,
    LeanSocket,
    Report,
    candidate_frame,
    cleanup,
    cpu_seconds,
    join,
    open_fds,
    parse_args,
    pass_checklist,
    percentile,
    raise_file_limit,
    rss_bytes,
    use_uvloop,
    workdir,
)
from capacity import lag_samples, monitor_rows
from redis_scale import RedisServer, shared_broker_env

GOAL_SETUP_P99_MS = 100.0
#: docs/deploy.md's rule of thumb: "one broker process serves thousands of concurrent sessions".
GOAL_SESSIONS = 1000
PING_EVERY_S = 20
#: Clients per session and their weights: mostly one client, sometimes a family or a group.
CLIENT_WEIGHTS = {1: 70, 2: 15, 3: 8, 4: 4, 5: 3}
ADMIN_KEY_ENV = "BENCH_SESSIONS_ADMIN_KEY"


# ---------------------------------------------------------------- the load generator (worker process)


@dataclass
class AdminTarget:
    """What ``Admin`` needs of a broker, in a worker process that did not start it."""

    admin_socket: Path
    key: str

    def admin_key(self) -> str:
        return self.key


@dataclass
class Session:
    sockets: list[LeanSocket]
    peers: list[str]


@dataclass
class Worker:
    """Whole sessions on lean sockets: set-ups on command, heartbeats and ICE restarts while held."""

    ports: list[int]
    admin: Admin
    index: int
    restart_every_s: float
    rng: random.Random
    sessions: list[Session] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    ping_slots: list[list[LeanSocket]] = field(default_factory=lambda: [[] for _ in range(PING_EVERY_S)])
    addresses: int = 0
    stopping: bool = False

    def address(self) -> str:
        """A distinct private address per connection (sent as X-Forwarded-For), distinct across workers."""
        self.addresses += 1
        n = (self.index << 18) + self.addresses
        return f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"

    async def connect(self, slot: int) -> LeanSocket:
        return await LeanSocket.connect(self.ports[slot % len(self.ports)], forwarded_for=self.address())

    async def set_up(self, clients: int) -> float:
        """One session from scheduling to the end of its burst; returns the set-up time (s)."""
        created = await self.admin.create(clients=clients)
        t0 = time.perf_counter()
        therapist = await self.connect(0)
        sockets = [therapist]
        phase = "joining"
        try:
            t_joined = await join(therapist, created["therapist"])

            async def client(i: int, token: str) -> tuple[LeanSocket, str]:
                sock = await self.connect(i)
                sockets.append(sock)  # closed with the others if the set-up fails
                joined = await join(sock, token)
                await pass_checklist(sock, joined)
                therapist.send_json(type="admit", peer=joined["peer"])
                return sock, str(joined["peer"])

            clients_joined = await asyncio.gather(*(client(i + 1, t) for i, t in enumerate(created["clients"])))
            sockets = [therapist, *(sock for sock, _ in clients_joined)]
            peers = [str(t_joined["peer"]), *(peer for _, peer in clients_joined)]
            phase = "waiting for the admitted peers"
            for sock in sockets:
                await self._wait_for_everyone(sock, len(sockets) - 1)
            phase = "relaying the burst"
            await self._burst(sockets, peers)
            elapsed = time.perf_counter() - t0
        except BaseException as exc:
            for sock in sockets:
                sock.close()
            if isinstance(exc, TimeoutError):
                raise RuntimeError(f"time-out while {phase}") from exc
            raise
        self._hold(Session(sockets, peers))
        return elapsed

    @staticmethod
    async def _wait_for_everyone(sock: LeanSocket, others: int) -> None:
        """Until this peer's ``peers`` lists every other peer of the session, connected."""
        while True:
            message = await sock.recv_type("peers", "error", timeout=30)
            if message["type"] == "error":
                raise RuntimeError(f"error {message.get('code')}")
            listed = message["peers"]
            if len(listed) == others and all(p["connected"] for p in listed):
                return

    async def _burst(self, sockets: list[LeanSocket], peers: list[str]) -> None:
        """Every pair exchanges 20-60 ``candidate`` messages, half each way; returns when all arrived."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        frames: list[list[bytes]] = [[] for _ in sockets]
        expected = [0] * len(sockets)
        for i in range(len(sockets)):
            for j in range(i + 1, len(sockets)):
                total = self.rng.randint(20, 60)
                for sender, receiver, count in ((i, j, (total + 1) // 2), (j, i, total // 2)):
                    frames[sender] += [candidate_frame(peers[receiver])] * count
                    expected[receiver] += count
        remaining = [sum(expected)]
        arrived: Counter[tuple[str, int]] = Counter()

        def receiving(index: int) -> Callable[[bytes], None]:
            def on_frame(payload: bytes) -> None:
                if payload.startswith(b'{"type":"candidate"'):
                    arrived[(json.loads(payload)["from"], index)] += 1
                    remaining[0] -= 1
                    if remaining[0] == 0 and not done.done():
                        done.set_result(None)
                elif payload.startswith(b'{"type":"error"') and not done.done():
                    done.set_exception(RuntimeError(f"error {json.loads(payload).get('code')}"))

            return on_frame

        for index, sock in enumerate(sockets):
            sock.drain()
            sock.on_frame = receiving(index)
        for sock, out in zip(sockets, frames, strict=True):
            for frame in out:
                sock.send(frame)
        try:
            await asyncio.wait_for(done, 30)
        except TimeoutError:
            # Which directions lost messages, as "sender>receiver" by seat (0: the therapist).
            short = [
                f"{i}>{j}"
                for i in range(len(sockets))
                for j in range(len(sockets))
                if i != j and arrived[(peers[i], j)] < frames[i].count(candidate_frame(peers[j]))
            ]
            missing = f"{remaining[0]} of {sum(expected)} missing, {len(sockets)} peers, short: {' '.join(short)}"
            raise RuntimeError(f"time-out while relaying the burst ({missing})") from None

    def _hold(self, session: Session) -> None:
        """Keep a set-up session: count any error or closed connection; heartbeats in a random slot."""

        def on_frame(payload: bytes) -> None:
            if payload.startswith(b'{"type":"error"'):
                self.errors[f"error {json.loads(payload).get('code')}"] += 1

        def on_close(_: asyncio.Future[int | None]) -> None:
            if not self.stopping:
                self.errors["connection closed"] += 1

        for sock in session.sockets:
            sock.on_frame = on_frame
            sock.closed.add_done_callback(on_close)
            self.ping_slots[self.rng.randrange(PING_EVERY_S)].append(sock)
        self.sessions.append(session)

    async def heartbeats(self) -> None:
        """A ``ping`` per peer every 20 s (one slot a second); now and then a session's ICE restart."""
        tick = 0
        while True:
            await asyncio.sleep(1.0)
            tick += 1
            for n, sock in enumerate(self.ping_slots[tick % PING_EVERY_S]):
                sock.send_json(type="ping", n=n)
            for session in self.sessions:
                if self.rng.random() < 1.0 / self.restart_every_s:
                    restart(session, self.rng)

    async def add(self, count: int, rate: float) -> dict[str, Any]:
        """``count`` new sessions arriving at ``rate`` per second; their set-up times and failures."""
        times: list[float] = []

        async def one(delay: float) -> None:
            await asyncio.sleep(delay)
            clients = self.rng.choices(list(CLIENT_WEIGHTS), weights=list(CLIENT_WEIGHTS.values()))[0]
            try:
                times.append(await self.set_up(clients))
            except Exception as exc:  # noqa: BLE001 - every failure is a figure of the run
                self.errors[describe(exc)] += 1

        await asyncio.gather(*(one(i / rate) for i in range(count)))
        return {"setup_ms": [t * 1e3 for t in times], **self.status()}

    def status(self) -> dict[str, Any]:
        errors, self.errors = dict(self.errors), Counter()
        return {
            "errors": errors,
            "cpu_s": time.process_time(),
            "sessions": len(self.sessions),
            "peers": sum(len(s.sockets) for s in self.sessions),
            "fds": open_fds(os.getpid()),
            "fd_limit": fd_limit(os.getpid()),
        }


def restart(session: Session, rng: random.Random) -> None:
    """A client (the answering side) asks the therapist for an ICE restart; new candidates follow."""
    if len(session.sockets) < 2:
        return
    i = rng.randrange(1, len(session.sockets))
    client, therapist = session.sockets[i], session.sockets[0]
    client.send_json(type="renegotiate", to=session.peers[0])
    for _ in range(4):
        therapist.send(candidate_frame(session.peers[i]))
        client.send(candidate_frame(session.peers[0]))


def fd_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise RuntimeError("no open-file limit")


def describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "time-out"
    return str(exc)[:160] or type(exc).__name__


async def worker_main(args: argparse.Namespace) -> None:
    """Commands on stdin (one JSON line each), one JSON reply line each on stdout."""
    raise_file_limit()
    target = AdminTarget(Path(args.admin_socket), os.environ[ADMIN_KEY_ENV])
    admin = Admin(target)  # type: ignore[arg-type]  # duck-typed: the socket path and the key
    worker = Worker(
        [int(p) for p in args.ports.split(",")], admin, args.worker, args.restart_every, random.Random(args.worker)
    )
    ticker = asyncio.get_running_loop().create_task(worker.heartbeats())
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while line := await reader.readline():
            command = json.loads(line)
            if command["cmd"] == "add":
                reply = await worker.add(command["count"], command["rate"])
            elif command["cmd"] == "status":
                reply = worker.status()
            else:
                break
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()
    finally:
        worker.stopping = True
        ticker.cancel()
        for session in worker.sessions:
            for sock in session.sockets:
                sock.close()
        await admin.close()


# ---------------------------------------------------------------- the ramp (main process)


class WorkerProcess:
    """A load-generator process, driven over its stdin and stdout."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls, index: int, brokers: list[BrokerProcess], restart_every: float) -> WorkerProcess:
        argv = [
            sys.executable,
            __file__,
            "--worker",
            str(index),
            "--ports",
            ",".join(str(b.port) for b in brokers),
            "--admin-socket",
            str(brokers[0].admin_socket),
            "--restart-every",
            str(restart_every),
        ]
        env = {**os.environ, ADMIN_KEY_ENV: brokers[0].admin_key()}
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env
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


async def ramp(label: str, brokers: list[BrokerProcess], args: argparse.Namespace, deadline: float) -> dict[str, Any]:
    """Steps of ``args.step`` sessions until a stop condition; the steps' rows and the stop reason."""
    for b in brokers:
        await b.start()
    pids = [b.pid for b in brokers]
    workers = [await WorkerProcess.start(i, brokers, args.restart_every) for i in range(args.workers)]
    steps: list[dict[str, Any]] = []
    reached, stop = 0, ""
    rss_at_rest = sum(rss_bytes(p) for p in pids)
    loadgen0 = sum(r["cpu_s"] for r in await asyncio.gather(*(w.ask(cmd="status") for w in workers)))
    ramp_started = time.perf_counter()
    held: list[dict[str, Any]] = []
    try:
        while True:
            cpu0, t0, wall0 = [cpu_seconds(p) for p in pids], time.perf_counter(), time.time()
            per = [args.step // args.workers + (1 if i < args.step % args.workers else 0) for i in range(args.workers)]
            rate = args.rate / args.workers
            replies = await asyncio.gather(
                *(w.ask(cmd="add", count=n, rate=rate) for w, n in zip(workers, per, strict=True))
            )
            await asyncio.sleep(args.hold)
            held = await asyncio.gather(*(w.ask(cmd="status") for w in workers))
            elapsed = time.perf_counter() - t0
            rows = [r for b in brokers for r in monitor_rows(lag_file(b), wall0, time.time() + 1)]
            rows = [r for b in brokers for r in monitor_rows(lag_file(b), wall0, time.time() + 1)]
            setup = [t for r in replies for t in r["setup_ms"]]
            errors: Counter[str] = Counter()
            for r in (*replies, *held):
                errors.update(r["errors"])
            sessions = sum(r["sessions"] for r in held)
            row = {
                "sessions": sessions,
                "peers": sum(r["peers"] for r in held),
                "setup_p50_ms": round(percentile(setup, 50), 1),
                "setup_p99_ms": round(percentile(setup, 99), 1),
                "errors": dict(errors),
                "broker_rss_mib": round(sum(rss_bytes(p) for p in pids) / 2**20, 1),
                "broker_cpu_share": round(
                    max(cpu_seconds(p) - c for p, c in zip(pids, cpu0, strict=True)) / elapsed, 2
                ),
                "loadgen_cpu_s": round(sum(r["cpu_s"] for r in held), 1),
                "broker_fds": max(open_fds(p) for p in pids),
                "broker_lag_p99_ms": round(percentile(lag_samples(rows), 99), 1),
                "broker_gc_max_ms": round(max((ms for r in rows for _, ms in r["gc"]), default=0.0), 1),
            }
            steps.append(row)
            print(
                f"{label}: {sessions} sessions, {row['peers']} peers, set-up p50 {row['setup_p50_ms']} "
                f"p99 {row['setup_p99_ms']} ms, errors {sum(errors.values())}, RSS {row['broker_rss_mib']} MiB, "
                f"busiest broker CPU {row['broker_cpu_share']}, loop lag p99 {row['broker_lag_p99_ms']} ms, "
                f"longest GC pass {row['broker_gc_max_ms']} ms",
                file=sys.stderr,
                flush=True,
            )
            if errors:
                stop = f"errors: {', '.join(f'{k} x{v}' for k, v in errors.most_common(3))}"
                break
            if row["setup_p99_ms"] > GOAL_SETUP_P99_MS or not setup:
                stop = f"set-up p99 {row['setup_p99_ms']} ms > {GOAL_SETUP_P99_MS:g} ms"
                break
            reached = sessions
            next_peers = args.step * 6 // max(1, len(brokers)) + 100
            if any(open_fds(p) + next_peers > fd_limit(p) for p in pids) or any(
                r["fds"] + args.step * 6 + 100 > r["fd_limit"] for r in held
            ):
                stop = "open-file limit (a broker's or the load generator's) before the next step"
                break
            if sessions + args.step > args.max_sessions:
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


def _extra(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--step", type=int, help="new sessions per step (default 100 quick, 400 full)")
    parser.add_argument("--rate", type=float, help="new sessions arriving per second (default 50 quick, 25 full)")
    parser.add_argument(
        "--hold", type=float, help="seconds every session is held after a step (default 1 quick, 20 full)"
    )
    parser.add_argument("--max-sessions", type=int, help="ceiling of the ramp (default 1,000 quick, 10,000 full)")
    parser.add_argument("--max-minutes", type=float, help="time limit of the whole run (default 1 quick, 20 full)")
    parser.add_argument("--workers", type=int, default=1, help="load-generator processes (default 1)")
    parser.add_argument(
        "--restart-every", type=float, default=300.0, help="mean seconds between a session's ICE restarts"
    )
    parser.add_argument(
        "--redis", action=argparse.BooleanOptionalAction, help="also two brokers on one Redis (default: full runs)"
    )
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ports", help=argparse.SUPPRESS)
    parser.add_argument("--admin-socket", help=argparse.SUPPRESS)


async def main(args: argparse.Namespace) -> None:
    args.step = args.step or (100 if args.quick else 400)
    args.rate = args.rate or (50.0 if args.quick else 25.0)
    args.hold = args.hold if args.hold is not None else (1.0 if args.quick else 20.0)
    args.max_sessions = args.max_sessions or (1000 if args.quick else 10_000)
    minutes = args.max_minutes or (1.0 if args.quick else 20.0)
    with_redis = args.redis if args.redis is not None else not args.quick
    start = time.monotonic()
    tmp = workdir("sessions")
    results: dict[str, dict[str, Any]] = {}
    own0 = time.process_time()
    try:
        share = 0.5 if with_redis else 1.0
        results["embedded"] = await ramp(
            "one process", [BrokerProcess(tmp, lag_file=tmp / "broker-lag.jsonl")], args, start + minutes * 60 * share
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
                results["two_redis"] = await ramp("two on redis", brokers, args, start + minutes * 60)
            finally:
                redis.stop()
    finally:
        cleanup(tmp)

    report = Report("sessions", "Sessions per process", args, tools=("redis-server",) if with_redis else ())
    cores = os.cpu_count() or 1
    for kind, label, processes in (
        ("embedded", "one process, embedded", 1),
        ("two_redis", "two processes on Redis", 2),
    ):
        if kind not in results:
            continue
        r = results[kind]
        good = r["last_good"] or {}
        per_process = r["reached"] // processes
        report.add(
            f"{kind}_sessions_per_process",
            f"{label}: sessions held per process with set-up p99 <= {GOAL_SETUP_P99_MS:g} ms and no error",
            per_process,
            "",
            f">= {GOAL_SESSIONS:,} (full run)" if not args.quick else "",
            per_process >= GOAL_SESSIONS if not args.quick else None,
        )
        report.add(
            f"{kind}_sessions_per_core",
            f"{label}: sessions per core (a broker process uses one core at most)",
            r["reached"] // min(processes, cores),
        )
        report.add(f"{kind}_peers", f"{label}: connected peers at that step", good.get("peers", 0))
        report.add(
            f"{kind}_setup_p50_ms", f"{label}: call set-up p50 at that step", good.get("setup_p50_ms", 0.0), "ms"
        )
        report.add(
            f"{kind}_setup_p99_ms", f"{label}: call set-up p99 at that step", good.get("setup_p99_ms", 0.0), "ms"
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
        report.data[f"{kind}_steps"] = r["steps"]
        report.notes.append(
            f"{label}, per step: "
            + "; ".join(
                f"{s['sessions']} sessions ({s['peers']} peers) p50/p99 {s['setup_p50_ms']}/{s['setup_p99_ms']} ms, "
                f"{sum(s['errors'].values())} errors, {s['broker_rss_mib']} MiB, CPU {s['broker_cpu_share']}, "
                f"lag p99 {s['broker_lag_p99_ms']} ms, GC max {s['broker_gc_max_ms']} ms"
                for s in r["steps"]
            )
        )
    report.add("orchestrator_cpu_s", "orchestrating process CPU (s)", round(time.process_time() - own0, 1))
    report.add("run_s", "run time", round(time.monotonic() - start), "s")
    report.notes.append(
        f"Steps of {args.step} sessions arriving at {args.rate:g}/s, then held {args.hold:g} s; "
        f"{args.workers} load-generator process(es); heartbeat ping every {PING_EVERY_S} s per peer, an ICE "
        f"restart per session every {args.restart_every:g} s on average; the broker's default limits. "
        "Broker CPU: the busiest broker process's share of one core over the step (set-ups and hold). "
        "One 2-core machine runs the broker(s), redis-server and the load generator together."
    )
    report.finish()


if __name__ == "__main__":
    arguments = parse_args(__doc__.splitlines()[0], _extra)
    raise_file_limit()
    use_uvloop()
    asyncio.run(worker_main(arguments) if arguments.worker is not None else main(arguments))
