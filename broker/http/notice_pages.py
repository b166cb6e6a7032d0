"""The pages a browser gets when a link or an address cannot be used.

Every one has the client pages' layout (a header, one heading, one sentence), a title and a
language, and goes through the same security headers as every other response. The sentence is
fixed per code, never the text of the error behind it: a revoked, forged or unknown link gets
byte-identical pages (docs/protocol.md section 4).
"""

from __future__ import annotations

import html
import json
import logging
import string
from pathlib import Path
from typing import NamedTuple

from aiohttp import web
from aiohttp.typedefs import Handler

from broker.http.client_pages import DEFAULT_PAGE_TITLE, client_pages
from broker.http.pages import NOTICE_TEMPLATE, WEB_ROOT
from broker.i18n.catalogue import CATALOGUE_DIR, DEFAULT_LANGUAGE
from broker.signaling.protocol import ErrorCode

log = logging.getLogger("broker.server")

#: The code of the page for an address that names nothing (not a wire error code).
NOT_FOUND = "not_found"


class Notice(NamedTuple):
    status: int


#: Each notice's status; its heading and sentence are the catalogue's ``notice.<code>.title`` and
#: ``notice.<code>.message`` (web/i18n/en.json in the page; the page shows them in the client's language).
NOTICES: dict[str, Notice] = {
    ErrorCode.INVALID_TOKEN.value: Notice(404),
    ErrorCode.TOKEN_EXPIRED.value: Notice(410),
    ErrorCode.TOKEN_NOT_YET_VALID.value: Notice(425),
    ErrorCode.SESSION_ENDED.value: Notice(410),
    ErrorCode.SESSION_NOT_FOUND.value: Notice(404),
    ErrorCode.SESSION_CANCELLED.value: Notice(410),
    ErrorCode.UNAVAILABLE.value: Notice(503),
    NOT_FOUND: Notice(404),
}


def notice_texts(root: Path, code: str) -> tuple[str, str]:
    """The heading and the sentence of the notice for ``code`` in the default language, from the
    catalogue of the web root ``root``."""
    messages = json.loads((root / CATALOGUE_DIR / f"{DEFAULT_LANGUAGE}.json").read_text(encoding="utf-8"))
    return messages[f"notice.{code}.title"], messages[f"notice.{code}.message"]


def render_notice(root: Path, code: str, page_title: str = DEFAULT_PAGE_TITLE) -> tuple[int, str]:
    """The status and page for ``code`` from the template in ``root`` (an unknown code gets the
    invalid-link page, under its own code). Fixed per code and title: the web manifest lists each
    one with the built-in title.

    Its ``<title>`` is the client's pages' neutral one (or the practice's), never the notice's
    heading: it is what the browser's tab and history show to whoever uses the device next."""
    shown = code if code in NOTICES else ErrorCode.INVALID_TOKEN.value
    title, sentence = notice_texts(root, shown)
    template = string.Template((root / NOTICE_TEMPLATE).read_text(encoding="utf-8"))
    body = template.substitute(
        page_title=html.escape(page_title),
        title=html.escape(title),
        sentence=html.escape(sentence),
        code=html.escape(code),
        notice=html.escape(shown),
    )
    return NOTICES[shown].status, body


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
