"""The client's pages as someone else at the client's device finds them: a neutral title, a
neutral address once the join page has read its link, and the neutral page the quick exit lands
on (docs/security.md, "The client's device and the person in the room").

The join page moves its address from ``/j/<token>`` to ``JOIN_PATH`` as soon as it has read the
token (history.replaceState), so neither the address bar nor the tab's history shows the token.
A reload there gets the join page again, which carries on only if the tab kept the link for a
reload (web/js/no_trace.js). The quick exit replaces the page (location.replace) with
``EXIT_PATH``: the practice's ``exit_url`` (303), else a built-in page that says nothing about
therapy (the date and a calendar), on this origin, loading nothing from elsewhere.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass

from aiohttp import web

from broker.checklist.policy import Policy
from broker.http.pages import WEB_ROOT, html_page

#: The title of the client's pages unless the practice sets one: nothing about therapy or sessions.
DEFAULT_PAGE_TITLE = "Video call"
#: The join page's address once it has read its link.
JOIN_PATH = "/j"
#: Where the quick exit goes.
EXIT_PATH = "/today"

#: The page's title element (join.html's carries a catalogue key, so that the neutral default is
#: shown in the client's language; the practice's own title replaces it whole, key and all).
_TITLE = re.compile(r"<title\b[^>]*>[^<]*</title>")


@dataclass
class ClientPages:
    """The practice's choices for the client's pages (None: the built-in neutral ones)."""

    page_title: str | None = None
    exit_url: str | None = None

    @classmethod
    def from_policy(cls, policy: Policy) -> ClientPages:
        return cls(page_title=policy.page_title, exit_url=policy.exit_url)

    @property
    def title(self) -> str:
        return self.page_title or DEFAULT_PAGE_TITLE


CLIENT_PAGES = web.AppKey("client_pages", ClientPages)


def client_pages(request: web.Request) -> ClientPages:
    """The running practice's choices (built-in ones for an application without them)."""
    return request.app.get(CLIENT_PAGES) or ClientPages()


def join_page_response(request: web.Request) -> web.StreamResponse:
    """The join page, titled as the practice chose (the file carries the neutral default)."""
    pages = client_pages(request)
    if pages.page_title is None:
        return html_page(request, "join.html")
    text = (request.app[WEB_ROOT] / "join.html").read_text(encoding="utf-8")
    text = _TITLE.sub(lambda _: f"<title>{html.escape(pages.page_title or '')}</title>", text, count=1)
    return web.Response(text=text, content_type="text/html", charset="utf-8")


async def join_page_without_link(request: web.Request) -> web.StreamResponse:
    """``GET /j``: where the join page moved its address; a reload lands here."""
    return join_page_response(request)


async def exit_page(request: web.Request) -> web.StreamResponse:
    """``GET /today``: the practice's exit page (303), or the built-in neutral page."""
    exit_url = client_pages(request).exit_url
    if exit_url:
        raise web.HTTPSeeOther(exit_url)
    return html_page(request, "today.html")


def setup_client_pages(app: web.Application, pages: ClientPages) -> None:
    app[CLIENT_PAGES] = pages
    app.router.add_get(JOIN_PATH, join_page_without_link, name="join_without_link")
    app.router.add_get(EXIT_PATH, exit_page, name="exit")
