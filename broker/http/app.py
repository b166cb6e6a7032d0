"""The aiohttp application: pages, health, and the signaling WebSocket.

A thin layer: it checks what HTTP must check (Origin, per-address limits,
frame size), then hands text frames to the hub. Everything session-related
lives in ``broker.signaling.hub`` and ``broker.signaling.session``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web
from aiohttp.typedefs import Handler, Middleware
from redis.exceptions import RedisError

from broker.accounts.account_store import AccountStore, open_accounts
from broker.accounts.throttle import Throttle
from broker.accounts.throttle_memory import LoginThrottle
from broker.accounts.throttle_redis import RedisLoginThrottle
from broker.audit.log import AuditLog
from broker.audit.setup import open_audit_log
from broker.config import Config, Keys, load_or_create_secret
from broker.http.client_address import request_address_key
from broker.http.client_pages import ClientPages, join_page_response, setup_client_pages
from broker.http.dashboard import setup_dashboard
from broker.http.guard import forwarded_limit
from broker.http.login import setup_auth
from broker.http.notice_pages import not_found_pages, notice_response
from broker.http.pages import LINK_PAGES, PAGES, STATIC_PREFIX, WEB_ROOT, html_page, web_root
from broker.http.password_routes import setup_password
from broker.http.security_headers import security_headers, security_middleware, security_signal
from broker.http.vault_routes import setup_vault
from broker.http.web_manifest_routes import setup_web_manifest
from broker.janus.scheduling import janus_connect_source, media_planner, sweep_forever
from broker.metrics.labels import ThrottleLimit
from broker.metrics.readiness import ReadinessCollector
from broker.metrics.registry import METRICS, Metrics
from broker.metrics.runtime import Runtime
from broker.metrics.scrape import HubCollector
from broker.signaling.admission import BrokerPreflight, PolicyChecklist
from broker.signaling.connections import CLOSE_POLICY, Limits
from broker.signaling.hub import Hub
from broker.signaling.protocol import MAX_MESSAGE_BYTES, Error, ErrorCode, ProtocolError, encode
from broker.signaling.record import RecordSigner
from broker.signaling.session import MAX_AHEAD_S, invalid_token_error
from broker.signaling.tokens import TokenClaims, TokenCodec
from broker.store.backends import open_backends
from broker.store.base import Store, StoreUnavailable
from broker.store.bus import Bus
from broker.store.memory import MemoryStore
from broker.store.redis_marker import StoreMarker
from broker.store.redis_store import RedisStore
from broker.webmanifest.pins import import_map_hash

log = logging.getLogger("broker.server")


@dataclass
class Broker:
    """Everything one broker process runs, built from its configuration."""

    config: Config
    keys: Keys
    store: Store
    bus: Bus
    hub: Hub
    preflight: BrokerPreflight
    audit: AuditLog
    signer: RecordSigner
    accounts: AccountStore
    throttle: Throttle
    #: On Redis: whether the session Redis came back empty (None on the embedded store).
    marker: StoreMarker | None = None
    background: list[asyncio.Task[Any]] = field(default_factory=list)
    #: This process's metrics (served by broker/metrics/site.py on their own address).
    metrics: Metrics = field(default_factory=Metrics)
    runtime: Runtime | None = None
    #: The practice's title for the client's pages and its quick exit page (from the policy file).
    client_pages: ClientPages = field(default_factory=ClientPages)

    async def readiness(self) -> dict[str, Any]:
        """What /readyz answers (and ``broker_ready`` exports): ready once the store answers and the
        process accepts peers; on Redis, also when the session Redis was found emptied."""
        try:
            ok = await asyncio.wait_for(self.store.ping(), 1.0)
        except Exception:
            ok = False
        body: dict[str, Any] = {"ready": ok and self.hub.accepting, "store": ok, "accepting": self.hub.accepting}
        if self.marker is not None:
            # Reported, not a reason to stop serving: the pages must still tell people what happened.
            body["store_emptied_at"] = self.marker.emptied_at
        return body

    async def close(self) -> None:
        for task in self.background:
            task.cancel()
        if self.runtime is not None:
            await self.runtime.stop()
        await self.preflight.close()
        await self.hub.media.aclose()
        await self.audit.aclose()
        await self.accounts.close()
        await self.bus.close()
        await self.store.close()


async def create_broker(config: Config, *, store: Store | None = None, bus: Bus | None = None) -> Broker:
    keys = Keys(load_or_create_secret(config))
    if store is None or bus is None:
        store, bus = await open_backends(
            config.redis_url, keys.store, session_file=config.sessions_path, session_key=keys.sessions
        )
    limits = Limits(
        auth_deadline_s=config.auth_deadline_s,
        heartbeat_s=config.heartbeat_s,
        rate_per_s=config.rate_per_s,
        rate_burst=config.rate_burst,
        send_queue_limit=config.send_queue_limit,
    )
    preflight = BrokerPreflight.from_config(config)
    audit_log = open_audit_log(config, keys)
    accounts = await open_accounts(config, keys)
    signer = RecordSigner(keys.signing_seed)
    metrics = Metrics()
    preflight.metrics = metrics
    checklist = PolicyChecklist.from_config(config)
    hub = Hub(
        store,
        bus,
        TokenCodec(keys.token),
        limits=limits,
        checklist=checklist,
        preflight=preflight,
        ice_servers=_ice_servers(config, keys),
        audit=audit_hook(audit_log),
        signer=signer,
        metrics=metrics,
    )
    hub.media = media_planner(config, keys)
    await hub.start()
    throttle = throttle_for(store)
    broker = Broker(config, keys, store, bus, hub, preflight, audit_log, signer, accounts, throttle, metrics=metrics)
    broker.client_pages = ClientPages.from_policy(checklist.policy)
    collector = HubCollector(hub)
    metrics.registry.register(collector)
    metrics.before_scrape.append(collector.refresh)
    readiness = ReadinessCollector(
        ready=lambda: _is_ready(broker), emptied_at=lambda: broker.marker.emptied_at if broker.marker else None
    )
    metrics.registry.register(readiness)
    metrics.before_scrape.append(readiness.refresh)
    broker.runtime = Runtime(metrics)
    broker.runtime.start()
    if hub.media.rooms is not None:
        broker.background.append(asyncio.get_running_loop().create_task(sweep_forever(hub.media, hub.get_session)))
    if isinstance(store, MemoryStore):
        broker.background.append(asyncio.get_running_loop().create_task(store.run_sweeper()))
    if isinstance(store, RedisStore):
        store.on_command = metrics.store_command
        broker.marker = marker = StoreMarker(store.redis, keep_s=EMPTIED_KEEP_S, data_dir=config.data_dir)
        hub.missing_session = functools.partial(missing_session_error, marker)
        hub.store_lost_now = marker.check
        broker.background.append(asyncio.get_running_loop().create_task(marker.watch()))
    return broker


#: How long links are told their session was lost after the session Redis came back empty: until
#: every link made before has expired (scheduled at most MAX_AHEAD_S ahead, 12 h long, plus grace).
EMPTIED_KEEP_S = MAX_AHEAD_S + 2 * 24 * 3600

SESSION_NOT_FOUND_MESSAGE = (
    "The service lost its record of this session, so the link cannot open it. "
    "Nothing you did caused this. Please contact your therapist, who can send you a new link."
)


def missing_session_error(marker: StoreMarker, claims: TokenClaims) -> ProtocolError:
    """The answer to a genuine link whose session is not in the store: ``invalid_token``, as for
    every link that does not work, unless the session Redis was found emptied while this link was
    still valid; then say plainly that the session could not be found, and what to do."""
    if marker.emptied_at is not None and claims.expires > marker.emptied_at:
        return ProtocolError(ErrorCode.SESSION_NOT_FOUND, SESSION_NOT_FOUND_MESSAGE)
    return invalid_token_error()


_OUTCOMES = {"ok": "ok", "ended": "ok", "expired": "expired", "warning": "warning"}


def audit_hook(audit_log: AuditLog) -> Any:
    """Hub events into the content-free audit log: fixed words and opaque ids only."""

    async def record(event: str, actor: str | None, session: str | None, outcome: str) -> None:
        who = f"{session}-{actor}" if actor and session else None
        try:
            await audit_log.append(event, who, session, _OUTCOMES.get(outcome, "failed"))
        except (ValueError, OSError):
            log.exception("event=audit_append_failed audit_event=%s", event)

    return record


def throttle_for(store: Store) -> Throttle:
    """The throttle a broker process uses: on the session store's Redis client when it has one
    (so every process shares the counters), else in this process's memory."""
    if isinstance(store, RedisStore):
        return RedisLoginThrottle(store.redis)
    return LoginThrottle()


