"""The sessions benchmark's load generator: whole therapy sessions on lean sockets, in processes of its own.

``sessions.py`` starts ``--workers`` of these processes (``python _session_load.py ...``) and drives
each over a pipe: one JSON command a line on its stdin, one JSON reply a line on its stdout.

- ``add``: ``count`` new sessions arriving at ``rate`` a second, each set up from scheduling (the
  broker's admin socket) to the last relayed message of its set-up burst; the reply holds every
  set-up time.
- ``churn``: for ``seconds``, sessions end and new ones begin at ``rate`` a second each (a held
  session's therapist sends ``end`` and every peer of it is closed by the broker; a new session is
  set up as by ``add``): the number held stays the same.
- ``status``: what was held and counted since the last reply.

A held session's peers send a ``ping`` every 20 s (``ping_ms``: until its ``pong``), and now and
then ask for an ICE restart. The process watches its own event loop as the broker's is watched
(a 10 ms sleep, how late it wakes; and its GC passes) so that a slow load generator shows as
such, and freezes its own long-lived objects as the broker does, so its collector does not stall
the set-ups it times.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
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

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    Admin,
    LeanSocket,
    candidate_frame,
    join,
    open_fds,
    pass_checklist,
    percentile,
    raise_file_limit,
    use_uvloop,
)

PING_EVERY_S = 20
ADMIN_KEY_ENV = "BENCH_SESSIONS_ADMIN_KEY"
#: A sealed SDP's plaintext (an offer or answer with audio, video and data: 3-5 KB from browsers).
SEALED_SDP_BYTES = 3000
#: A sealed candidate's plaintext (its line, mid and index as JSON).
SEALED_CANDIDATE_BYTES = 200
#: AES-GCM's nonce and tag, around every sealed plaintext.
SEAL_OVERHEAD = 28
#: Sealed candidates each way per pair in the practice load (after the offer and the answer).
SEALED_CANDIDATES = 10
#: The messages a set-up burst relays.
RELAYED_PREFIXES = (b'{"type":"candidate"', b'{"type":"offer"', b'{"type":"answer"')

_decode = msgspec.json.decode


@dataclass(frozen=True)
class Load:
    """Who is in a session and what its peers relay at set-up."""

    #: Clients per session and their weights.
    clients: dict[int, int]
    #: "clear": 20-60 clear candidates per pair, half each way. "sealed": per pair a sealed offer
    #: from the offerer, a sealed answer, then SEALED_CANDIDATES sealed candidates each way.
    signaling: str
    description: str


LOADS = {
    "varied": Load(
        {1: 70, 2: 15, 3: 8, 4: 4, 5: 3},
        "clear",
        "a therapist and 1-5 clients (70 % one, 15 % two, 8 % three, 4 % four, 3 % five); "
        "20-60 clear candidates per pair at set-up",
    ),
    "practice": Load(
        {1: 80, 2: 20},
        "sealed",
        "a therapist and one client, two in every fifth session (2.2 peers a session); per pair a sealed "
        f"offer and answer ({SEALED_SDP_BYTES:,}-byte SDPs) and {SEALED_CANDIDATES} sealed candidates each way "
        "(about 30 relays a session)",
    ),
}


def sealed_frame(kind: str, to: str, counter: int, plaintext: int, rng: random.Random) -> bytes:
    """A sealed relayed message of the protocol's shape (docs/protocol.md 7.7): random bytes as the
    ciphertext, base64url without padding (never a length 1 more than a multiple of 4)."""
    blob = base64.urlsafe_b64encode(rng.randbytes(plaintext + SEAL_OVERHEAD)).rstrip(b"=")
    return b'{"type":"%s","to":"%s","counter":%d,"sealed":"%s"}' % (kind.encode(), to.encode(), counter, blob)


@dataclass(eq=False)
class Session:
    sockets: list[LeanSocket]
    peers: list[str]
    #: The next sealed counter per direction (sender index, receiver index).
    counters: Counter[tuple[int, int]] = field(default_factory=Counter)
    ending: bool = False

    def next_counter(self, sender: int, receiver: int) -> int:
        self.counters[(sender, receiver)] += 1
        return self.counters[(sender, receiver)]


@dataclass
class AdminTarget:
    """What ``Admin`` needs of a broker, in a process that did not start it."""

    admin_socket: Path
    key: str

    def admin_key(self) -> str:
        return self.key


class LoopWatch:
    """This process's own event-loop lag (a 10 ms sleep, how late it wakes) and GC passes, since the last take."""

    TICK_S = 0.010

    def __init__(self) -> None:
        self.lags: list[float] = []
        self.gc_max_ms = 0.0
        self._gc_started = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
            return
        self.gc_max_ms = max(self.gc_max_ms, (time.perf_counter() - self._gc_started) * 1e3)
        if info["generation"] == 2:
            gc.freeze()  # what a full pass found alive stays out of the next ones (as broker/http/heap.py)

    async def run(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(self.TICK_S)
            self.lags.append(max(0.0, (time.perf_counter() - before - self.TICK_S) * 1e3))

    def take(self) -> dict[str, float]:
        lags, self.lags = self.lags, []
        gc_max, self.gc_max_ms = self.gc_max_ms, 0.0
        return {
            "stall_max_ms": round(max(lags, default=0.0), 1),
            "stall_p99_ms": round(percentile(lags, 99), 1) if lags else 0.0,
            "gc_max_ms": round(gc_max, 1),
        }


@dataclass
class Worker:
    """Whole sessions on lean sockets: set-ups and ends on command, heartbeats and ICE restarts while held."""

    ports: list[int]
    admin: Admin
    index: int
    load: Load
    restart_every_s: float
    rng: random.Random
    watch: LoopWatch
    sessions: list[Session] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    ping_slots: list[list[LeanSocket]] = field(default_factory=lambda: [[] for _ in range(PING_EVERY_S)])
    ping_sent: dict[int, float] = field(default_factory=dict)
    ping_ms: list[float] = field(default_factory=list)
    pings: int = 0
    #: Pings carry ``ack``, the newest relayed seq each peer read (docs/protocol.md 5).
    ack: bool = True
    set_ups: int = 0
    ends: int = 0
    addresses: int = 0
    stopping: bool = False

    def address(self) -> str:
        """A distinct private address per connection (sent as X-Forwarded-For), distinct across workers."""
        self.addresses += 1
        n = (self.index << 18) + self.addresses
        return f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"

    async def connect(self, slot: int) -> LeanSocket:
        return await LeanSocket.connect(self.ports[slot % len(self.ports)], forwarded_for=self.address())

    # ------------------------------------------------------------ set-up

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
            session = Session(sockets, [str(t_joined["peer"]), *(peer for _, peer in clients_joined)])
            phase = "waiting for the admitted peers"
            for sock in sockets:
                await self._wait_for_everyone(sock, len(sockets) - 1)
            phase = "relaying the burst"
            await self._burst(session)
            elapsed = time.perf_counter() - t0
        except BaseException as exc:
            for sock in sockets:
                sock.close()
            if isinstance(exc, TimeoutError):
                raise RuntimeError(f"time-out while {phase}") from exc
            raise
        self._hold(session)
        self.set_ups += 1
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

    def _pair_frames(self, session: Session, i: int, j: int) -> list[tuple[int, int, bytes]]:
        """The set-up burst of one pair: (sender index, receiver index, frame), in sending order."""
        peers = session.peers
        if self.load.signaling == "clear":
            total = self.rng.randint(20, 60)
            return [(i, j, candidate_frame(peers[j]))] * ((total + 1) // 2) + [(j, i, candidate_frame(peers[i]))] * (
                total // 2
            )
        # The therapist (index 0) offers to every client; between clients, the lower peer id (docs/protocol.md 3).
        offerer, answerer = (i, j) if i == 0 or peers[i] < peers[j] else (j, i)
        frames = [
            (offerer, answerer, self._sealed(session, "offer", offerer, answerer, SEALED_SDP_BYTES)),
            (answerer, offerer, self._sealed(session, "answer", answerer, offerer, SEALED_SDP_BYTES)),
        ]
        for _ in range(SEALED_CANDIDATES):
            for a, b in ((offerer, answerer), (answerer, offerer)):
                frames.append((a, b, self._sealed(session, "candidate", a, b, SEALED_CANDIDATE_BYTES)))
        return frames

    def _sealed(self, session: Session, kind: str, sender: int, receiver: int, plaintext: int) -> bytes:
        counter = session.next_counter(sender, receiver)
        return sealed_frame(kind, session.peers[receiver], counter, plaintext, self.rng)

    async def _burst(self, session: Session) -> None:
        """Every pair relays its set-up burst; returns when every message arrived."""
        sockets, peers = session.sockets, session.peers
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        planned = [
            f for i in range(len(sockets)) for j in range(i + 1, len(sockets)) for f in self._pair_frames(session, i, j)
        ]
        expected: Counter[tuple[int, int]] = Counter((a, b) for a, b, _ in planned)
        remaining = [len(planned)]
        arrived: Counter[tuple[str, int]] = Counter()

        def receiving(index: int) -> Callable[[bytes], None]:
            def on_frame(payload: bytes) -> None:
                if payload.startswith(RELAYED_PREFIXES):
                    relayed = _decode(payload)
                    sockets[index].last_seq = max(sockets[index].last_seq, relayed.get("seq") or 0)
                    arrived[(relayed["from"], index)] += 1
                    remaining[0] -= 1
                    if remaining[0] == 0 and not done.done():
                        done.set_result(None)
                elif payload.startswith(b'{"type":"error"') and not done.done():
                    done.set_exception(RuntimeError(f"error {_decode(payload).get('code')}"))

            return on_frame

        for index, sock in enumerate(sockets):
            sock.drain()
            sock.on_frame = receiving(index)
        for sender, _, frame in planned:
            sockets[sender].send(frame)
        try:
            await asyncio.wait_for(done, 30)
        except TimeoutError:
            # Which directions lost messages, as "sender>receiver" by seat (0: the therapist).
            short = [f"{a}>{b}" for (a, b), n in expected.items() if arrived[(peers[a], b)] < n]
            missing = f"{remaining[0]} of {len(planned)} missing, {len(sockets)} peers, short: {' '.join(short)}"
            raise RuntimeError(f"time-out while relaying the burst ({missing})") from None

    # ------------------------------------------------------------ held sessions

    def _hold(self, session: Session) -> None:
        """Keep a set-up session: count any error or unasked-for close; its pongs time its pings."""

        def receiving(sock: LeanSocket) -> Callable[[bytes], None]:
            def on_frame(payload: bytes) -> None:
                if payload.startswith(b'{"type":"pong"'):
                    sent = self.ping_sent.pop(_decode(payload).get("n") or -1, None)
                    if sent is not None:
                        self.ping_ms.append(round((time.perf_counter() - sent) * 1e3, 2))
                elif payload.startswith(RELAYED_PREFIXES):  # an ICE restart's: acknowledged on the next ping
                    sock.last_seq = max(sock.last_seq, _decode(payload).get("seq") or 0)
                elif payload.startswith(b'{"type":"error"'):
                    self.errors[f"error {_decode(payload).get('code')}"] += 1

            return on_frame

        def on_close(_: asyncio.Future[int | None]) -> None:
            if not self.stopping and not session.ending:
                self.errors["connection closed"] += 1

        for sock in session.sockets:
            sock.on_frame = receiving(sock)
            sock.closed.add_done_callback(on_close)
            self.ping_slots[self.rng.randrange(PING_EVERY_S)].append(sock)
        self.sessions.append(session)

    async def end_one(self) -> None:
        """A held session ends: its therapist sends ``end``; done when the broker has closed every peer."""
        if not self.sessions:
            return
        session = self.sessions.pop(self.rng.randrange(len(self.sessions)))
        session.ending = True
        self.ends += 1
        gone = set(session.sockets)
        for slot in self.ping_slots:
            slot[:] = [s for s in slot if s not in gone]
        session.sockets[0].send_json(type="end")
        try:
            await asyncio.wait_for(asyncio.gather(*(s.closed for s in session.sockets)), 30)
        except TimeoutError:
            self.errors["time-out while ending"] += 1
            for sock in session.sockets:
                sock.close()

    async def heartbeats(self) -> None:
        """A ``ping`` per peer every 20 s (one slot a second); now and then a session's ICE restart."""
        tick = 0
        while True:
            await asyncio.sleep(1.0)
            tick += 1
            now = time.perf_counter()
            for sock in self.ping_slots[tick % PING_EVERY_S]:
                self.pings += 1
                self.ping_sent[self.pings] = now
                if self.ack and sock.last_seq:
                    sock.send_json(type="ping", n=self.pings, ack=sock.last_seq)
                else:
                    sock.send_json(type="ping", n=self.pings)
            for session in self.sessions:
                if self.rng.random() < 1.0 / self.restart_every_s:
                    self.restart(session)

    def restart(self, session: Session) -> None:
        """A client (the answering side) asks the therapist for an ICE restart; new candidates follow."""
        if len(session.sockets) < 2:
            return
        i = self.rng.randrange(1, len(session.sockets))
        session.sockets[i].send_json(type="renegotiate", to=session.peers[0])
        for _ in range(4):
            for a, b in ((0, i), (i, 0)):
                if self.load.signaling == "clear":
                    frame = candidate_frame(session.peers[b])
                else:
                    frame = self._sealed(session, "candidate", a, b, SEALED_CANDIDATE_BYTES)
                session.sockets[a].send(frame)

    # ------------------------------------------------------------ commands

    def clients(self) -> int:
        return self.rng.choices(list(self.load.clients), weights=list(self.load.clients.values()))[0]

    async def _timed_set_up(self, times: list[float], delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            times.append(await self.set_up(self.clients()))
        except Exception as exc:  # noqa: BLE001 - every failure is a figure of the run
            self.errors[describe(exc)] += 1

    async def add(self, count: int, rate: float) -> dict[str, Any]:
        """``count`` new sessions arriving at ``rate`` per second; their set-up times and the status."""
        times: list[float] = []
        await asyncio.gather(*(self._timed_set_up(times, i / rate) for i in range(count)))
        gc.freeze()  # what the new sessions hold lives as long as they do
        return {"setup_ms": [round(t * 1e3, 2) for t in times], **self.status()}

    async def churn(self, seconds: float, rate: float) -> dict[str, Any]:
        """For ``seconds``: a held session ends and a new one begins, ``rate`` of each a second."""
        times: list[float] = []
        steps = int(seconds * rate)

        async def one(delay: float) -> None:
            await asyncio.sleep(delay)
            await asyncio.gather(self.end_one(), self._timed_set_up(times, 0.0))

        started = time.perf_counter()
        await asyncio.gather(*(one(i / rate) for i in range(steps)))
        await asyncio.sleep(max(0.0, seconds - (time.perf_counter() - started)))
        return {"churn_setup_ms": [round(t * 1e3, 2) for t in times], "ended": steps, **self.status()}

    def status(self) -> dict[str, Any]:
        errors, self.errors = dict(self.errors), Counter()
        pings, self.ping_ms = self.ping_ms, []
        return {
            "errors": errors,
            "cpu_s": time.process_time(),
            "sessions": len(self.sessions),
            "set_ups": self.set_ups,
            "ends": self.ends,
            "peers": sum(len(s.sockets) for s in self.sessions),
            "fds": open_fds(os.getpid()),
            "fd_limit": fd_limit(os.getpid()),
            "ping_ms": pings,
            **self.watch.take(),
        }


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
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, 1)  # short full passes: they walk only what the last freeze left out
    watch = LoopWatch()
    loop = asyncio.get_running_loop()
    watcher = loop.create_task(watch.run())
    target = AdminTarget(Path(args.admin_socket), os.environ[ADMIN_KEY_ENV])
    admin = Admin(target)  # type: ignore[arg-type]  # duck-typed: the socket path and the key
    worker = Worker(
        [int(p) for p in args.ports.split(",")],
        admin,
        args.worker,
        LOADS[args.load],
        args.restart_every,
        random.Random(args.worker),
        watch,
        ack=args.ack,
    )
    ticker = loop.create_task(worker.heartbeats())
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while line := await reader.readline():
            command = json.loads(line)
            if command["cmd"] == "add":
                reply = await worker.add(command["count"], command["rate"])
            elif command["cmd"] == "churn":
                reply = await worker.churn(command["seconds"], command["rate"])
            elif command["cmd"] == "status":
                reply = worker.status()
            else:
                break
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()
    finally:
        worker.stopping = True
        ticker.cancel()
        watcher.cancel()
        for session in worker.sessions:
            for sock in session.sockets:
                sock.close()
        await admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", type=int, required=True)
    parser.add_argument("--ports", required=True)
    parser.add_argument("--admin-socket", required=True)
    parser.add_argument("--load", choices=sorted(LOADS), required=True)
    parser.add_argument("--restart-every", type=float, required=True)
    parser.add_argument("--ack", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    raise_file_limit()
    use_uvloop()
    asyncio.run(worker_main(args))


if __name__ == "__main__":
    main()
