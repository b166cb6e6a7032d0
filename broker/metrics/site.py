"""Serving the metrics: ``GET /metrics`` in Prometheus's text format, on a listen address of its own.

Never on the public port: even counts say when a practice has sessions. ``BROKER_METRICS_ADDRESS``
(``127.0.0.1:9464`` by default, ``off`` for none) is a second aiohttp site of the same process,
answering nothing but ``/metrics``. In compose and Kubernetes it listens on the internal network
for Prometheus (docs/deploy.md, "Metrics"). An address that is taken does not stop the broker:
it logs ``event=metrics_unavailable`` and serves its people without metrics.
"""

from __future__ import annotations

import logging

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from broker.metrics.registry import METRICS, Metrics

log = logging.getLogger("broker.metrics")

DEFAULT_ADDRESS = "127.0.0.1:9464"
#: What turns the metrics off (an empty value in a TOML file does too).
OFF = ("", "off", "none", "false", "0")


def parse_address(text: str) -> tuple[str, int] | None:
    """``host:port`` (an IPv6 host in brackets) as (host, port); None when the metrics are off.
    ValueError, in plain words, for anything else."""
    text = text.strip()
    if text.lower() in OFF:
        return None
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535 or "[" in host or "]" in host:
        raise ValueError(f"metrics_address {text!r} must be host:port (e.g. {DEFAULT_ADDRESS}), or off.")
    return host, int(port)


async def metrics_page(request: web.Request) -> web.Response:
    body = await request.app[METRICS].scrape()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def metrics_app(metrics: Metrics) -> web.Application:
    app = web.Application()
    app[METRICS] = metrics
    app.router.add_get("/metrics", metrics_page, name="metrics")
    return app


async def start_metrics_site(metrics: Metrics, address: str) -> web.AppRunner | None:
    """Serve ``metrics`` at ``address``; None when it is off or cannot be listened on."""
    where = parse_address(address)
    if where is None:
        return None
    runner = web.AppRunner(metrics_app(metrics), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, where[0], where[1]).start()
    except OSError as exc:
        log.warning("event=metrics_unavailable port=%d error=%s", where[1], type(exc).__name__)
        await runner.cleanup()
        return None
    log.info("event=metrics_serving port=%d", where[1])
    return runner
