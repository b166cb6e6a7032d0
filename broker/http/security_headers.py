"""HTTP hardening applied to every response, and an access log that keeps nothing personal."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.typedefs import Middleware

#: Scripts connect to our origin only (the WebSocket, the JSON API), and to Janus's when it has another one.
CONNECT_SRC = "connect-src 'self'"
#: Every directive but script-src, whose sources depend on the pages' import map (``content_security_policy``).
#: Trusted Types: no string becomes HTML or script in the DOM; the one policy allowed turns only the
#: frame encryption worker's own blob: URLs into a script URL (web/js/frame_crypto.js).
CSP_DIRECTIVES = (
    "default-src 'none'",
    "style-src 'self'",
    "img-src 'self' data: blob:",
    "media-src 'self' blob: mediastream:",
    CONNECT_SRC,
    "font-src 'self'",
    "manifest-src 'self'",
    # One worker only: the frame encryption's, started from blob: URLs of its pinned bytes
    # (web/js/frame_crypto.js). A service worker cannot come from a blob: URL, so no page may
    # register one that would outlive it.
    "worker-src blob:",
    "form-action 'self'",
    "base-uri 'none'",
    "frame-ancestors 'none'",
    "object-src 'none'",
    "require-trusted-types-for 'script'",
    "trusted-types frame-crypto",
)

#: No script is fetched without integrity metadata (SRI); an altered one does not run.
INTEGRITY_POLICY = "blocked-destinations=(script)"


def content_security_policy(script_hashes: Sequence[str] = (), connect_sources: Sequence[str] = ()) -> str:
    """The CSP: scripts from our origin only, plus the inline import maps whose hashes are given
    (``sha384-...``: the one the pages carry, broker/webmanifest/pins.py); never inline script else.
    ``connect_sources``: origins beyond our own that scripts may connect to (Janus's, when the
    practice serves it on another origin: broker/janus/scheduling.py ``janus_connect_source``)."""
    script_src = " ".join(["script-src 'self'", *(f"'{h}'" for h in script_hashes)])
    directives = [d if d != CONNECT_SRC else " ".join([d, *connect_sources]) for d in CSP_DIRECTIVES[1:]]
    return "; ".join([CSP_DIRECTIVES[0], script_src, *directives])


def security_headers(script_hashes: Sequence[str] = (), connect_sources: Sequence[str] = ()) -> dict[str, str]:
    """The headers every response carries (HSTS apart: only behind TLS), in the order they are set."""
    return {
        "Content-Security-Policy": content_security_policy(script_hashes, connect_sources),
        "Integrity-Policy": INTEGRITY_POLICY,
        "Referrer-Policy": "no-referrer",
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        "Permissions-Policy": "camera=(self), microphone=(self), geolocation=(), display-capture=(self), payment=(), usb=()",
        "Cross-Origin-Opener-Policy": "same-origin",
        "Cross-Origin-Resource-Policy": "same-origin",
    }


#: The headers of an application whose pages carry no import map (tests of the JSON API alone).
BASE_HEADERS = security_headers()

HSTS = "max-age=63072000; includeSubDomains"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def is_tls(request: web.Request, trust_proxy: bool) -> bool:
    if request.secure:
        return True
    return trust_proxy and request.headers.get("X-Forwarded-Proto", "") == "https"


def security_middleware(trust_proxy: bool, headers: Mapping[str, str] = BASE_HEADERS) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            response = exc
        apply_headers(response, headers, tls=is_tls(request, trust_proxy))
        if isinstance(response, web.HTTPException) and not response.prepared:
            raise response
        return response

    return middleware


def security_signal(
    trust_proxy: bool, headers: Mapping[str, str] = BASE_HEADERS
) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """Also covers responses decided only as they are sent (a missing static file, aiohttp's own 500)."""

    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        set_headers(response, headers, tls=is_tls(request, trust_proxy))

    return on_prepare


def apply_headers(response: web.StreamResponse, headers: Mapping[str, str], *, tls: bool) -> None:
    if not response.prepared:
        set_headers(response, headers, tls=tls)


def set_headers(response: web.StreamResponse, headers: Mapping[str, str], *, tls: bool) -> None:
    if response.status == 101:
        return  # a WebSocket upgrade: no page, nothing to protect, and kept small per connection
    for name, value in headers.items():
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
