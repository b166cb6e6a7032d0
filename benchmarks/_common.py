"""Shared pieces of the benchmark scripts: options, broker processes, a lean load generator, results.

The broker under test always runs as its own process (``_serve.py``, the same
code path as ``broker serve``), so its RSS, CPU time and event loop are its
own and never the load generator's. The load generator is a deliberately lean
WebSocket client (``LeanSocket``): a Python client as heavy as the server would
measure itself instead of the server.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import importlib
import json
import math
import os
import platform
import resource
import secrets
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import msgspec

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
#: Every run's JSON record goes here (not committed: .gitignore); results.md keeps the current figures by hand.
RUNS = HERE / "runs"
#: Set (by ``--broker-tree``) to a source tree whose ``broker`` package the broker processes run instead of
#: this tree's: a worktree of another commit, measured by this tree's scripts and load generator.
BROKER_TREE_ENV = "BENCH_BROKER_TREE"
sys.path.insert(0, str(ROOT))

#: A checklist policy without the network pre-flight, so load tests can admit hundreds of raw peers
#: without an aiortc connection each (the pre-flight has its own concurrency limit and its own tests).
BENCH_POLICY = """
[consent]
version = "bench-1"
text = "Benchmark consent text."

[[item]]
id = "private_place"
kind = "attested"
level = "required"
text = "I am in a private place."
help = "Benchmark."

[[item]]
id = "consent"
kind = "consent"
level = "required"
text = "I accept the consent text."
help = "Benchmark."
"""

#: A signaling-sized relayed message body (an ICE candidate as browsers send them).
CANDIDATE_LINE = (
    "candidate:842163049 1 udp 1677729535 198.51.100.7 49203 typ srflx raddr 0.0.0.0 rport 0 "
    "generation 0 ufrag Xq3b network-id 1 network-cost 10"
)


# ---------------------------------------------------------------- options and results


def parse_args(description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a short run (under a minute on a 2-core machine)")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON line (figures and goal verdicts) on stdout; the table goes to stderr",
    )
    parser.add_argument(
        "--no-record", action="store_true", help="do not write the run's JSON record to benchmarks/runs/"
    )
    parser.add_argument(
        "--broker-tree",
        metavar="DIR",
        help="run the broker processes from the source tree DIR (e.g. a git worktree of another commit): "
        "DIR goes first on their PYTHONPATH; this tree's scripts and load generator measure it",
    )
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    if args.broker_tree:
        tree = Path(args.broker_tree).resolve()
        if not (tree / "broker" / "__init__.py").is_file():
            parser.error(f"--broker-tree {args.broker_tree}: no broker package there (broker/__init__.py)")
        os.environ[BROKER_TREE_ENV] = str(tree)  # the broker processes this run starts inherit it
    return args


def broker_tree() -> Path:
    """The source tree whose ``broker`` package the broker processes run: ``--broker-tree``, or this one."""
    chosen = os.environ.get(BROKER_TREE_ENV)
    return Path(chosen) if chosen else ROOT


def import_first(*names: str) -> ModuleType:
    """The first of ``names`` that exists, imported: a module's path in the package layout first, its
    old flat path after it, so ``_serve.py`` runs a broker tree of either layout (``--broker-tree``
    may name a commit from before the move into subpackages). An import error inside a module that
    does exist is raised, never skipped."""
    for name in names:
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as missing:
            if missing.name is None or not (name == missing.name or name.startswith(missing.name + ".")):
                raise
    raise ModuleNotFoundError(f"none of {', '.join(names)}")


def raise_file_limit(wanted: int = 65536) -> int:
    """Raise this process's open-file limit as far as the hard limit allows; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(wanted, hard) if hard != resource.RLIM_INFINITY else wanted
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def file_limit_note(wanted: int = 1 << 20) -> tuple[int, str]:
    """Raise this process's open-file limit, hard limit included, as far as the system allows (what it
    starts inherits it); returns the soft limit now and what set it there, for the report."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        ceiling = int(Path("/proc/sys/fs/nr_open").read_text())
    except (OSError, ValueError):
        ceiling = wanted
    target = min(wanted, ceiling)
    reason = f"the system's most per process (fs.nr_open {ceiling:,})" if target == ceiling else f"{wanted:,} asked"
    if hard != resource.RLIM_INFINITY and hard < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
        except (ValueError, OSError) as exc:
            reason = (
                f"the hard limit {hard:,}: raising it was refused ({exc}; it takes CAP_SYS_RESOURCE, or a higher "
                "limit from whatever starts the process: ulimit -Hn, LimitNOFILE= in systemd, the container's ulimits)"
            )
    return raise_file_limit(target), reason


def percentile(samples: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of unsorted samples; NaN when empty."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    rank = max(0, min(len(ordered) - 1, int(round(p / 100 * len(ordered) + 0.5)) - 1))
    return ordered[rank]


def machine() -> str:
    """CPU, cores, memory and kernel: what a figure was measured on (the load average is apart)."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB, {platform.system()} {platform.release()}"