def _ice_servers(config: Config, keys: Keys) -> Any:
    """Short-lived TURN credentials per peer (TURN REST API); never a static password in a page."""
    if not config.turn_urls:
        return None
    from broker.signaling.turn import credential_ttl, opaque_peer_id, resolve_turn_secret, turn_credentials

    secret = resolve_turn_secret(config.turn_secret or None, config.turn_secret_file or None)
    assert secret, "check_config refuses TURN URLs without a secret"
    urls = list(config.turn_urls)
    user_key = keys.derive("turn-user")

    def servers(peer: str, remaining_s: int) -> list[dict[str, Any]]:
        ttl = credential_ttl(remaining_s)
        return [dict(turn_credentials(secret, urls, ttl, opaque_id=opaque_peer_id(user_key, peer)))]

    return servers


# ---------------------------------------------------------------- pages


async def _resolve_link(request: web.Request) -> Any:
    """The seat a link opens. A link without a session first has the session Redis's mark looked
    at once more, so a link opened just after Redis came back empty is already told so."""
    hub: Hub = request.app[HUB]
    token = request.match_info["token"]
    try:
        return (await hub.resolve_token(token))[1]
    except ProtocolError as exc:
        marker = request.app[BROKER].marker
        if exc.code is ErrorCode.INVALID_TOKEN and marker is not None:
            # This look, or the periodic one that ran just before it, may find the store emptied:
            # asked again, the link answers from what is known now (session_not_found, or as before).
            await marker.check()
            return (await hub.resolve_token(token))[1]
        raise


