"""The client's pages as someone else at the client's device finds them (docs/security.md, "The
client's device and the person in the room"): a neutral title and icon that say nothing about
therapy or sessions (or the practice's title), the join page at the neutral address ``/j`` too,
the quick exit's neutral page (or a 303 to the practice's), and ``Cache-Control: no-store`` on
every file any of these pages loads, scripts and images included."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit

import aiohttp
import pytest
import pytest_asyncio

from broker.http.client_pages import ClientPages
from tests.conftest import RunningBroker, schedule
from tests.http.test_security_headers import check_caching, check_headers
from tests.notice_page import NEUTRAL_TITLE, check_notice, read_notice

pytestmark = pytest.mark.asyncio(loop_scope="session")

#: Words a neutral title or page must not contain.
TELLING = re.compile(r"therap|session|counsel|clinic|psych|mental|health|appointment", re.IGNORECASE)
#: Static imports, and dynamic ones with a literal (the call's modules load when the checklist starts).
_IMPORT = re.compile(
    r"""^\s*(?:import|export)\s[^;]*?from\s+["'](\./[\w.-]+\.js)["']|\bimport\(\s*["'](\./[\w.-]+\.js)["']\s*\)""",
    re.MULTILINE,
)


@pytest_asyncio.fixture(loop_scope="session")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


class _Loads(HTMLParser):
    """What a page loads: scripts, stylesheets, icons, images; and its <title> and first focusable link."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.title = ""
        self.first_link: dict[str, str | None] | None = None
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "script" and values.get("src"):
            self.urls.append(str(values["src"]))
        elif tag == "link" and values.get("href"):
            self.urls.append(str(values["href"]))
        elif tag == "img" and values.get("src"):
            self.urls.append(str(values["src"]))
        elif tag == "a" and self.first_link is None:
            self.first_link = values
        self._in_title = tag == "title"

    def handle_endtag(self, tag: str) -> None:
        self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, str, str]:
    async with http.get(url, allow_redirects=False) as response:
        check_headers(response.headers, f"GET {url}")
        check_caching(response.status, response.headers, f"GET {url}")
        return response.status, response.content_type, await response.text()


async def everything_loaded(http: aiohttp.ClientSession, page_url: str) -> tuple[_Loads, set[str]]:
    """Fetch a page and every file it loads (following the ES module imports); each answer is
    checked for the headers and ``no-store`` on the way. Returns the page's parse and the paths."""
    status, kind, body = await get(http, page_url)
    assert kind == "text/html", page_url
    page = _Loads()
    page.feed(body)
    seen: set[str] = set()
    queue = [urljoin(page_url, u) for u in page.urls]
    while queue:
        url = queue.pop()
        path = urlsplit(url).path
        if path in seen:
            continue
        seen.add(path)
        status, _, text = await get(http, url)
        assert status == 200, url
        if path.endswith(".js"):
            queue += [urljoin(url, static or dynamic) for static, dynamic in _IMPORT.findall(text)]
    return page, seen


async def test_the_join_page_and_everything_it_loads_are_no_store_and_neutral(
    broker: RunningBroker, http: aiohttp.ClientSession
) -> None:
    links = await schedule(broker)
    page, loaded = await everything_loaded(http, links.client.partition("#")[0])
    assert {"/static/js/join.js", "/static/js/quick_exit.js", "/static/js/no_trace.js", "/static/js/call.js"} <= loaded
    assert {"/static/js/call_tools.js", "/static/js/whiteboard.js"} <= loaded  # imported when the checklist starts
    assert "/static/img/neutral.svg" in loaded and "/static/css/app.css" in loaded
    assert page.title == NEUTRAL_TITLE and not TELLING.search(page.title)
    # "Leave now" is the first link of the page (before the skip link): first in the tab order.
    assert page.first_link is not None and page.first_link.get("href") == "/today"
    assert "data-quick-exit" in page.first_link

    # The neutral address the page moves to serves the same page: a reload there works.
    status, kind, body = await get(http, broker.url + "/j")
    assert (status, kind) == (200, "text/html")
    # The neutral title, with its catalogue key: the client's language shows it in their words.
    assert '<body data-screen="loading"' in body and f'<title data-i18n="page.title">{NEUTRAL_TITLE}</title>' in body


async def test_the_exit_page_is_neutral_and_loads_nothing_from_elsewhere(
    broker: RunningBroker, http: aiohttp.ClientSession
) -> None:
    page, loaded = await everything_loaded(http, broker.url + "/today")
    assert page.title == "Today"
    assert loaded == {"/static/css/today.css", "/static/js/today.js", "/static/img/neutral.svg"}
    _, _, html_text = await get(http, broker.url + "/today")
    _, _, script = await get(http, broker.url + "/static/js/today.js")
    visible = re.sub(r"^\s*//.*$", "", script, flags=re.MULTILINE)  # comments are not shown
    assert not TELLING.search(html_text) and not TELLING.search(visible)
    assert "localStorage" not in script and "sessionStorage" not in script and "fetch(" not in script


async def test_notice_pages_carry_the_neutral_title_icon_and_quick_exit(
    broker: RunningBroker, http: aiohttp.ClientSession
) -> None:
    for path, code in ((f"/j/{'A' * 68}", "invalid_token"), ("/no/such/page", "not_found")):
        page, loaded = await everything_loaded(http, broker.url + path)
        assert "/static/js/notice.js" in loaded and "/static/js/quick_exit.js" in loaded
        async with http.get(broker.url + path) as response:
            shape = check_notice(await response.text(), code)
        assert not TELLING.search(shape.title)


async def test_the_practice_chooses_the_title_and_the_exit_page(
    broker: RunningBroker, http: aiohttp.ClientSession
) -> None:
    """``[practice] page_title`` and ``exit_url`` of the policy file (tests/checklist cover the parsing)."""
    links = await schedule(broker)
    pages: ClientPages = broker.broker.client_pages
    pages.page_title, pages.exit_url = "Notes & <b>", "https://www.example.org/weather"
    try:
        async with http.get(broker.url + "/today", allow_redirects=False) as response:
            assert response.status == 303
            assert response.headers["Location"] == "https://www.example.org/weather"
            check_caching(response.status, response.headers, "GET /today -> 303")
        for url in (links.client.partition("#")[0], broker.url + "/j"):
            _, _, body = await get(http, url)
            assert "<title>Notes &amp; &lt;b&gt;</title>" in body
        _, _, body = await get(http, f"{broker.url}/j/{'A' * 68}")
        check_notice(body, "invalid_token", title="Notes & <b>")
        assert read_notice(body).heading == "This link does not work"
    finally:
        pages.page_title, pages.exit_url = None, None
    async with http.get(broker.url + "/today", allow_redirects=False) as response:
        assert response.status == 200
