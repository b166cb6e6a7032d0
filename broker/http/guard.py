"""Slow and crowded HTTP clients: a deadline for a connection's request head, and a cap on
open connections per client address.

Without these, a few hundred connections that each send half a request line hold a file
descriptor apiece for as long as aiohttp's keep-alive timer (an hour by default), and a process
out of descriptors stops answering even ``/healthz``.

- **Head deadline.** A new connection must deliver its first request head (up to the blank
  line that ends it) within ``http_header_timeout_s``, or it is dropped without an answer.
  aiohttp 3.14 has no such setting: its ``keepalive_timeout`` also closes a connection still
  waiting for a head, but it is the same timer that keeps idle pooled connections from a reverse
  proxy, so it must stay long. We set it (``http_keepalive_s``) to bound idle connections and a
  later request's head, and time the first head ourselves: every accepted socket is handled by
  ``GuardedConnection``, an asyncio protocol of ours that passes everything on to aiohttp's
  protocol (``web.Server`` is a protocol factory by its public contract), watching the bytes
  only until the first head has arrived.
- **Per-address cap.** Serving clients directly, a connection from an address (IPv6: its /64,
  see client_address.py) that already holds ``max_http_connections_per_address`` open
  connections, WebSockets included, is closed as soon as it is accepted, before anything is
  read. Behind a trusted proxy every connection comes from the proxy, so there the cap counts
  requests in progress per forwarded address instead (``forwarded_limit``), and answers 429.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import cast

from aiohttp import web
from aiohttp.typedefs import Middleware

from broker.http.client_address import any_address_key, request_address_key

log = logging.getLogger("broker.http_guard")

#: Refusals and timeouts are logged at most this often (with a count): an attack cannot flood the log.
LOG_EVERY_S = 60.0
#: The blank line that ends a request head (CRLF CRLF, or the bare LF form aiohttp also reads).
_HEAD_ENDS = (b"\n\r\n", b"\n\n")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _Tally:
    """Counts one kind of event and logs it at most once per ``LOG_EVERY_S``, with how many there were."""

    __slots__ = ("event", "count", "logged_at")

    def __init__(self, event: str) -> None:
        self.event = event
        self.count = 0
        self.logged_at = float("-inf")

    def add(self, now: float) -> None:
        self.count += 1
        if now - self.logged_at >= LOG_EVERY_S:
            log.info("event=%s count=%d", self.event, self.count)
            self.count, self.logged_at = 0, now


class ConnectionGuard:
    """The head deadline and, when ``max_per_address`` is set, the per-address connection cap."""

    def __init__(
        self,
        *,
        secret: bytes,
        header_timeout_s: float,
        max_per_address: int | None,
        refused_hook: Callable[[], None] = lambda: None,
    ) -> None:
        self.secret = secret
        self.refused_hook = refused_hook
        self.header_timeout_s = header_timeout_s
        self.max_per_address = max_per_address
        #: Open connections per address key (an HMAC, never the address).
        self.open: Counter[str] = Counter()
        #: Connections accepted and closed so far (``heap.LongLivedHeap`` paces its reclaims by them).
        self.opened = 0
        self.closed = 0
        self.refused = _Tally("http_address_limit")
        self.overdue = _Tally("http_head_timeout")

    def protocol_factory(self, server: web.Server) -> Callable[[], asyncio.Protocol]:
        """What ``loop.create_server`` calls per accepted socket, in place of aiohttp's ``server``."""
        return lambda: GuardedConnection(self, server)

    def take(self, transport: asyncio.BaseTransport) -> tuple[bool, str | None]:
        """Count a new connection: (admitted, key to release when it closes)."""
        if self.max_per_address is None:
            return True, None
        peer = transport.get_extra_info("peername")
        if not isinstance(peer, tuple) or not peer:
            return True, None  # not an IP socket: nothing to count by
        key = any_address_key(self.secret, str(peer[0]))
        if self.open[key] >= self.max_per_address:
            self.refused.add(asyncio.get_running_loop().time())
            self.refused_hook()
            return False, None
        self.open[key] += 1
        return True, key

    def release(self, key: str) -> None:
        self.open[key] -= 1
        if self.open[key] <= 0:
            del self.open[key]