def load_average() -> float:
    """The one-minute load average: figures that need the CPU move with it on a shared machine."""
    return round(os.getloadavg()[0], 1)


def _tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired):
        return "absent"
    return out[-1] if out else "absent"


def versions(extra_tools: Iterable[str] = ()) -> str:
    """Python, the libraries on the measured path and the external tools a benchmark drives."""
    from importlib.metadata import PackageNotFoundError, version

    parts = [f"Python {platform.python_version()}"]
    for package in ("aiohttp", "msgspec", "uvloop", "aiortc", "redis", "hiredis", "playwright"):
        try:
            parts.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            parts.append(f"no {package}" + (" (asyncio's own event loop)" if package == "uvloop" else ""))
    tools = {
        "redis-server": ["redis-server", "--version"],
        "chromium": ["chromium", "--version"],
        "node": ["node", "--version"],
    }
    for tool in extra_tools:
        found = _tool_version(tools[tool]).replace("Redis server v=", "redis-server ").split(" sha=")[0]
        parts.append(f"Node {found}" if tool == "node" and found != "absent" else found)
    return ", ".join(parts)


def broker_commit() -> str:
    """The commit the measured broker/ comes from (``--broker-tree``'s when given, named with its
    path), marked when broker/ has uncommitted changes."""
    tree = broker_tree()
    commit = _tool_version(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(
        ["git", "-C", str(tree), "status", "--porcelain", "--", "broker"], capture_output=True, text=True
    ).stdout.strip()
    where = f" (--broker-tree {tree})" if tree != ROOT else ""
    return f"{commit}{where}{' (+ uncommitted changes in broker/)' if dirty else ''}"


def _json_number(value: Any) -> Any:
    """NaN (a figure with no samples) as null: strict JSON readers such as jq reject NaN."""
    return None if isinstance(value, float) and math.isnan(value) else value


@dataclass
class Figure:
    key: str
    name: str
    value: float | int | str | None  # None: not measured (the report says why)
    unit: str = ""
    goal: str = ""
    met: bool | None = None

    def cell(self) -> str:
        v = self.value
        if v is None:
            return "-"
        text = f"{v:,.2f}" if isinstance(v, float) else (f"{v:,}" if isinstance(v, int) else str(v))
        return f"{text} {self.unit}".strip()


@dataclass
class Report:
    """What one benchmark run found: figures, goals, notes; printed as a table, as one JSON line
    (``--json``) and kept as a JSON record in ``RUNS`` (unless ``--no-record``)."""

    benchmark: str
    title: str
    args: argparse.Namespace
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    tools: tuple[str, ...] = ()

    def add(self, key: str, name: str, value: Any, unit: str = "", goal: str = "", met: bool | None = None) -> None:
        self.figures.append(Figure(key, name, value, unit, goal, met))
        self.data[key] = value

    @property
    def goals_met(self) -> bool | None:
        checked = [f.met for f in self.figures if f.met is not None]
        return all(checked) if checked else None

    def record(self) -> dict[str, Any]:
        """The run as one JSON object: when, where, what ran, every figure, every goal's verdict."""
        return {
            "benchmark": self.benchmark,
            "title": self.title,
            "when": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "quick": bool(self.args.quick),
            "command": " ".join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]]),
            "machine": machine(),
            "load": load_average(),
            "versions": versions(self.tools),
            "broker_commit": broker_commit(),
            "goals_met": self.goals_met,
            "goals": {
                f.key: {"goal": f.goal, "met": f.met, "value": _json_number(f.value)}
                for f in self.figures
                if f.met is not None
            },
            "figures": {key: _json_number(value) for key, value in self.data.items()},
            "notes": list(self.notes),
        }

    def markdown(self, record: Mapping[str, Any]) -> str:
        mode = "quick" if record["quick"] else "full"
        lines = [
            f"## {self.title} — {record['when']} ({mode})",
            "",
            f"- machine: {record['machine']}, load {record['load']}",
            f"- versions: {record['versions']}, broker at {record['broker_commit']}",
            f"- command: `{record['command']}`",
            "",
            "| figure | value | goal | met |",
            "|---|---|---|---|",
        ]
        for f in self.figures:
            met = "" if f.met is None else ("yes" if f.met else "**no**")
            lines.append(f"| {f.name} | {f.cell()} | {f.goal} | {met} |")
        if self.notes:
            lines.append("")
            lines += [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def finish(self) -> Path | None:
        """Print the table (to stderr with ``--json``, whose one line then has stdout to itself) and
        keep the record; returns the record's path, or None with ``--no-record``."""
        record = self.record()
        print(self.markdown(record), file=sys.stderr if self.args.json else sys.stdout, flush=True)
        path = None
        if not self.args.no_record:
            RUNS.mkdir(exist_ok=True)
            path = RUNS / f"{self.benchmark}-{record['when'].replace(':', '').replace('-', '')}.json"
            path.write_text(json.dumps(record, indent=1, default=str) + "\n", encoding="utf-8")
        if self.args.json:
            print(json.dumps(record, default=str), flush=True)
        return path


# ---------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class ServerProcess:
    """A server subprocess on a free port, stopped by its own PID."""

    def __init__(
        self,
        argv: list[str],
        port: int,
        env: Mapping[str, str] | None = None,
        log: Path | None = None,
        *,
        tree: Path = ROOT,
    ):
        """``tree``: the source tree first on the process's PYTHONPATH (this one unless it runs another broker)."""
        self.argv, self.port, self.env, self.log_path, self.tree = argv, port, dict(env or {}), log, tree
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def environment(self) -> dict[str, str]:
        """The process's environment: PYTHONPATH holds the measured tree first (this one unless
        --broker-tree), then this tree, then the caller's own PYTHONPATH (a uvloop kept apart, say)."""
        first = list(dict.fromkeys([str(self.tree), str(ROOT)]))
        path = os.pathsep.join([*first, *filter(None, [os.environ.get("PYTHONPATH")])])
        return {**os.environ, "PYTHONPATH": path, **self.env}

    async def start(self, ready_path: str = "/healthz", timeout: float = 30.0) -> None:
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(self.argv, env=self.environment(), stdout=out, stderr=out, cwd=str(ROOT))
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.argv[:3]} exited with {self.process.returncode}; see {self.log_path}")
                try:
                    async with http.get(self.url + ready_path) as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise RuntimeError(f"server on port {self.port} did not become ready")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