async def _link_page(request: web.Request, page: str, role: str) -> web.StreamResponse:
    try:
        seat = await _resolve_link(request)
        if seat.role.value != role:
            raise ProtocolError(ErrorCode.INVALID_TOKEN, "This link does not open this page.")
    except ProtocolError as exc:
        return notice_response(request, exc.code.value)
    if role == "client":
        return join_page_response(request)
    return html_page(request, page)


async def join_page(request: web.Request) -> web.StreamResponse:
    return await _link_page(request, LINK_PAGES["/j/"], "client")


async def therapist_page(request: web.Request) -> web.StreamResponse:
    return await _link_page(request, LINK_PAGES["/t/"], "therapist")


async def index_page(request: web.Request) -> web.StreamResponse:
    return html_page(request, PAGES["/"])


async def signing_key(request: web.Request) -> web.Response:
    """The public key that verifies session records (a JWK set)."""
    broker: Broker = request.app[BROKER]
    return web.json_response({"keys": [broker.signer.public_jwk()]})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def readyz(request: web.Request) -> web.Response:
    body = await request.app[BROKER].readiness()
    return web.json_response(body, status=200 if body["ready"] else 503)


async def _is_ready(broker: Broker) -> bool:
    return bool((await broker.readiness())["ready"])


# ---------------------------------------------------------------- WebSocket


class _AiohttpTransport:
    """The hub's view of one aiohttp WebSocket, through its public API only (docs/security.md 3.6)."""

    __slots__ = ("ws", "request", "sent_close")

    def __init__(self, ws: web.WebSocketResponse, request: web.Request) -> None:
        self.ws = ws
        self.request = request
        #: The code the broker closed the socket with, if it did (counted by broker/metrics).
        self.sent_close: int | None = None

    async def send_text(self, data: bytes) -> None:
        """One text frame (UTF-8 JSON, never compressed); waits only while the peer's socket is paused."""
        await self.ws.send_frame(data, WSMsgType.TEXT)

    async def close(self, code: int, reason: str) -> None:
        if self.sent_close is None:
            self.sent_close = code
        await self.ws.close(code=code, message=reason.encode())

    async def ping(self) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.ws.ping()

    def abort(self) -> None:
        """The TCP connection is dropped (``Request.transport``): the socket's reader ends at once."""
        transport = self.request.transport
        if transport is not None:
            transport.abort()