class GuardedConnection(asyncio.Protocol):
    """One accepted socket: refused over the cap, dropped if its first head is late, else aiohttp's."""

    __slots__ = ("guard", "server", "inner", "transport", "key", "deadline", "head_started", "tail")

    def __init__(self, guard: ConnectionGuard, server: web.Server) -> None:
        self.guard = guard
        self.server = server
        self.inner: asyncio.Protocol | None = None
        self.transport: asyncio.Transport | None = None
        self.key: str | None = None
        self.deadline: asyncio.TimerHandle | None = None
        self.head_started = False
        self.tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream socket's (asyncio's, TLS or uvloop's)
        self.guard.opened += 1
        admitted, self.key = self.guard.take(transport)
        if not admitted:
            self.transport.abort()  # at once, reading nothing
            return
        self.deadline = asyncio.get_running_loop().call_later(self.guard.header_timeout_s, self._head_overdue)
        self.inner = self.server()
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.deadline is not None:
            self._watch_head(data)
        inner = self.inner
        if inner is not None:
            inner.data_received(data)

    def _watch_head(self, data: bytes) -> None:
        """Disarm the deadline at the blank line ending the first head (empty lines before it do not count)."""
        if not self.head_started:
            data = data.lstrip(b"\r\n")
            if not data:
                return
            self.head_started = True
        window = self.tail + data
        if any(end in window for end in _HEAD_ENDS):
            assert self.deadline is not None
            self.deadline.cancel()
            self.deadline, self.tail = None, b""
        else:
            self.tail = window[-2:]

    def _head_overdue(self) -> None:
        self.deadline = None
        self.guard.overdue.add(asyncio.get_running_loop().time())
        if self.transport is not None:
            self.transport.abort()

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.closed += 1
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        if self.key is not None:
            self.guard.release(self.key)
            self.key = None
        if self.inner is not None:
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()


class GuardedSite(web.BaseSite):
    """A TCP site like ``web.TCPSite`` whose sockets are handled through a ``ConnectionGuard``."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        guard: ConnectionGuard,
        *,
        ssl_context: ssl.SSLContext | None = None,
        backlog: int = 128,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self.http_runner = runner
        self.host = host
        self.requested_port = port
        self.guard = guard
        self.tls = ssl_context
        self.listen_backlog = backlog
        self.listener: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The port listened on (the one chosen by the system when 0 was asked for)."""
        if self.listener is not None and self.listener.sockets:
            return int(self.listener.sockets[0].getsockname()[1])
        return self.requested_port

    @property
    def name(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    async def start(self) -> None:
        await super().start()  # registers the site with its runner, which stops it on cleanup
        server = self.http_runner.server
        assert server is not None, "runner.setup() comes first"
        self.listener = await asyncio.get_running_loop().create_server(
            self.guard.protocol_factory(server),
            self.host,
            self.requested_port,
            ssl=self.tls,
            backlog=self.listen_backlog,
            # A TLS handshake is part of a request's head: the same deadline.
            ssl_handshake_timeout=self.guard.header_timeout_s if self.tls else None,
        )

    async def stop(self) -> None:
        if self.listener is not None:
            self.listener.close()
        await super().stop()


def forwarded_limit(limit: int, secret: bytes, refused_hook: Callable[[], None] = lambda: None) -> Middleware:
    """Behind a trusted proxy: at most ``limit`` requests in progress (WebSockets included) per
    forwarded client address; more get 429 before any handler runs (and ``refused_hook`` is called).

    A request stops counting when aiohttp's task for it ends (a done callback): the middleware
    keeps no suspended coroutine of its own while the handler runs, which a WebSocket would hold
    as long as its session (about 400 bytes per connection, issue 32)."""
    in_progress: Counter[str] = Counter()
    refused = _Tally("http_address_limit")

    def release(key: str, _: object = None) -> None:
        in_progress[key] -= 1
        if in_progress[key] <= 0:
            del in_progress[key]

    async def counted(key: str, handling: Awaitable[web.StreamResponse]) -> web.StreamResponse:
        """Outside a task of its own (never in aiohttp): the count held by a coroutine instead."""
        try:
            return await handling
        finally:
            release(key)

    @web.middleware
    def middleware(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
        key = request_address_key(request, secret, True)
        if in_progress[key] >= limit:
            refused.add(asyncio.get_running_loop().time())
            refused_hook()
            raise web.HTTPTooManyRequests(text="Too many connections from this address.")
        in_progress[key] += 1
        task = asyncio.current_task()
        if task is None:
            return counted(key, handler(request))
        done = functools.partial(release, key)
        task.add_done_callback(done)
        try:
            return handler(request)
        except BaseException:
            task.remove_done_callback(done)
            release(key)
            raise

    return middleware