class BrokerProcess(ServerProcess):
    """``broker serve`` in its own process (through _serve.py), with a scratch data dir."""

    def __init__(
        self,
        workdir: Path,
        *,
        env: Mapping[str, str] | None = None,
        lag_file: Path | None = None,
        profile: Path | None = None,
        trace_memory: Path | None = None,
        name: str = "broker",
        checklist_policy: str | None = BENCH_POLICY,
    ) -> None:
        """``checklist_policy``: policy TOML for the broker (default: one without the pre-flight); None: the built-in."""
        self.data_dir = workdir / f"{name}-data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        policy = workdir / f"{name}-policy.toml"
        if checklist_policy is not None:
            policy.write_text(checklist_policy)
        port = free_port()
        argv = [sys.executable, str(HERE / "_serve.py"), "--port", str(port), "--data-dir", str(self.data_dir)]
        if lag_file:
            argv += ["--lag-file", str(lag_file)]
        if profile:
            argv += ["--profile", str(profile)]
        if trace_memory:
            argv += ["--tracemalloc", str(trace_memory)]
        base_env = {
            "BROKER_TRUST_PROXY": "1",
            "BROKER_LOG_LEVEL": "info",
            "BROKER_ADMIN_SOCKET_PATH": str(workdir / f"{name}-admin.sock"),
        }
        if checklist_policy is not None:
            base_env["BROKER_POLICY_FILE"] = str(policy)
        super().__init__(argv, port, {**base_env, **dict(env or {})}, workdir / f"{name}.log", tree=broker_tree())
        self.admin_socket = Path(base_env["BROKER_ADMIN_SOCKET_PATH"])

    def admin_key(self) -> str:
        from broker.config import Config, Keys, load_or_create_secret

        config = Config(data_dir=self.data_dir, secret_file=self.env.get("BROKER_SECRET_FILE", ""))
        return Keys(load_or_create_secret(config)).admin.hex()


