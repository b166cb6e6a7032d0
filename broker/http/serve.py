"""Running a broker process: sockets, signals and a graceful stop."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import signal
import sys
from typing import TextIO

from aiohttp import web

from broker.config import Config
from broker.http.admin_socket import admin_app, start_admin_site
from broker.http.app import build_app, create_broker
from broker.http.guard import ConnectionGuard, GuardedSite
from broker.http.heap import LongLivedHeap
from broker.http.security_headers import PrivateAccessLogger
from broker.metrics.labels import ThrottleLimit
from broker.metrics.site import start_metrics_site

log = logging.getLogger("broker.serve")

#: SIGTERM: peers are told to reconnect elsewhere, and the process exits well within 10 s.
SHUTDOWN_GRACE_S = 3.0


async def serve(
    config: Config, *, out: TextIO = sys.stdout, stop: asyncio.Event | None = None, self_signed_tls: bool = False
) -> None:
    ssl_context = None
    if self_signed_tls:
        from broker.crypto.tls import self_signed, server_context

        cert, key, fp = self_signed(config.data_dir / "tls", config.host)
        ssl_context = server_context(cert, key)
        print(
            "TLS: a SELF-SIGNED certificate, for a trial on your own network only — not for production.\n"
            f"Browsers will warn; before accepting, check the certificate's SHA-256 fingerprint is\n  {fp}",
            file=out,
        )
        if not config.public_url:
            host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
            config = dataclasses.replace(config, public_url=f"https://{host}:{config.port}")
    broker = await create_broker(config)
    app = build_app(broker)
    runner = web.AppRunner(
        app,
        access_log_class=PrivateAccessLogger,
        shutdown_timeout=SHUTDOWN_GRACE_S,
        keepalive_timeout=config.http_keepalive_s,  # idle connections, and heads after the first (guard.py)
    )
    await runner.setup()
    guard = ConnectionGuard(
        secret=broker.keys.address,
        header_timeout_s=config.http_header_timeout_s,
        # Behind a trusted proxy every connection is the proxy's: build_app counts forwarded requests instead.
        max_per_address=None if config.trust_proxy else config.max_http_connections_per_address,
        refused_hook=functools.partial(broker.metrics.throttle, ThrottleLimit.HTTP_PER_ADDRESS),
    )
    site = GuardedSite(runner, config.host, config.port, guard, ssl_context=ssl_context)
    await site.start()
    port = site.port
    url = config.base_url if config.port else f"http://{config.host}:{port}"
    admin_runner = web.AppRunner(
        admin_app(broker.hub, broker.keys, url, relay_available=bool(config.turn_urls)), access_log=None
    )
    await admin_runner.setup()
    await start_admin_site(admin_runner.app, admin_runner, config)
    metrics_runner = await start_metrics_site(broker.metrics, config.metrics_address)
    store_kind = "Redis" if config.redis_url else "embedded (sessions kept in the data dir)"
    print(
        f"Broker listening on {config.host}:{port} — open {url}\n"
        f"Store: {store_kind}. Data dir: {config.data_dir}\n"
        f"Create a first session (in another terminal):\n"
        f"  broker session create --data-dir {config.data_dir}\n"
        f"It prints the client's link and the therapist's link.",
        file=out,
        flush=True,
    )
    log.info("event=serving port=%d store=%s", port, "redis" if config.redis_url else "memory")
    heap = LongLivedHeap(guard)  # what start-up made, out of the collector's full passes from now on
    heap.start()

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    await stop.wait()
    log.info("event=stopping")
    await broker.hub.shutdown()
    await admin_runner.cleanup()
    if metrics_runner is not None:
        await metrics_runner.cleanup()
    config.admin_socket.unlink(missing_ok=True)
    await asyncio.wait_for(runner.cleanup(), SHUTDOWN_GRACE_S + 2)
    await broker.close()
    heap.stop()
    log.info("event=stopped")
