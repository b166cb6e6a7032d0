"""HTTP hardening applied to every response, and an access log that keeps nothing personal."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.typedefs import Middleware

CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "media-src 'self' blob: mediastream:",
        "connect-src 'self'",
        "font-src 'self'",
        "manifest-src 'self'",
        # No page of ours runs a worker; none may register a service worker that would outlive it.
        "worker-src 'none'",
        "form-action 'self'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
        "object-src 'none'",
    ]
)

BASE_HEADERS = {
    "Content-Security-Policy": CSP,
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Permissions-Policy": "camera=(self), microphone=(self), geolocation=(), display-capture=(), payment=(), usb=()",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}

HSTS = "max-age=63072000; includeSubDomains"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def is_tls(request: web.Request, trust_proxy: bool) -> bool:
    if request.secure:
        return True
    return trust_proxy and request.headers.get("X-Forwarded-Proto", "") == "https"


def security_middleware(trust_proxy: bool) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            response = exc
        apply_headers(response, tls=is_tls(request, trust_proxy))
        if isinstance(response, web.HTTPException) and not response.prepared:
            raise response
        return response

    return middleware


def security_signal(trust_proxy: bool) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """Also covers responses decided only as they are sent (a missing static file, aiohttp's own 500)."""

    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        set_headers(response, tls=is_tls(request, trust_proxy))

    return on_prepare


def apply_headers(response: web.StreamResponse, *, tls: bool) -> None:
    if not response.prepared:
        set_headers(response, tls=tls)


def set_headers(response: web.StreamResponse, *, tls: bool) -> None:
    if response.status == 101:
        return  # a WebSocket upgrade: no page, nothing to protect, and kept small per connection
    for name, value in BASE_HEADERS.items():
        response.headers.setdefault(name, value)
    if tls:
        response.headers["Strict-Transport-Security"] = HSTS
    # Everything, the client's scripts, styles and images included: a browser keeps no copy of any
    # page or file of ours on the device (docs/security.md, "The client's device and the person in
    # the room"). Set, not defaulted: it replaces a handler's own choice (the event stream's is the same).
    response.headers["Cache-Control"] = "no-store"


class PrivateAccessLogger(AbstractAccessLogger):
    """Logs method, matched route, status and time: no address, path, query or Referer.

    Paths are left out because invite tokens travel in them.
    """

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        route = "-"
        match_info = getattr(request, "match_info", None)
        if match_info is not None and match_info.route.resource is not None:
            route = match_info.route.resource.canonical
        self.logger.info(
            "event=http method=%s route=%s status=%d ms=%.1f", request.method, route, response.status, time * 1000
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)