def origin_allowed(origin: str | None, allowed: tuple[str, ...]) -> bool:
    """Exact match against the configured origins: no suffixes, no case tricks, no 'null'."""
    if not origin:
        return False
    return origin in allowed


async def websocket(request: web.Request) -> web.StreamResponse:
    config: Config = request.app[CONFIG]
    hub: Hub = request.app[HUB]
    if not origin_allowed(request.headers.get("Origin"), config.origins):
        log.info("event=ws_origin_refused")
        raise web.HTTPForbidden(text="Origin not allowed.")
    counts: Counter[str] = request.app[ADDRESS_COUNTS]
    key = request_address_key(request, request.app[KEYS].address, config.trust_proxy)  # IPv6: per /64
    if counts[key] >= config.max_connections_per_address:
        log.info("event=ws_address_limit")
        request.app[METRICS].throttle(ThrottleLimit.WEBSOCKET_PER_ADDRESS)
        raise web.HTTPTooManyRequests(text="Too many connections from this address.")
    ws = web.WebSocketResponse(
        # aiohttp refuses frames of max_msg_size bytes or more; the protocol allows exactly 64 KiB.
        max_msg_size=MAX_MESSAGE_BYTES + 1,
        compress=False,
        # The hub's heartbeat pings and cuts off silent peers (Connections.beat): aiohttp's own
        # would round its timers above 5 s to whole seconds and give a silent peer 1.5 heartbeats.
        heartbeat=None,
        autoping=False,
    )
    await ws.prepare(request)
    counts[key] += 1
    transport = _AiohttpTransport(ws, request)
    conn = hub.open(transport)
    metrics = request.app[METRICS]
    frame_size = metrics.message_sizes.observe
    try:
        while True:
            msg = await ws.receive()
            if msg.type is WSMsgType.TEXT:
                frame_size(len(msg.data))
                pending = hub.receive_now(conn, msg.data)
                if pending is not None:
                    await pending
                    pending = None  # a finished coroutine kept until the next frame costs ~250 B per idle connection
            elif msg.type is WSMsgType.PONG:
                hub.connections.heard_from(conn)
            elif msg.type is WSMsgType.PING:
                hub.connections.heard_from(conn)
                await ws.pong(msg.data)
            elif msg.type is WSMsgType.BINARY:
                conn.deliver(encode(Error(code=ErrorCode.BAD_MESSAGE, message="Only JSON text frames are accepted.")))
            else:
                break
            del msg  # not kept while the next frame is awaited: a held connection's last frame (up to 64 KiB)
    finally:
        counts[key] -= 1
        if counts[key] <= 0:
            del counts[key]
        await hub.closed(conn)
        if not ws.closed:
            await ws.close(code=CLOSE_POLICY if ws.close_code is None else ws.close_code)
        metrics.closed(transport.sent_close if transport.sent_close is not None else ws.close_code)
    return ws


# ---------------------------------------------------------------- app

#: The signaling WebSocket's address.
WEBSOCKET_PATH = "/ws"


