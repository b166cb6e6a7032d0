"""The pages a browser gets when a link or an address cannot be used.

Every one has the client pages' layout (a header, one heading, one sentence), a title and a
language, and goes through the same security headers as every other response. The sentence is
fixed per code, never the text of the error behind it: a revoked, forged or unknown link gets
byte-identical pages (docs/protocol.md section 4).
"""

from __future__ import annotations

import html
import logging
import string
from pathlib import Path
from typing import NamedTuple

from aiohttp import web
from aiohttp.typedefs import Handler

from broker.http.client_pages import DEFAULT_PAGE_TITLE, client_pages
from broker.http.pages import NOTICE_TEMPLATE, WEB_ROOT
from broker.signaling.protocol import ErrorCode

log = logging.getLogger("broker.server")

#: The code of the page for an address that names nothing (not a wire error code).
NOT_FOUND = "not_found"


class Notice(NamedTuple):
    status: int
    title: str
    sentence: str


NOTICES: dict[str, Notice] = {
    ErrorCode.INVALID_TOKEN.value: Notice(404, "This link does not work", "Please ask your therapist for a new link."),
    ErrorCode.TOKEN_EXPIRED.value: Notice(
        410, "This link has expired", "The time for this session has passed, so please contact your therapist."
    ),
    ErrorCode.TOKEN_NOT_YET_VALID.value: Notice(
        425, "It is a little early", "This link opens shortly before your appointment: please come back then."
    ),
    ErrorCode.SESSION_ENDED.value: Notice(
        410, "This session has ended", "Nothing was recorded, and you can close this page."
    ),
    ErrorCode.SESSION_NOT_FOUND.value: Notice(
        404,
        "This session could not be found",
        "The service lost its record of this session, so please contact your therapist for a new link.",
    ),
    ErrorCode.SESSION_CANCELLED.value: Notice(
        410, "This session was cancelled", "Your therapist cancelled it, so please contact them about another time."
    ),
    ErrorCode.UNAVAILABLE.value: Notice(
        503, "Please try again in a moment", "The service cannot reach its records just now, and nothing was changed."
    ),
    NOT_FOUND: Notice(404, "Page not found", "There is no page at this address: please check the link you were given."),
}


def render_notice(root: Path, code: str, page_title: str = DEFAULT_PAGE_TITLE) -> tuple[int, str]:
    """The status and page for ``code`` from the template in ``root`` (an unknown code gets the
    invalid-link page, under its own code). Fixed per code and title: the web manifest lists each
    one with the built-in title.

    Its ``<title>`` is the client's pages' neutral one (or the practice's), never the notice's
    heading: it is what the browser's tab and history show to whoever uses the device next."""
    notice = NOTICES.get(code, NOTICES[ErrorCode.INVALID_TOKEN.value])
    template = string.Template((root / NOTICE_TEMPLATE).read_text(encoding="utf-8"))
    body = template.substitute(
        page_title=html.escape(page_title),
        title=html.escape(notice.title),
        sentence=html.escape(notice.sentence),
        code=html.escape(code),
    )
    return notice.status, body


def notice_response(request: web.Request, code: str) -> web.Response:
    """The page for ``code``, from the web root of the application serving ``request``."""
    status, body = render_notice(request.app[WEB_ROOT], code, client_pages(request).title)
    return web.Response(text=body, status=status, content_type="text/html", charset="utf-8")


@web.middleware
async def not_found_pages(request: web.Request, handler: Handler) -> web.StreamResponse:
    """An address outside the JSON API that names nothing (a bare ``/j/``, a typo) gets the notice
    page with 404, never aiohttp's bare "404: Not Found". The API keeps its plain answer."""
    if request.path.startswith("/api/"):
        return await handler(request)
    try:
        return await handler(request)
    except web.HTTPNotFound:
        log.info("event=page_not_found")
        return notice_response(request, NOT_FOUND)
