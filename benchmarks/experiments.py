"""Proposed broker optimisations, as monkeypatches applied only with ``--experiment NAME``.

The benchmarks never edit ``broker/``: a proposal is measured here first, and
the change itself goes to whoever owns the module (see benchmarks/README.md and
the 'Optimisation' sections of results.md). Each experiment states the change
it stands for.

Landed in broker/ and therefore removed from here (results.md keeps their runs):
``drop_deadline`` and ``no_headers_on_upgrade`` (caaade7), ``hiredis`` (a
dependency since caaade7), ``lean_connection``/``direct_write`` (5a72d1f, with
the deferred variant's batching as ad69169), ``bounded_decode_cache``
(c8b32c5), ``one_expiry_timer`` (35b3a3f), ``relay_record_ttl`` (41a1b38, with
invalidation over the bus instead of a 100 ms bound), ``deque_mailbox``
(0d6c847), ``batched_record_refresh`` (ninth session: ``RELAY_RECORD_GATHER_S``).
Diagnoses (not proposals): ``count_writes``, ``no_record_refresh``, ``trace_relay_hop``,
``trace_path`` (driven by ``path_trace.py``). ``api_middlewares_apart`` landed and was taken back in the third
session (a97cd20, 2ace699): 0.6 KiB less per idle connection, but round trips
measured slower; it stays here to be measured again.
"""

from __future__ import annotations

from collections.abc import Callable

EXPERIMENTS: dict[str, Callable[[], None]] = {}


