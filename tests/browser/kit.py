"""Helpers for the browser tests: the page watch (requests off 127.0.0.1, the link key
leaving the page, CSP violations, uncaught errors), axe-core from the npm registry,
screenshots at desktop and phone size, and waiting for screens."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from playwright.async_api import Page, expect

REPO = Path(__file__).resolve().parents[2]
OUTPUT = REPO / "test-output"
SCREENSHOTS = OUTPUT / "screenshots"
AXE_VERSION = "4.14.1"
AXE_CACHE = OUTPUT / "cache" / f"axe-core-{AXE_VERSION}" / "axe.min.js"

CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
]  # fmt: skip
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
#: Generous: two or three Chromium peers with fake video share two cores.
WAIT_MS = 30_000

#: Records every RTCPeerConnection a page makes, so the test can ask each for getStats().
#: It changes nothing else: the page's own code still builds and drives each connection.
RECORD_PEER_CONNECTIONS = """
(() => {
  const Native = window.RTCPeerConnection;
  const made = [];
  Object.defineProperty(window, '__peerConnections', { value: made });
  window.RTCPeerConnection = class extends Native {
    constructor(...args) { super(...args); made.push(this); }
  };
})();
"""

# Collects CSP violations inside the page (runs before any page script, survives reloads).
CSP_WATCH = """
window.__cspViolations = [];
document.addEventListener('securitypolicyviolation', (e) => {
  window.__cspViolations.push(e.violatedDirective + ' ' + (e.blockedURI || 'inline'));
});
"""

expect.set_options(timeout=WAIT_MS)


def fetch_axe() -> str:
    """axe-core from the npm registry (npm pack), cached under test-output/ (gitignored)."""
    if not AXE_CACHE.exists():
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError("npm is needed to fetch axe-core for the accessibility checks")
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(
                [npm, "pack", f"axe-core@{AXE_VERSION}", "--pack-destination", tmp, "--silent"],
                check=True, cwd=tmp, stdout=subprocess.DEVNULL, timeout=300,
            )  # fmt: skip
            tarball = next(Path(tmp).glob("axe-core-*.tgz"))
            with tarfile.open(tarball) as archive:
                member = archive.extractfile("package/axe.min.js")
                assert member is not None
                data = member.read()
        AXE_CACHE.parent.mkdir(parents=True, exist_ok=True)
        AXE_CACHE.write_bytes(data)
    return AXE_CACHE.read_text(encoding="utf-8")


@dataclass
class Watch:
    """Everything a page sent or complained about, checked at the end of a test."""

    secrets: list[str] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    pages: list[Page] = field(default_factory=list)

    def _check_text(self, where: str, text: str | None) -> None:
        for secret in self.secrets:
            if text and secret in text:
                self.leaks.append(where)

    def on_request(self, request: Any) -> None:
        self.urls.append(request.url)
        self._check_text(f"url {request.url[:60]}", request.url)
        for name, value in request.headers.items():
            self._check_text(f"header {name}", value)
        self._check_text("body", request.post_data)

    def attach(self, page: Page) -> None:
        self.pages.append(page)
        journal(page)
        page.on("request", self.on_request)
        page.on("console", self._on_console)
        page.on("pageerror", lambda err: self.page_errors.append(str(err)[:300]))
        page.on("websocket", self._on_websocket)

    def _on_console(self, message: Any) -> None:
        text = message.text
        if message.type == "error" or "Content Security Policy" in text:
            self.console_errors.append(text[:300])

    def _on_websocket(self, ws: Any) -> None:
        self.urls.append(ws.url)
        ws.on("framesent", lambda payload: self._check_text("websocket frame", _text(payload)))

    async def assert_clean(self) -> None:
        hosts = {urlsplit(u).hostname for u in self.urls if not u.startswith(("data:", "blob:"))}
        assert hosts <= {"127.0.0.1"}, f"requests left 127.0.0.1: {hosts}"
        assert not self.leaks, f"the link key appeared in: {self.leaks}"
        csp = [e for e in self.console_errors if "Content Security Policy" in e]
        assert not csp, f"CSP violations: {csp}"
        for page in self.pages:
            if not page.is_closed():
                violations = await page.evaluate("window.__cspViolations || []")
                assert not violations, f"CSP violations: {violations}"
        assert not self.page_errors, f"uncaught errors: {self.page_errors}"


def _text(payload: Any) -> str:
    return payload if isinstance(payload, str) else bytes(payload).decode("utf-8", "replace")


async def screen_of(page: Page) -> str:
    return await page.evaluate("document.body.dataset.screen")


async def wait_screen(page: Page, name: str, timeout: int = WAIT_MS) -> None:
    try:
        await expect(page.locator("body")).to_have_attribute("data-screen", name, timeout=timeout)
    except AssertionError as failure:
        raise AssertionError(f"{failure}\n{JOURNALS[page].report()}" if page in JOURNALS else failure) from None


@dataclass
class Journal:
    """What one page said and fetched, printed when it does not reach a screen (why it stalled)."""

    lines: deque[str] = field(default_factory=lambda: deque(maxlen=40))
    pending: dict[str, int] = field(default_factory=dict)

    def report(self) -> str:
        waiting = [f"{url} x{n}" for url, n in self.pending.items() if n > 0]
        return "page journal:\n  " + "\n  ".join([*self.lines, f"requests unanswered: {waiting}"])


JOURNALS: weakref.WeakKeyDictionary[Page, Journal] = weakref.WeakKeyDictionary()


def journal(page: Page) -> Journal:
    """Keep the page's console, failed requests and unanswered requests for wait_screen's report."""
    if page in JOURNALS:
        return JOURNALS[page]
    kept = JOURNALS[page] = Journal()

    def started(request: Any) -> None:
        path = urlsplit(request.url).path
        kept.pending[path] = kept.pending.get(path, 0) + 1

    def ended(request: Any, how: str) -> None:
        path = urlsplit(request.url).path
        kept.pending[path] = kept.pending.get(path, 0) - 1
        if how != "finished":
            kept.lines.append(f"request {how}: {path} {request.failure}")

    page.on("console", lambda m: kept.lines.append(f"console {m.type}: {m.text[:200]}"))
    page.on("pageerror", lambda e: kept.lines.append(f"page error: {str(e)[:200]}"))
    page.on("request", started)
    page.on("requestfinished", lambda r: ended(r, "finished"))
    page.on("requestfailed", lambda r: ended(r, "failed"))
    page.on("websocket", lambda ws: kept.lines.append(f"websocket opened: {urlsplit(ws.url).path}"))
    page.on(
        "framenavigated",
        lambda f: kept.lines.append(f"navigated: {urlsplit(f.url).path}") if f == page.main_frame else None,
    )
    return kept


async def shoot(page: Page, name: str) -> None:
    """Screenshots at desktop and phone size under test-output/screenshots/."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    size = page.viewport_size or DESKTOP
    await page.screenshot(path=str(SCREENSHOTS / f"{name}-desktop.png"))
    await page.set_viewport_size(PHONE)
    await page.screenshot(path=str(SCREENSHOTS / f"{name}-phone.png"), full_page=True)
    await page.set_viewport_size(size)


