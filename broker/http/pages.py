"""The static pages of the browser client, found in the wheel, in a checkout, or where configured."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from aiohttp import web

#: Where every file of the web root is served (``add_static``).
STATIC_PREFIX = "/static/"
#: Pages served at a fixed address, and the file of the web root each one is.
PAGES = {"/": "index.html", "/login": "login.html", "/dashboard": "dashboard.html"}
#: Pages served under a prefix, for an invite link (a link that does not work gets a notice instead).
LINK_PAGES = {"/j/": "join.html", "/t/": "therapist.html"}
#: The template of every notice page (broker/http/notice_pages.py).
NOTICE_TEMPLATE = "notice.html"
#: Every file of the web root a broker answers a page with.
PAGE_FILES = (*PAGES.values(), *LINK_PAGES.values(), NOTICE_TEMPLATE)

#: The web root of one application (``build_app``): each broker may have its own.
WEB_ROOT = web.AppKey("web_root", Path)


def web_root(configured: str = "") -> Path:
    """The browser client: the configured directory, else the copy shipped inside the wheel as
    broker/web, else web/ in a checkout."""
    if configured:
        return Path(configured)
    packaged = Path(str(resources.files("broker"))) / "web"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "web"


def html_page(request: web.Request, name: str) -> web.FileResponse:
    """A page of this application's web root."""
    return web.FileResponse(request.app[WEB_ROOT] / name, headers={"Content-Type": "text/html; charset=utf-8"})