def experiment(name: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
    def register(fn: Callable[[], None]) -> Callable[[], None]:
        EXPERIMENTS[name] = fn
        return fn

    return register


def apply(name: str) -> None:
    for part in name.split("+"):
        if part not in EXPERIMENTS:
            raise SystemExit(f"unknown experiment {part!r}; known: {', '.join(sorted(EXPERIMENTS))}")
        EXPERIMENTS[part]()


@experiment("precompressed_static")
def precompressed_static() -> None:
    """Serve the browser client gzip-compressed.

    Stands for: ship a ``.gz`` beside every file of web/ (made at build time by
    the packaging step, or once at start-up into the data dir); aiohttp's
    ``FileResponse`` (used by ``add_static`` and by the page handlers in
    broker/server.py) already sends ``X.gz`` with ``Content-Encoding: gzip`` to a
    browser that accepts it, and ``X`` to one that does not. No code path in the
    broker changes. Here: a compressed copy of web/ in a temporary directory,
    with ``broker.server.web_root`` pointed at it.
    """
    import gzip
    import shutil
    import tempfile
    from pathlib import Path

    from broker import server

    source = server.web_root()
    copy = Path(tempfile.mkdtemp(prefix="web-gz-")) / "web"
    shutil.copytree(source, copy)
    for path in copy.rglob("*"):
        if path.is_file() and path.suffix in (".html", ".js", ".css", ".svg", ".json"):
            path.with_name(path.name + ".gz").write_bytes(gzip.compress(path.read_bytes(), 9, mtime=0))
    server.web_root = lambda: copy  # type: ignore[assignment]


@experiment("gc_freeze")
def gc_freeze() -> None:
    """Move everything alive once the broker has started into the GC's permanent generation.

    Stands for: ``gc.collect(); gc.freeze()`` in broker/serve.py right after
    ``create_broker`` (the modules of aiortc, PyAV, cryptography and aiohttp are
    loaded by then). Those objects never become garbage, and a full collection
    then no longer walks them, which shortens every full-collection pause.
    """
    import gc

    from broker import serve

    create = serve.create_broker

    async def create_broker(*args, **kwargs):  # type: ignore[no-untyped-def]
        made = await create(*args, **kwargs)
        gc.collect()
        gc.freeze()
        return made

    serve.create_broker = create_broker  # type: ignore[assignment]


@experiment("api_middlewares_apart")
def api_middlewares_apart() -> None:
    """The /api/ middlewares (CSRF, store errors) no longer wrap /ws and the pages.

    Stands for: mount the dashboard JSON API as an aiohttp sub-application at
    /api/ carrying those two middlewares (broker/web_auth.py, broker/dashboard.py),
    so a WebSocket's request is wrapped by the security-headers middleware only.
    Each middleware that wraps /ws keeps a suspended coroutine frame for the life
    of the connection even when it does nothing for it. (For the measurement the
    two are simply left off: the benchmark does not call /api/.)
    """
    from broker import server

    build = server.build_app

    def without_api_middlewares(broker):  # type: ignore[no-untyped-def]
        app = build(broker)
        keep = [m for m in app.middlewares if getattr(m, "__name__", "") not in ("_store_errors",)
                and getattr(m, "__qualname__", "").split(".")[0] != "csrf_middleware"]
        app.middlewares[:] = keep
        return app

    server.build_app = without_api_middlewares  # type: ignore[assignment]
    from broker import serve

    serve.build_app = without_api_middlewares  # type: ignore[assignment]


@experiment("count_writes")
def count_writes() -> None:
    """Diagnosis, not a proposal: counts WebSocket writes, frames, Redis pipeline batches, commands and
    the relayed messages they carry, every second to /tmp."""
    import asyncio
    import json
    import os

    from broker import server
    from broker.bus_redis import _Pipe, _Relays

    # Each WebSocket frame is one write since the broker uses aiohttp's public send_frame only.
    counts = {"ws_writes": 0, "ws_frames": 0, "redis_batches": 0, "redis_commands": 0, "redis_relay_commands": 0, "relays": 0}
    send_text = server._AiohttpTransport.send_text

    def counted(self, data):  # type: ignore[no-untyped-def]
        counts["ws_writes"] += 1
        counts["ws_frames"] += 1
        return send_text(self, data)

    server._AiohttpTransport.send_text = counted  # type: ignore[method-assign]
    send = _Pipe.send

    def counted_send(self, batch):  # type: ignore[no-untyped-def]
        counts["redis_batches"] += 1
        counts["redis_commands"] += len(batch)
        for _, settles in batch:
            if isinstance(settles, _Relays):
                counts["redis_relay_commands"] += 1
                counts["relays"] += len(settles.envelopes)
        return send(self, batch)

    _Pipe.send = counted_send  # type: ignore[method-assign]
    path = f"/tmp/count_writes.{os.getpid()}.jsonl"

    async def dump() -> None:
        while True:
            await asyncio.sleep(1.0)
            with open(path, "a") as out:
                out.write(json.dumps(counts) + "\n")

    from broker import serve

    original = serve.build_app

    def build_app(broker):  # type: ignore[no-untyped-def]
        asyncio.get_running_loop().create_task(dump())
        return original(broker)

    serve.build_app = build_app


@experiment("no_record_refresh")
def no_record_refresh() -> None:
    """Diagnosis, not a proposal: relays use their copy of the session record for 60 s instead of
    0.5 s, so no record is read again while P4 runs (what those reads cost the latency)."""
    from broker import hub

    hub.RELAY_RECORD_MAX_AGE_S = 60.0
    hub.RELAY_RECORD_REFRESH_S = 30.0


@experiment("trace_relay_hop")
def trace_relay_hop() -> None:
    """Diagnosis, not a proposal: per relay command on Redis, how long from its first relay's
    arrival at the bus to its write to Redis, and from there to Redis's answer; count, p50 and p95
    (ms) of each, every second, to /tmp/trace_relay_hop.<pid>.json (the latency phase is the
    last seconds of each broker's file)."""
    import asyncio
    import json
    import os
    import time

    from broker import bus_redis

    queued: dict[int, float] = {}
    spans: dict[str, list[float]] = {"queue_to_write": [], "write_to_reply": [], "queue_to_reply": []}
    written: dict[int, float] = {}
    queue = bus_redis.RedisBus._queue
    send = bus_redis._Pipe.send
    set_result = bus_redis._Relays.set_result

    def traced_queue(self, outgoing):  # type: ignore[no-untyped-def]
        if isinstance(outgoing, bus_redis._Relays):
            queued[id(outgoing)] = time.perf_counter()
        return queue(self, outgoing)

    def traced_send(self, batch):  # type: ignore[no-untyped-def]
        now = time.perf_counter()
        for _, done in batch:
            if isinstance(done, bus_redis._Relays) and id(done) in queued:
                written[id(done)] = now
                spans["queue_to_write"].append(now - queued[id(done)])
        return send(self, batch)

    def traced_set_result(self, first):  # type: ignore[no-untyped-def]
        now = time.perf_counter()
        q, w = queued.pop(id(self), None), written.pop(id(self), None)
        if q is not None and w is not None:
            spans["write_to_reply"].append(now - w)
            spans["queue_to_reply"].append(now - q)
        return set_result(self, first)

    bus_redis.RedisBus._queue = traced_queue  # type: ignore[method-assign]
    bus_redis._Pipe.send = traced_send  # type: ignore[method-assign]
    bus_redis._Relays.set_result = traced_set_result  # type: ignore[method-assign]

    async def dump() -> None:
        while True:
            await asyncio.sleep(1)
            out = {}
            for name, values in spans.items():
                v = sorted(values)
                if v:
                    out[name] = [len(v), round(v[len(v) // 2] * 1e3, 3), round(v[int(len(v) * 0.95)] * 1e3, 3)]
                values.clear()
            with open(f"/tmp/trace_relay_hop.{os.getpid()}.json", "a") as f:
                f.write(json.dumps(out) + "\n")

    from broker import serve

    create = serve.create_broker

    async def create_broker(*args, **kwargs):  # type: ignore[no-untyped-def]
        made = await create(*args, **kwargs)
        asyncio.get_running_loop().create_task(dump())
        return made

    serve.create_broker = create_broker  # type: ignore[assignment]


@experiment("trace_path")
def trace_path() -> None:
    """Diagnosis, not a proposal: timestamps of each relayed message on the Redis path, for a driver
    to join with its own send and receive times (the clock is CLOCK_MONOTONIC, shared by processes).

    The sending process notes, per relay, when it reached the bus and when its command was written
    to Redis, keyed by (recipient peer, seq); the receiving process notes when the bus message was
    read and when its handlers were done. The newest 40,000 of each go to
    ``trace_path.<pid>.json`` in $TRACE_PATH_DIR (default /tmp) on SIGUSR1. ``path_trace.py``
    drives it.
    """
    import asyncio
    import json
    import os
    import signal
    import time
    from collections import deque

    from broker import bus_redis

    clock = time.perf_counter
    added: dict[int, list[float]] = {}
    firsts: dict[int, int] = {}
    writes: deque[tuple[str | None, int, tuple[float, float], float]] = deque(maxlen=40_000)
    reads: deque[tuple[str | None, int, float, float]] = deque(maxlen=40_000)
    add = bus_redis._Relays.add
    expected_seq = bus_redis.RedisBus._expected_seq
    send = bus_redis._Pipe.send
    deliver_remote = bus_redis.RedisBus._deliver_remote
    open_ = bus_redis.RedisBus._open
    opened: list = []

    from broker import hub as hub_module

    receive_now = hub_module.Hub.receive_now
    frame_read = [0.0]

    def traced_receive_now(self, conn, data):  # type: ignore[no-untyped-def]
        frame_read[0] = clock()
        return receive_now(self, conn, data)

    hub_module.Hub.receive_now = traced_receive_now  # type: ignore[method-assign]

    def traced_add(self, envelope, entry, ttl_ms, settle):  # type: ignore[no-untyped-def]
        added.setdefault(id(self), []).append((frame_read[0], clock()))
        return add(self, envelope, entry, ttl_ms, settle)

    def traced_expected_seq(self, relays):  # type: ignore[no-untyped-def]
        first = expected_seq(self, relays)
        firsts[id(relays)] = first
        return first

    def traced_send(self, batch):  # type: ignore[no-untyped-def]
        now = clock()
        for _, done in batch:
            if isinstance(done, bus_redis._Relays):
                first, times = firsts.pop(id(done), None), added.pop(id(done), None)
                if first is not None and times is not None:
                    for n, (envelope, t) in enumerate(zip(done.envelopes, times)):
                        writes.append((envelope.to_peer, first + n, t, now))
        return send(self, batch)

    def traced_open(self, channel, node_id, body):  # type: ignore[no-untyped-def]
        envelopes = open_(self, channel, node_id, body)
        opened.extend(envelopes)
        return envelopes

    def traced_deliver_remote(self, channel, payload):  # type: ignore[no-untyped-def]
        start = clock()
        opened.clear()
        deliver_remote(self, channel, payload)
        end = clock()
        for envelope in opened:
            reads.append((envelope.to_peer, envelope.seq or 0, start, end))
        opened.clear()

    bus_redis._Relays.add = traced_add  # type: ignore[method-assign]
    bus_redis.RedisBus._expected_seq = traced_expected_seq  # type: ignore[method-assign]
    bus_redis._Pipe.send = traced_send  # type: ignore[method-assign]
    bus_redis.RedisBus._open = traced_open  # type: ignore[method-assign]
    bus_redis.RedisBus._deliver_remote = traced_deliver_remote  # type: ignore[method-assign]

    def dump() -> None:
        with open(os.path.join(os.environ.get("TRACE_PATH_DIR", "/tmp"), f"trace_path.{os.getpid()}.json"), "w") as out:
            json.dump({"writes": list(writes), "reads": list(reads)}, out)

    from broker import serve

    create = serve.create_broker

    async def create_broker(*args, **kwargs):  # type: ignore[no-untyped-def]
        made = await create(*args, **kwargs)
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, dump)
        return made

    serve.create_broker = create_broker  # type: ignore[assignment]