async def check_axe(page: Page, axe: str, name: str) -> None:
    """axe-core: no serious or critical violation on the screen as it is now.

    The script is evaluated (DevTools evaluation), not added as a <script> tag:
    the pages' CSP forbids inline scripts, which is exactly what the tests check.
    """
    if not await page.evaluate("typeof window.axe === 'object'"):
        await page.evaluate(axe + "\n;undefined")
    result = await page.evaluate(
        """async () => {
          const r = await axe.run(document, {resultTypes: ['violations']});
          return r.violations
            .filter((v) => v.impact === 'serious' || v.impact === 'critical')
            .map((v) => `${v.id} (${v.impact}): ${v.nodes.slice(0, 3).map((n) => n.target.join(' ')).join(', ')}`);
        }"""
    )
    assert result == [], f"axe on {name}: {result}"


async def look(page: Page, axe: str, name: str) -> None:
    """Every screen gets both: an accessibility check and screenshots."""
    await check_axe(page, axe, name)
    await shoot(page, name)


# ---------------------------------------------------------------- the client's way in


async def start_checklist(page: Page) -> None:
    await wait_screen(page, "welcome")
    await page.click("#welcome-start")
    await wait_screen(page, "checklist")


async def wait_device_checks(page: Page) -> None:
    """Every automatic check on the device step has finished and the required ones passed."""
    for item in ("secure_context", "webrtc", "webcrypto", "camera", "microphone", "preflight"):
        await expect(page.get_by_test_id(f"item-{item}")).to_have_attribute("data-status", "ok")
    await expect(page.get_by_test_id("item-headset")).to_have_attribute("data-status", re.compile("ok|warn"))


