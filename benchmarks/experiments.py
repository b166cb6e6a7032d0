"""Proposed broker optimisations, as monkeypatches applied only with ``--experiment NAME``.

The benchmarks never edit ``broker/``: a proposal is measured here first, and
the change itself goes to whoever owns the module (see benchmarks/README.md and
the 'Optimisation' sections of results.md). Each experiment states the change
it stands for.
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


@experiment("direct_write")
def direct_write() -> None:
    """Write a message straight to the socket when nothing is queued for that connection.

    Stands for: ``Connection.deliver`` (broker/hub.py) first tries a new
    ``Transport.send_nowait(data) -> bool`` (broker/server.py) when its queue is
    empty; the transport writes the frame at once with
    ``ws._writer`` unless the connection is closing or paused by back-pressure,
    and returns False then, so the message takes the queue as today. Order is
    kept: a frame goes direct only when nothing older waits. Saves a queue
    round trip and a task wake-up per message, and the bytes->str->bytes round
    trip of ``send_text``.
    """
    import asyncio

    from aiohttp import WSMsgType

    from broker import hub, server

    def send_nowait(self: server._AiohttpTransport, data: bytes) -> bool:
        writer = self.ws._writer
        if writer is None or self.ws.closed or writer.transport.is_closing() or writer.protocol._paused:
            return False
        writer._write_websocket_frame(data, WSMsgType.TEXT, 0)
        return True

    server._AiohttpTransport.send_nowait = send_nowait  # type: ignore[attr-defined]

    def deliver(self: hub.Connection, data: bytes, close: int | None = None) -> None:
        if self.closed:
            return
        if close is None and data and self.queue.empty() and not getattr(self, "_busy", False):
            send = getattr(self.transport, "send_nowait", None)
            if send is not None and send(data):
                return
        try:
            self.queue.put_nowait((data, close))
        except asyncio.QueueFull:
            self.closed = True
            hub.log.info("event=slow_consumer_closed conn=%s", self.id)
            asyncio.get_running_loop().create_task(self.transport.close(hub.CLOSE_TOO_SLOW, "too slow"))

    async def write_loop(self: hub.Connection) -> None:
        while True:
            data, close = await self.queue.get()
            self._busy = True  # type: ignore[attr-defined]
            try:
                if data:
                    await self.transport.send_text(data.decode())
                if close is not None:
                    self.closed = True
                    await self.transport.close(close, "")
                    return
            except (ConnectionError, RuntimeError):
                self.closed = True
                return
            finally:
                self._busy = False  # type: ignore[attr-defined]

    hub.Connection.deliver = deliver  # type: ignore[method-assign]
    hub.Connection.write_loop = write_loop  # type: ignore[method-assign]


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


@experiment("lean_connection")
def lean_connection() -> None:
    """No send queue and no writer task per connection until a message actually has to wait.

    Stands for, in broker/hub.py: ``Connection`` keeps a lazily made
    ``collections.deque`` (bounded by ``send_queue_limit`` as today) instead of an
    ``asyncio.Queue`` (three deques and a Queue object each, made for every
    connection), and ``Hub.open`` no longer starts a writer task per connection:
    ``deliver`` writes at once through ``Transport.send_nowait`` (see
    ``direct_write``) when nothing waits, and otherwise queues the message and
    starts a writer task that drains the queue and ends. An idle connection then
    holds no Queue, no Task and no suspended coroutine. ``Hub.shutdown`` keeps
    working: the queue object still answers ``empty()``.
    """
    _lean_connection(direct=True)


@experiment("lean_connection_deferred")
def lean_connection_deferred() -> None:
    """As ``lean_connection`` (no queue and no writer task while idle), but without writing at once:
    a message that finds no writer starts one, which writes in the loop's next pass, so messages that
    arrive together still leave together (what the permanent writer task does today)."""
    _lean_connection(direct=False)


def _lean_connection(direct: bool) -> None:
    import asyncio
    from collections import deque

    from broker import hub

    if direct:
        direct_write()

    class Pending:
        __slots__ = ("items", "limit")

        def __init__(self, limit: int) -> None:
            self.items: deque[tuple[bytes, int | None]] | None = None
            self.limit = limit

        def empty(self) -> bool:
            return not self.items

        def put_nowait(self, item: tuple[bytes, int | None]) -> None:
            if self.items is None:
                self.items = deque()
            if len(self.items) >= self.limit:
                raise asyncio.QueueFull
            self.items.append(item)

    def post_init(self: hub.Connection) -> None:
        self.queue = Pending(self.limits.send_queue_limit)  # type: ignore[assignment]
        self.bucket = hub.TokenBucket(self.limits.rate_per_s, self.limits.rate_burst)

    async def drain(self: hub.Connection) -> None:
        try:
            while self.queue.items:  # type: ignore[attr-defined]
                data, close = self.queue.items.popleft()  # type: ignore[attr-defined]
                if data:
                    await self.transport.send_text(data.decode())
                if close is not None:
                    self.closed = True
                    await self.transport.close(close, "")
                    return
        except (ConnectionError, RuntimeError):
            self.closed = True
        finally:
            self.writer = None

    def deliver(self: hub.Connection, data: bytes, close: int | None = None) -> None:
        if self.closed:
            return
        if direct and close is None and data and self.writer is None and self.queue.empty():
            send = getattr(self.transport, "send_nowait", None)
            if send is not None and send(data):
                return
        try:
            self.queue.put_nowait((data, close))
        except asyncio.QueueFull:
            self.closed = True
            hub.log.info("event=slow_consumer_closed conn=%s", self.id)
            asyncio.get_running_loop().create_task(self.transport.close(hub.CLOSE_TOO_SLOW, "too slow"))
            return
        if self.writer is None:
            self.writer = asyncio.get_running_loop().create_task(drain(self))

    def open_(self: hub.Hub, transport: hub.Transport) -> hub.Connection:
        conn = hub.Connection(transport, self.limits)
        self.connections[conn.id] = conn
        conn.deadline = asyncio.get_running_loop().call_later(self.limits.auth_deadline_s, self._auth_deadline, conn)
        return conn

    hub.Connection.__post_init__ = post_init  # type: ignore[method-assign]
    hub.Connection.deliver = deliver  # type: ignore[method-assign]
    hub.Hub.open = open_  # type: ignore[method-assign]


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


@experiment("hiredis")
def hiredis() -> None:
    """redis-py with the hiredis reply parser (C) instead of its pure-Python one.

    Stands for: add ``hiredis`` to the broker's dependencies (redis-py uses it
    by itself when it is importable; no code change). To measure it without
    installing it for everyone on the machine:
    ``pip install --target DIR hiredis`` and ``BENCH_HIREDIS_PATH=DIR``.
    """
    import os
    import sys

    path = os.environ.get("BENCH_HIREDIS_PATH")
    if path:
        sys.path.insert(0, path)
    import hiredis as _  # noqa: F401 - fails loudly when it is not there
    from redis.utils import HIREDIS_AVAILABLE

    assert HIREDIS_AVAILABLE, "redis-py did not pick up hiredis"


@experiment("relay_record_ttl")
def relay_record_ttl() -> None:
    """Relays check admission against a copy of the session record at most 100 ms old.

    Stands for, in broker/hub.py: ``_on_relay`` reads the session record through
    a per-process cache (record and the time it was read), used for 100 ms and
    dropped at once by any change this process makes (``_mutate``). On Redis
    every relay otherwise costs a GET of the sealed record (one of its two
    round trips). What the 100 ms allow: a relay accepted up to 100 ms after
    another process removed or declined a peer, a peer whose connection is
    being closed in that same moment; the resume buffer and the bus are
    unchanged. (A bus message that invalidates the copy on every change would
    remove even that window, at the price of more code.)
    """
    import contextvars
    import time

    from broker import hub

    in_relay: contextvars.ContextVar[bool] = contextvars.ContextVar("in_relay", default=False)
    cache: dict[str, tuple[float, object]] = {}
    load, mutate, relay = hub.Hub._load, hub.Hub._mutate, hub.Hub._on_relay

    async def cached_load(self: hub.Hub, session_id: str):  # type: ignore[no-untyped-def]
        if in_relay.get():
            hit = cache.get(session_id)
            if hit is not None and time.monotonic() - hit[0] < 0.1:
                return hit[1]
            record = await load(self, session_id)
            cache[session_id] = (time.monotonic(), record)
            return record
        return await load(self, session_id)

    async def invalidating_mutate(self: hub.Hub, session_id: str, *args, **kwargs):  # type: ignore[no-untyped-def]
        cache.pop(session_id, None)
        try:
            return await mutate(self, session_id, *args, **kwargs)
        finally:
            cache.pop(session_id, None)

    async def flagged_relay(self: hub.Hub, *args, **kwargs):  # type: ignore[no-untyped-def]
        token = in_relay.set(True)
        try:
            return await relay(self, *args, **kwargs)
        finally:
            in_relay.reset(token)

    hub.Hub._load = cached_load  # type: ignore[method-assign]
    hub.Hub._mutate = invalidating_mutate  # type: ignore[method-assign]
    hub.Hub._on_relay = flagged_relay  # type: ignore[method-assign]
    for kind, handler in list(hub.Hub._handlers.items()):  # dispatch goes through this table
        if handler is relay:
            hub.Hub._handlers[kind] = flagged_relay


@experiment("deque_mailbox")
def deque_mailbox() -> None:
    """The embedded store's capped logs (the resume buffer) as bounded deques.

    Stands for, in broker/store.py ``MemoryStore.append``: keep each log's entries
    in a ``collections.deque(maxlen=maxlen)`` and append in place, instead of
    building a new list of up to 129 entries and slicing it to 128 on every
    relayed message. ``read_since`` and the sweep read the deque as they read
    the list today.
    """
    from collections import deque

    from broker import store

    async def append(self: store.MemoryStore, key: str, value: bytes, maxlen: int, ttl_s: float) -> int:
        log = self._logs.get(key)
        now = self._clock()
        if log is None or log[2] <= now:
            last, entries = 0, deque(maxlen=maxlen)
        else:
            last, entries = log[0], log[1]
            if not isinstance(entries, deque) or entries.maxlen != maxlen:
                entries = deque(entries, maxlen=maxlen)
        entries.append((last + 1, value))
        self._logs[key] = (last + 1, entries, now + ttl_s)  # type: ignore[assignment]
        return last + 1

    store.MemoryStore.append = append  # type: ignore[method-assign]


@experiment("drop_deadline")
def drop_deadline() -> None:
    """Forget the auth-deadline timer once a connection has joined.

    Stands for, in broker/hub.py ``_join``: ``conn.deadline.cancel(); conn.deadline = None``
    (today the cancelled handle stays referenced by the connection for its whole life,
    and on uvloop a timer handle carries a libuv timer with it).
    """
    from broker import hub

    join = hub.Hub._join

    async def joined_then_drop(self: hub.Hub, conn: hub.Connection, message: object) -> None:
        try:
            await join(self, conn, message)  # type: ignore[arg-type]
        finally:
            if conn.joined and conn.deadline is not None:
                conn.deadline.cancel()
                conn.deadline = None

    hub.Hub._join = joined_then_drop  # type: ignore[method-assign]


@experiment("bounded_decode_cache")
def bounded_decode_cache(limit: int = 1024) -> None:
    """Keep at most ``limit`` decoded session records in the hub's cache, the most recently used.

    Stands for, in broker/hub.py: ``_decoded`` as a small LRU (an OrderedDict
    with ``move_to_end`` on a hit and ``popitem(last=False)`` past the limit).
    Today it holds one decoded record per session with a local connection, on top
    of the encoded record the store keeps: about 1 KiB per session that an idle
    session does not need. A miss costs one msgpack decode of the record.
    """
    from broker import hub

    decode = hub.Hub._decode

    def bounded(self: hub.Hub, session_id: str, raw: bytes):  # type: ignore[no-untyped-def]
        record = decode(self, session_id, raw)
        cache = self._decoded
        if session_id in cache:
            cache[session_id] = cache.pop(session_id)  # most recently used last
        while len(cache) > limit:
            cache.pop(next(iter(cache)))
        return record

    hub.Hub._decode = bounded  # type: ignore[method-assign]


@experiment("no_headers_on_upgrade")
def no_headers_on_upgrade() -> None:
    """Leave the document security headers off the WebSocket upgrade (101) response.

    Stands for, in broker/security_headers.py ``set_headers``: return at once for a
    ``web.WebSocketResponse``. CSP, frame, referrer and permissions policies
    govern documents; a 101 response is not one, and browsers ignore them there.
    aiohttp keeps a WebSocket response's headers (and their serialised copy)
    for the whole life of the connection: about 1-2 KiB per connection here.
    """
    from aiohttp import web

    from broker import security_headers

    set_headers = security_headers.set_headers

    def skip_upgrades(response: web.StreamResponse, *, tls: bool) -> None:
        if isinstance(response, web.WebSocketResponse):
            return
        set_headers(response, tls=tls)

    security_headers.set_headers = skip_upgrades  # type: ignore[assignment]


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


@experiment("one_expiry_timer")
def one_expiry_timer() -> None:
    """One timer for every session's expiry instead of a loop timer per session.

    Stands for, in broker/hub.py ``_add_local``/``_drop_local``: push
    (expires, session id, entry) on a heap that one task checks once a second,
    calling ``expire_due`` for what is due and skipping cancelled entries,
    instead of ``loop.call_later`` per session (a timer handle, a libuv timer
    and a closure each). Expiry is then up to a second late, for a window
    counted in minutes.
    """
    import asyncio
    import heapq

    from broker import hub

    class Due:
        __slots__ = ("cancelled",)

        def __init__(self) -> None:
            self.cancelled = False

        def cancel(self) -> None:
            self.cancelled = True

    heap: list[tuple[float, str, Due]] = []
    sweepers: dict[int, asyncio.Task[None]] = {}

    async def sweep(h: hub.Hub) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = h.clock()
            while heap and heap[0][0] <= now:
                _, sid, due = heapq.heappop(heap)
                if not due.cancelled:
                    h._spawn(h.expire_due(sid))

    add = hub.Hub._add_local

    async def add_local(self: hub.Hub, conn: hub.Connection) -> None:
        await add(self, conn)
        sid = conn.session_id or ""
        handle = self._expiry_timers.get(sid)
        if handle is not None and not isinstance(handle, Due):
            loop = asyncio.get_running_loop()
            expires = self.clock() + max(0.0, handle.when() - loop.time())
            handle.cancel()
            due = Due()
            heapq.heappush(heap, (expires, sid, due))
            self._expiry_timers[sid] = due  # type: ignore[assignment]
        if id(self) not in sweepers:
            sweepers[id(self)] = asyncio.get_running_loop().create_task(sweep(self))

    hub.Hub._add_local = add_local  # type: ignore[method-assign]