class Admin:
    """Schedules sessions on a running broker through its admin socket (as ``broker session create`` does)."""

    def __init__(self, broker: BrokerProcess) -> None:
        admin_header: str = import_first("broker.http.admin_socket", "broker.admin").ADMIN_HEADER
        self.headers = {admin_header: broker.admin_key()}
        self.http = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(broker.admin_socket)))

    async def create(self, clients: int = 1) -> dict[str, Any]:
        """A session; returns {"session", "therapist": token, "clients": [token, ...], "client_peers": [peer id, ...]}."""
        async with self.http.post("http://broker/sessions", json={"clients": clients}, headers=self.headers) as r:
            body = await r.json()
            if r.status != 200:
                raise RuntimeError(body)
        seats = body["seats"]
        return {
            "session": body["session"],
            "therapist": next(s["token"] for s in seats if s["role"] == "therapist"),
            "clients": [s["token"] for s in seats if s["role"] == "client"],
            "client_peers": [s["peer"] for s in seats if s["role"] == "client"],
        }

    async def close(self) -> None:
        await self.http.close()


def workdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"bench-{prefix}-"))


def cleanup(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- a lean WebSocket client


_decode = msgspec.json.decode
_encode = msgspec.json.encode


class Closed(Exception):
    pass


class LeanSocket(asyncio.Protocol):
    """A minimal RFC 6455 client: text frames masked with a zero key, pongs, close; no extensions.

    Far cheaper per message than a full client, so a load generator on one core
    can keep a server on the other core busy. ``on_frame`` (when set) receives
    every text payload as bytes; otherwise frames queue for ``recv``.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.handshake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.upgraded = False
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.on_frame: Callable[[bytes], None] | None = None
        #: The newest relayed ``seq`` read (a caller that sets ``on_frame`` keeps it): ``ping.ack``.
        self.last_seq = 0
        self.close_code: int | None = None
        self.closed = asyncio.get_running_loop().create_future()

    @classmethod
    async def connect(
        cls, port: int, *, origin: str | None = None, forwarded_for: str | None = None, path: str = "/ws"
    ) -> LeanSocket:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(cls, "127.0.0.1", port)
        key = base64.b64encode(secrets.token_bytes(16)).decode()
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: 127.0.0.1:{port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
            f"Origin: {origin or f'http://127.0.0.1:{port}'}",
        ]
        if forwarded_for:
            lines.append(f"X-Forwarded-For: {forwarded_for}")
        assert proto.transport is not None
        proto.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await asyncio.wait_for(proto.handshake, 30)
        return proto

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(Closed("connection lost during the handshake"))
        if not self.closed.done():
            self.closed.set_result(self.close_code)
        self.queue.put_nowait(None)

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(buf[: buf.find(b"\r\n")])
            del buf[: end + 4]
            if b" 101 " not in status:
                self.handshake.set_exception(Closed(status.decode(errors="replace")))
                assert self.transport is not None
                self.transport.close()
                return
            self.upgraded = True
            self.handshake.set_result(None)
        pos, size = 0, len(buf)
        while size - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length, head = b1 & 0x7F, 2
            if length == 126:
                if size - pos < 4:
                    break
                length, head = struct.unpack_from("!H", buf, pos + 2)[0], 4
            elif length == 127:
                if size - pos < 10:
                    break
                length, head = struct.unpack_from("!Q", buf, pos + 2)[0], 10
            if size - pos < head + length:
                break
            payload = bytes(buf[pos + head : pos + head + length])
            pos += head + length
            self._frame(b0 & 0x0F, payload)
        if pos:
            del buf[:pos]

    def _frame(self, opcode: int, payload: bytes) -> None:
        if opcode == 0x1:
            if self.on_frame is not None:
                self.on_frame(payload)
            else:
                self.queue.put_nowait(payload)
        elif opcode == 0x9:
            self._write(0xA, payload)
        elif opcode == 0x8:
            self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
            self._write(0x8, payload[:2])
            assert self.transport is not None
            self.transport.close()

    def _write(self, opcode: int, payload: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        n = len(payload)
        if n < 126:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        self.transport.write(header + b"\x00\x00\x00\x00" + payload)  # zero mask key: payload unchanged

    def send(self, payload: bytes) -> None:
        self._write(0x1, payload)

    def send_json(self, **message: Any) -> None:
        self._write(0x1, _encode(message))

    async def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        payload = await asyncio.wait_for(self.queue.get(), timeout)
        if payload is None:
            self.queue.put_nowait(None)
            raise Closed(f"closed with {self.close_code}")
        return _decode(payload)  # type: ignore[no-any-return]

    async def recv_type(self, *kinds: str, timeout: float = 10.0) -> dict[str, Any]:
        while True:
            message = await self.recv(timeout)
            if message.get("type") in kinds:
                return message

    def drain(self) -> None:
        """Drop queued frames (views the broker sent that a load test does not read)."""
        while not self.queue.empty():
            item = self.queue.get_nowait()
            if item is None:
                self.queue.put_nowait(None)
                return

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self._write(0x8, struct.pack("!H", 1000))
            self.transport.close()


async def join(sock: LeanSocket, token: str) -> dict[str, Any]:
    """hello + join; returns ``joined`` (raises on an error)."""
    sock.send_json(type="hello", protocol=1, agent="benchmark")
    sock.send_json(type="join", token=token)
    reply = await sock.recv_type("joined", "error", timeout=30)
    if reply["type"] == "error":
        raise RuntimeError(f"join refused: {reply['code']}")
    return reply


async def pass_checklist(sock: LeanSocket, joined: dict[str, Any]) -> None:
    policy = joined["policy"]
    sock.send_json(
        type="checklist",
        policy_version=policy["version"],
        answers={item["id"]: True for item in policy["items"]},
        consent_version=policy["consent"]["version"],
    )
    reply = await sock.recv_type("checklist_accepted", "error", timeout=30)
    if reply["type"] == "error":
        raise RuntimeError(f"checklist refused: {reply['code']}")


@dataclass
class Pair:
    """A therapist and an admitted client of one session, on lean sockets (no media, no aiortc)."""

    session: str
    therapist: LeanSocket
    client: LeanSocket
    therapist_peer: str
    client_peer: str

    def close(self) -> None:
        self.therapist.close()
        self.client.close()


_address_counter = [0]


def next_address() -> str:
    """A distinct documentation-range-free private address per connection, sent as X-Forwarded-For."""
    _address_counter[0] += 1
    n = _address_counter[0]
    return f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"


async def admitted_pair(admin: Admin, port: int, therapist_port: int | None = None) -> Pair:
    """Schedule a session; therapist and client join (on ``therapist_port`` and ``port``); the client is admitted."""
    created = await admin.create(clients=1)
    therapist = await LeanSocket.connect(therapist_port or port, forwarded_for=next_address())
    t_joined = await join(therapist, created["therapist"])
    client = await LeanSocket.connect(port, origin=f"http://127.0.0.1:{port}", forwarded_for=next_address())
    c_joined = await join(client, created["clients"][0])
    await pass_checklist(client, c_joined)
    therapist.send_json(type="admit", peer=c_joined["peer"])
    while True:
        peers = await client.recv_type("peers", timeout=30)
        if peers["peers"]:
            break
    while True:
        peers = await therapist.recv_type("peers", timeout=30)
        if peers["peers"] and peers["peers"][0]["connected"]:
            break
    await asyncio.sleep(0)
    therapist.drain()
    client.drain()
    return Pair(created["session"], therapist, client, t_joined["peer"], c_joined["peer"])


def candidate_frame(to: str) -> bytes:
    return _encode({"type": "candidate", "to": to, "candidate": CANDIDATE_LINE, "sdp_mid": "0", "sdp_mline_index": 0})


# ---------------------------------------------------------------- closed-loop relay load


@dataclass
class Direction:
    """One sender -> receiver stream with a fixed window of messages in flight (FIFO, so no stamps on the wire)."""

    sender: LeanSocket
    frame: bytes
    window: int
    sent_at: deque[float] = field(default_factory=deque)
    received: int = 0
    latencies: list[float] | None = None
    running: bool = True

    def start(self) -> None:
        now = time.perf_counter()
        for _ in range(self.window):
            self.sent_at.append(now)
            self.sender.send(self.frame)

    def on_frame(self, payload: bytes) -> None:
        if not payload.startswith(b'{"type":"candidate"') or not self.sent_at:
            return
        now = time.perf_counter()
        sent = self.sent_at.popleft()
        self.received += 1
        if self.latencies is not None:
            self.latencies.append(now - sent)
        if self.running:
            self.sent_at.append(now)
            self.sender.send(self.frame)


async def closed_loop(
    streams: list[tuple[LeanSocket, LeanSocket, bytes]],
    *,
    window: int,
    warmup_s: float,
    measure_s: float,
    pids: Sequence[int],
) -> dict[str, float]:
    """Run every (sender, receiver, frame) stream with ``window`` in flight; measure after a warm-up."""
    directions: list[Direction] = []
    for sender, receiver, frame in streams:
        d = Direction(sender, frame, window)
        receiver.on_frame = d.on_frame
        directions.append(d)
    for d in directions:
        d.start()
    await asyncio.sleep(warmup_s)
    latencies: list[float] = []
    for d in directions:
        d.received = 0
        d.latencies = latencies
    cpu0, own0, t0 = sum(map(cpu_seconds, pids)), time.process_time(), time.perf_counter()
    await asyncio.sleep(measure_s)
    elapsed = time.perf_counter() - t0
    cpu1, own1 = sum(map(cpu_seconds, pids)), time.process_time()
    total = sum(d.received for d in directions)
    for d in directions:
        d.running = False
        d.latencies = None
    await asyncio.sleep(0.5)
    for _, receiver, _ in streams:
        receiver.on_frame = None
    return {
        "msgs_per_s": total / elapsed,
        "server_cpu_share": (cpu1 - cpu0) / elapsed,
        "server_cpu_us_per_msg": (cpu1 - cpu0) / max(total, 1) * 1e6,
        "loadgen_cpu_share": (own1 - own0) / elapsed,
        "p50_ms": percentile(latencies, 50) * 1e3,
        "p95_ms": percentile(latencies, 95) * 1e3,
        "p99_ms": percentile(latencies, 99) * 1e3,
        "messages": total,
    }


def use_uvloop() -> None:
    """The load generator runs on uvloop, as ``broker serve`` does when uvloop is installed."""
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")