async def tick_all(page: Page, step: str) -> None:
    for box in await page.locator(f"#step-{step} input[type=checkbox]").all():
        await box.check()


async def fill_details(page: Page, location: str, contact: str) -> None:
    await page.fill("#details-location", location)
    await page.fill("#details-contact", contact)


async def pass_checklist(
    page: Page,
    *,
    location: str = "Home, 4 Elm Road",
    contact: str = "Sam, 0123 456",
    axe: str | None = None,
    name: str = "",
) -> None:
    """Go through the default policy's checklist the way a person would, into the waiting room."""
    await start_checklist(page)
    await wait_device_checks(page)
    if axe:
        await look(page, axe, f"{name}checklist-device")
    await page.click("#step-next")
    await tick_all(page, "space")
    if axe:
        await look(page, axe, f"{name}checklist-space")
    await page.click("#step-next")
    # The last step: the consent text, its acceptance and the emergency details together.
    await tick_all(page, "consent")
    await fill_details(page, location, contact)
    if axe:
        await look(page, axe, f"{name}checklist-consent")
    await page.click("#checklist-submit")
    await wait_screen(page, "waiting")


async def frames_decoded(page: Page, count: int) -> None:
    """Every remote tile decodes video (getStats inbound-rtp framesDecoded > 0), and there are `count` tiles."""
    tiles = page.get_by_test_id("tile")
    await expect(tiles).to_have_count(count)
    for i in range(count):
        await expect(tiles.nth(i)).to_have_attribute("data-state", "connected")
        await expect(tiles.nth(i)).not_to_have_attribute("data-frames-decoded", "0")


async def code_with(page: Page, peer: str) -> str:
    tile = page.locator(f'[data-testid=tile][data-peer="{peer}"]')
    await expect(tile).to_have_attribute("data-code", re.compile(r"^\d{3} \d{3} \d{3}$"))
    return str(await tile.get_attribute("data-code"))


#: The tab's flag between the boot guard's two tries (web/js/boot_guard.js): none left once a page settles.
BOOT_RETRIED = "sessionStorage.getItem('tt-boot-retried')"


async def refuse_module(page: Page, name: str, times: int | None = None) -> list[str]:
    """Fail the page's requests for web/js/`name` as a network change fails requests in flight
    (Chromium's net::ERR_NETWORK_CHANGED): the first `times` of them, or every one. Returns the
    URLs refused so far."""
    refused: list[str] = []

    async def refuse(route: Any) -> None:
        if times is None or len(refused) < times:
            refused.append(route.request.url)
            await route.abort()
        else:
            await route.continue_()

    await page.route(f"**/static/js/{name}", refuse)
    return refused


async def until(read: Callable[[], Awaitable[Any]], ok: Callable[[Any], bool], what: str, timeout: float = 45.0) -> Any:
    """Poll `read` until `ok` holds; its last value (a functional deadline, generous for a loaded machine)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await read()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: last {value!r}")
        await asyncio.sleep(0.2)


#: Records every WebSocket a page opens (window.__sockets), so a test can send what the page's
#: own code would (``send_from_page``). It changes nothing else.
RECORD_SOCKETS = """
(() => {
  const Native = window.WebSocket;
  const made = [];
  Object.defineProperty(window, '__sockets', { value: made });
  window.WebSocket = class extends Native {
    constructor(...args) { super(...args); made.push(this); }
  };
})();
"""


async def send_from_page(page: Page, message: dict[str, Any]) -> None:
    """Send ``message`` on the page's open signaling socket (recorded by RECORD_SOCKETS)."""
    await page.evaluate(
        """(message) => {
          const socket = window.__sockets.filter((s) => s.readyState === WebSocket.OPEN).pop();
          socket.send(JSON.stringify(message));
        }""",
        message,
    )


async def _blank_page(_request: web.Request) -> web.Response:
    return web.Response(text="<!doctype html><meta charset=utf-8><title>test</title>", content_type="text/html")


@asynccontextmanager
async def web_dir_site(*pages: str) -> AsyncIterator[str]:
    """The repo's web/ at /static/ and a blank page at / (and at each of ``pages``), on a free
    loopback port (a secure context), for testing a browser module on its own; yields the base URL."""
    app = web.Application()
    app.router.add_static("/static/", REPO / "web")
    for path in ("/", *pages):
        app.router.add_get(path, _blank_page)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()