def skips_websocket(middleware: Middleware) -> Middleware:
    """``middleware`` for every request but the signaling WebSocket's, which is handed straight on:
    for a middleware with nothing to do for it. A WebSocket's request lasts as long as its session,
    and each async middleware it goes through keeps a suspended coroutine that long: about 300
    bytes, and one more object for every full pass of the garbage collector, per connection."""

    @web.middleware
    def passing(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
        if request.path == WEBSOCKET_PATH:
            return handler(request)
        return middleware(request, handler)

    return passing


@web.middleware
async def store_outage_pages(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A page (a link, the dashboard, the login page) that cannot reach the store answers the 503
    notice, never aiohttp's bare 500. The JSON API has its own answer (503 ``unavailable``)."""
    if request.path.startswith("/api/"):
        return await handler(request)
    try:
        return await handler(request)
    except (StoreUnavailable, RedisError, ConnectionError, TimeoutError):
        log.warning("event=page_unavailable")
        return notice_response(request, ErrorCode.UNAVAILABLE.value)


@web.middleware
async def compress_files(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The browser client's files go out compressed to browsers that accept it (a 3-4x smaller join page).

    Only files from web/ are compressed: they hold no secret, so compression cannot leak one.
    """
    response = await handler(request)
    conditional = any(h in request.headers for h in ("If-None-Match", "If-Modified-Since", "Range", "If-Range"))
    if isinstance(response, web.FileResponse) and request.method == "GET" and not conditional:
        # Not for HEAD, 304 or ranges: aiohttp would write a compressed body where none may be.
        response.enable_compression()
    return response


CONFIG = web.AppKey("config", Config)
HUB = web.AppKey("hub", Hub)
STORE: web.AppKey[Store] = web.AppKey("store")
KEYS = web.AppKey("keys", Keys)
ADDRESS_COUNTS: web.AppKey[Counter[str]] = web.AppKey("address_counts")
BROKER = web.AppKey("broker", Broker)


def build_app(broker: Broker) -> web.Application:
    config = broker.config
    # Behind a trusted proxy the per-address HTTP cap counts forwarded requests (serving directly,
    # serve.py's ConnectionGuard counts connections instead).
    limits: list[Any] = []
    if config.trust_proxy:
        refused = functools.partial(broker.metrics.throttle, ThrottleLimit.HTTP_PER_ADDRESS)
        limits.append(forwarded_limit(config.max_http_connections_per_address, broker.keys.address, refused))
    root = web_root(config.web_root)
    # The CSP allows the pages' import map by its hash, computed from the modules the pages pin.
    # Janus's origin joins connect-src only when it is not ours (janus_connect_source).
    headers = security_headers([import_map_hash(root)], [o for o in [janus_connect_source(config)] if o])
    # The WebSocket passes through the middlewares with nothing to do for it without a frame in
    # each (skips_websocket): its refusals get their headers from security_signal as they are sent.
    # It counts towards the per-address limit, whose middleware it goes through.
    app = web.Application(
        middlewares=[
            skips_websocket(security_middleware(config.trust_proxy, headers)),
            *limits,
            skips_websocket(store_outage_pages),
            skips_websocket(not_found_pages),
            skips_websocket(compress_files),
        ],
        client_max_size=256 * 1024,
    )
    app.on_response_prepare.append(security_signal(config.trust_proxy, headers))
    app[WEB_ROOT] = root
    app[CONFIG] = config
    app[HUB] = broker.hub
    app[STORE] = broker.store
    app[KEYS] = broker.keys
    app[ADDRESS_COUNTS] = Counter()
    app[BROKER] = broker
    app[METRICS] = broker.metrics
    app.router.add_get("/", index_page, name="index")
    app.router.add_get("/healthz", healthz, name="healthz")
    app.router.add_get("/readyz", readyz, name="readyz")
    app.router.add_get(WEBSOCKET_PATH, websocket, name="ws")
    app.router.add_get("/.well-known/broker-signing-key", signing_key, name="signing_key")
    app.router.add_get("/j/{token}", join_page, name="join")
    app.router.add_get("/t/{token}", therapist_page, name="therapist")
    setup_web_manifest(app)
    app.router.add_static(STATIC_PREFIX, root, name="static", follow_symlinks=False)
    setup_client_pages(app, broker.client_pages)
    setup_auth(
        app,
        store=broker.store,
        accounts=broker.accounts,
        throttle=broker.throttle,
        audit=broker.audit,
        config=config,
        keys=broker.keys,
    )
    setup_dashboard(
        app, hub=broker.hub, store=broker.store, relay_available=bool(config.turn_urls), languages=config.languages
    )
    setup_vault(app, store=broker.store)
    setup_password(app)
    return app
