"""The signed web manifest and its signatures at their well-known addresses, byte for byte as kept
in the web root (docs/protocol.md section 18): what an outside monitor or a browser extension checks
every file the broker serves against."""

from __future__ import annotations

from aiohttp import web

from broker.http.pages import WEB_ROOT
from broker.webmanifest.layout import MANIFEST_FILE, MANIFEST_URL, SIGNATURES_FILE, SIGNATURES_URL


async def _kept(request: web.Request, relative: str) -> web.Response:
    path = request.app[WEB_ROOT] / relative
    if not path.is_file():
        raise web.HTTPNotFound()  # a web root without a built manifest: the notice page says so
    return web.Response(body=path.read_bytes(), content_type="application/json")


async def web_manifest(request: web.Request) -> web.Response:
    return await _kept(request, MANIFEST_FILE)


async def web_manifest_signatures(request: web.Request) -> web.Response:
    return await _kept(request, SIGNATURES_FILE)


def setup_web_manifest(app: web.Application) -> None:
    app.router.add_get(MANIFEST_URL, web_manifest, name="web_manifest")
    app.router.add_get(SIGNATURES_URL, web_manifest_signatures, name="web_manifest_signatures")
