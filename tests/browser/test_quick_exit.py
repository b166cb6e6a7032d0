"""The quick exit ("Leave now", Esc pressed twice) and leaving no trace, in Chromium at desktop and
phone size (Firefox: test_quick_exit_firefox.py). From each client screen (the checklist, the
waiting room, the call, the hold screen, a notice) the exit ends every local camera and microphone
track and closes every peer connection before the page goes, lands on the neutral page within
500 ms of the click or key, and leaves the origin with no localStorage, sessionStorage, IndexedDB,
Cache Storage or service worker; Back does not reach a session page; no address the tab showed
after the link was read, and no entry of its history, holds the invite token; the broker sees an
ordinary leave (seat ``left``, audit ``seat_left``) and the client can come back through the link
when the therapist lets them in. docs/security.md, "The client's device and the person in the room".
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from aiohttp import web
from playwright.async_api import BrowserContext, ConsoleMessage, Page, Playwright, expect

from broker.crypto.link_key import b64url_encode, decode_link_key, new_link_key
from broker.crypto.seat_keys import group_key
from tests.browser.conftest import NewContext
from tests.browser.kit import (
    CHROMIUM_ARGS,
    DESKTOP,
    PHONE,
    Watch,
    fill_details,
    frames_decoded,
    pass_checklist,
    start_checklist,
    tick_all,
    wait_device_checks,
    wait_screen,
)
from tests.conftest import RunningBroker, free_port, schedule

# alone: the quick exit's promise is a deadline (on the neutral page within 500 ms), which a page
# on a machine busy with the parallel part can miss (748 ms seen at a load of 20): run apart.
pytestmark = [pytest.mark.browser, pytest.mark.alone, pytest.mark.asyncio(loop_scope="session")]

#: What the issue promises: on the neutral page within half a second of the click or key.
EXIT_DEADLINE_MS = 500

#: Test instrumentation, before any page script (it changes nothing the page does): every camera and
#: microphone track and every peer connection the page makes, and console lines the test reads
#: across the navigation: when the exit was asked for, what the tracks and connections were as the
#: page went (beforeunload: location.replace has been called, the page is going), and when the
#: next page arrived (its document parsed).
INSTRUMENT = """
(() => {
  const tracks = [];
  const connections = [];
  const media = navigator.mediaDevices;
  if (media && media.getUserMedia) {
    const original = media.getUserMedia.bind(media);
    media.getUserMedia = async (...args) => {
      const stream = await original(...args);
      tracks.push(...stream.getTracks());
      return stream;
    };
  }
  const Native = window.RTCPeerConnection;
  if (Native) {
    window.RTCPeerConnection = class extends Native {
      constructor(...args) { super(...args); connections.push(this); }
    };
  }
  Object.defineProperty(window, '__localTracks', { value: tracks });
  const say = (what, detail) => console.log(`__qx ${what} ${Date.now()} ${JSON.stringify(detail ?? null)}`);
  document.addEventListener('click', (e) => {
    if (e.target && e.target.closest && e.target.closest('[data-quick-exit]')) say('asked', 'click');
  }, true);
  document.addEventListener('keydown', (e) => { if (e.key === 'Escape') say('asked', 'escape'); }, true);
  window.addEventListener('beforeunload', () => say('gone', {
    path: location.pathname,
    tracks: tracks.map((t) => t.readyState),
    connections: connections.map((c) => c.connectionState),
  }));
  document.addEventListener('DOMContentLoaded', () => say('arrived', { path: location.pathname }));
})();
"""

#: Everything the origin could keep on the device, read on the neutral page (same origin).
ORIGIN_STORAGE = """async () => ({
  local: localStorage.length,
  session: sessionStorage.length,
  databases: (await indexedDB.databases()).map((d) => d.name),
  caches: await caches.keys(),
  workers: (await navigator.serviceWorker.getRegistrations()).length,
})"""
NOTHING_KEPT = {"local": 0, "session": 0, "databases": [], "caches": [], "workers": 0}

#: The fields the client types into, as the browser sees them.
FIELDS = """() => [...document.querySelectorAll('#screen-checklist textarea, #screen-checklist input[type=text], #chat-input')]
  .map((f) => ({id: f.id, autocomplete: f.getAttribute('autocomplete'), name: f.getAttribute('name'),
               spellcheck: f.getAttribute('spellcheck'), inForm: !!f.closest('form') && f.id !== 'chat-input'}))"""


@dataclass
class Trail:
    """What one tab showed and said: every address after a navigation, and the __qx console lines."""

    token: str
    urls: list[str] = field(default_factory=list)
    lines: list[tuple[str, int, Any]] = field(default_factory=list)

    def on_console(self, message: ConsoleMessage) -> None:
        self.add(message.text)

    def add(self, text: str) -> None:
        if text.startswith("__qx "):
            _, what, at, detail = text.split(" ", 3)
            self.lines.append((what, int(at), json.loads(detail)))

    async def wait_for(self, what: str) -> None:
        """Console lines come in on their own: wait (a little) for one."""
        for _ in range(100):
            if any(w == what for w, _, _ in self.lines):
                return
            await asyncio.sleep(0.05)

    def last(self, what: str) -> tuple[int, Any]:
        found = [(at, detail) for w, at, detail in self.lines if w == what]
        assert found, f"no {what!r} line: {self.lines}"
        return found[-1]

    async def check_exit(self, *, tracks: int, connections: int) -> None:
        """From the last time the exit was asked for: every track ended and every connection closed
        as the page went, and the neutral page parsed within the deadline."""
        await self.wait_for("arrived")
        asked, _ = self.last("asked")
        gone_at, gone = self.last("gone")
        arrived_at, arrived = self.last("arrived")
        assert arrived["path"] == "/today"
        assert arrived_at - asked < EXIT_DEADLINE_MS, f"the neutral page came {arrived_at - asked} ms after the exit"
        assert asked <= gone_at <= arrived_at
        assert len(gone["tracks"]) >= tracks and all(state == "ended" for state in gone["tracks"]), gone
        assert len(gone["connections"]) >= connections and all(c == "closed" for c in gone["connections"]), gone


async def open_tab(context: BrowserContext, broker: RunningBroker, token: str) -> tuple[Page, Trail]:
    """A tab that first shows another page of the origin (the landing page: so Back has somewhere to go), instrumented."""
    await context.add_init_script(INSTRUMENT)
    page = await context.new_page()
    trail = Trail(token)
    page.on("console", trail.on_console)
    page.on("framenavigated", lambda frame: trail.urls.append(frame.url) if frame == page.main_frame else None)
    await page.goto(broker.url + "/")
    return page, trail


async def history_entries(page: Page) -> list[str]:
    """The tab's own history (Chromium's navigation entries): their addresses."""
    cdp = await page.context.new_cdp_session(page)
    try:
        history = await cdp.send("Page.getNavigationHistory")
    finally:
        await cdp.detach()
    return [entry["url"] for entry in history["entries"]]


async def no_token_anywhere(page: Page, trail: Trail) -> None:
    """No address the tab showed holds the token except the link itself as it was opened, which
    the page replaced at once with the neutral ``/j``; no entry of the tab's history holds it."""
    for i, url in enumerate(trail.urls):
        if trail.token in url:
            assert urlsplit(url).path == f"/j/{trail.token}", url
            following = next((u for u in trail.urls[i + 1 :] if trail.token not in u), None)
            assert following is not None and urlsplit(following).path == "/j", f"not replaced: {trail.urls}"
    assert trail.token not in page.url and "#" not in page.url
    entries = await history_entries(page)
    assert all(trail.token not in url and "#" not in url for url in entries), entries


async def check_leave_now_control(page: Page, phone: bool) -> None:
    """First in the tab order, on screen, a large target, labelled plainly."""
    control = page.get_by_test_id("quick-exit")
    await expect(control).to_be_visible()
    await expect(control).to_have_text(re.compile(r"^Leave now"))
    box = await control.bounding_box()
    assert box is not None and box["width"] >= 44 and box["height"] >= 44, box
    size = PHONE if phone else DESKTOP
    assert 0 <= box["x"] and box["x"] + box["width"] <= size["width"] and 0 <= box["y"] <= 20, box
    # Start the keyboard's way through the page at its top (as on a fresh load), then one Tab.
    await page.evaluate(
        "() => { document.body.tabIndex = -1; document.body.focus(); document.body.removeAttribute('tabindex'); }"
    )
    await page.keyboard.press("Tab")
    assert await page.evaluate("() => document.activeElement?.dataset.testid") == "quick-exit"


async def leave_now(page: Page, how: str) -> None:
    if how == "tap":
        await page.get_by_test_id("quick-exit").tap()
    elif how == "click":
        await page.get_by_test_id("quick-exit").click()
    else:
        await page.keyboard.press("Escape")
        await page.keyboard.press("Escape")


async def check_quick_exit(
    page: Page, trail: Trail, how: str, *, tracks: int, connections: int = 0, before: str = "/"
) -> None:
    """Leave now, then check everything the issue asks of it."""
    trail.lines.clear()
    await leave_now(page, how)
    await expect(page.get_by_test_id("today")).to_be_visible()
    assert urlsplit(page.url).path == "/today"
    await trail.check_exit(tracks=tracks, connections=connections)
    assert await page.evaluate(ORIGIN_STORAGE) == NOTHING_KEPT
    await no_token_anywhere(page, trail)
    entries = [urlsplit(u).path for u in await history_entries(page)]
    assert entries[-2:] == [before, "/today"], f"the session's entry was replaced: {entries}"
    await page.go_back()
    assert urlsplit(page.url).path == before, "Back reaches the page before the link, not the session"
    assert await page.locator("#screen-welcome").count() == 0
    await page.go_forward()
    await expect(page.get_by_test_id("today")).to_be_visible()


async def seat_left(broker: RunningBroker, session: str, peer: str) -> None:
    """The broker saw an ordinary leave: the seat is ``left`` and the audit log says ``seat_left``."""
    assert (await broker.hub.get_session(session)).seat(peer).state.value == "left"
    lines = broker.config.audit_path.read_text().splitlines()
    entries = [json.loads(line) for line in lines if session in line]
    mine = [e["outcome"] for e in entries if e["event"] == "seat_left" and e["actor"] == f"{session}-{peer}"]
    assert mine == ["ok"], entries


# ---------------------------------------------------------------- the checklist


@pytest.mark.parametrize("phone", [False, True], ids=["desktop", "phone"])
async def test_quick_exit_from_the_checklist(
    phone: bool, broker: RunningBroker, new_context: NewContext, watch: Watch
) -> None:
    links = await schedule(broker)
    watch.secrets += links.secrets
    peer = links.peers[links.client]
    options: dict[str, Any] = {"viewport": PHONE, "is_mobile": True, "has_touch": True} if phone else {}
    page, trail = await open_tab(await new_context(**options), broker, links.tokens[peer])
    await page.goto(links.client)
    await wait_screen(page, "welcome")
    assert page.url == broker.url + "/j", "the address bar shows neither the token nor the key"
    assert await page.title() == "Video call"
    await no_token_anywhere(page, trail)
    await check_leave_now_control(page, phone)

    await start_checklist(page)
    await wait_device_checks(page)
    assert await page.evaluate("() => window.__localTracks.filter((t) => t.readyState === 'live').length") >= 2
    await page.click("#step-next")
    note = page.get_by_test_id("storage-note")
    await expect(note).to_contain_text("cannot tell for sure whether this is a private window")
    await tick_all(page, "space")
    await page.click("#step-next")
    await fill_details(page, "Flat 2, 9 Quiet Lane", "Robin, 0700 000")
    fields = await page.evaluate(FIELDS)
    assert [f["id"] for f in fields] == ["plan-code-word", "plan-how", "details-location", "details-contact"]
    for f in fields:
        assert f["autocomplete"] == "off" and f["spellcheck"] == "false" and not f["inForm"], f
        assert re.fullmatch(r"f\d+", f["name"] or ""), f"a name no browser learnt before: {f}"
    assert await page.title() == "Video call", "the title never follows the screens"
    await check_leave_now_control(page, phone)

    await check_quick_exit(page, trail, "tap" if phone else "click", tracks=2)
    await seat_left(broker, links.session, peer)
    await watch.assert_clean()


# ---------------------------------------------------------------- the waiting room, and the way back


async def test_quick_exit_from_the_waiting_room_with_esc_twice_and_the_way_back(
    broker: RunningBroker, new_context: NewContext, watch: Watch
) -> None:
    links = await schedule(broker)
    watch.secrets += links.secrets
    peer = links.peers[links.client]
    therapist = await (await new_context()).new_page()
    await therapist.goto(links.therapist)
    await wait_screen(therapist, "dashboard")
    page, trail = await open_tab(await new_context(), broker, links.tokens[peer])
    await page.goto(links.client)
    await pass_checklist(page)
    await expect(page.get_by_test_id("therapist-status")).to_have_attribute("data-present", "yes")
    first_names = [f["name"] for f in await page.evaluate(FIELDS)]
    await no_token_anywhere(page, trail)

    await check_quick_exit(page, trail, "escape", tracks=2)
    await seat_left(broker, links.session, peer)
    seat = therapist.locator(f'[data-testid=seat][data-peer="{peer}"]')
    await expect(seat).to_have_attribute("data-state", "left")

    # The way back: the link again; the seat's page is gone, so this one asks the therapist (the
    # other-device path), who lets the client in, into the call.
    await page.goto(links.client)
    await wait_screen(page, "welcome")
    await expect(page.get_by_test_id("other-device-note")).to_be_visible()
    assert page.url == broker.url + "/j"
    await pass_checklist(page)
    assert [f["name"] for f in await page.evaluate(FIELDS)] != first_names, "fresh field names each time"
    await seat.get_by_test_id("admit-other-device").click()
    await wait_screen(page, "call")
    await frames_decoded(page, 1)
    await no_token_anywhere(page, trail)
    await watch.assert_clean()


# ---------------------------------------------------------------- the call and the hold screen


@pytest.mark.parametrize("phone", [False, True], ids=["desktop", "phone"])
async def test_quick_exit_from_the_call_and_from_the_hold_screen(
    phone: bool, broker: RunningBroker, new_context: NewContext, watch: Watch
) -> None:
    links = await schedule(broker, clients=2)
    watch.secrets += links.secrets
    in_call, held = (links.peers[link] for link in links.clients)
    options: dict[str, Any] = {"viewport": PHONE, "is_mobile": True, "has_touch": True} if phone else {}
    therapist = await (await new_context()).new_page()
    tabs = []
    for link in links.clients:
        page, trail = await open_tab(await new_context(**options), broker, links.tokens[links.peers[link]])
        await page.goto(link)
        await pass_checklist(page)
        tabs.append((page, trail))
    await therapist.goto(links.therapist)
    await wait_screen(therapist, "dashboard")
    for peer in (in_call, held):
        await therapist.locator(f'[data-testid=seat][data-peer="{peer}"] [data-testid=admit]').click()
    for page, _ in tabs:
        await wait_screen(page, "call")
        await frames_decoded(page, 2)
    (call_page, call_trail), (hold_page, hold_trail) = tabs
    await therapist.locator(f'[data-testid=seat][data-peer="{held}"] [data-testid=hold]').click()
    await wait_screen(hold_page, "hold")
    for page, _ in tabs:
        await check_leave_now_control(page, phone)

    how = "tap" if phone else "click"
    # The pre-flight's connection, and one with each of the two others.
    await check_quick_exit(call_page, call_trail, how, tracks=2, connections=3)
    await check_quick_exit(hold_page, hold_trail, how, tracks=2, connections=3)
    for peer in (in_call, held):
        await seat_left(broker, links.session, peer)
        seat = therapist.locator(f'[data-testid=seat][data-peer="{peer}"]')
        await expect(seat).to_have_attribute("data-state", "left")
    await watch.assert_clean()


# ---------------------------------------------------------------- notices, and what a reload does


async def test_quick_exit_from_the_notices_and_what_a_reload_finds(
    broker: RunningBroker, new_context: NewContext, watch: Watch
) -> None:
    links = await schedule(broker)
    watch.secrets += links.secrets
    peer = links.peers[links.client]
    context = await new_context()

    # The join page's own notice (a link without its key), left with "Leave now".
    page, trail = await open_tab(context, broker, links.tokens[peer])
    await page.goto(links.client.partition("#")[0])
    await wait_screen(page, "notice")
    await expect(page.get_by_test_id("notice")).to_have_attribute("data-code", "missing_key")
    await check_leave_now_control(page, phone=False)
    await check_quick_exit(page, trail, "click", tracks=0)

    # The broker's notice page (a link that does not work), left with Esc pressed twice.
    await page.goto(broker.url + "/")
    await page.goto(f"{broker.url}/j/{'A' * 68}")
    await expect(page.locator("main")).to_have_attribute("data-code", "invalid_token")
    assert await page.title() == "Video call"
    await expect(page).to_have_url(broker.url + "/j")  # the notice page moves its address too
    await check_leave_now_control(page, phone=False)
    await check_quick_exit(page, trail, "escape", tracks=0)

    # A reload of the neutral address carries on (the other-device path: the page's resume
    # secret lived in memory only); the same address reached any other way shows a plain notice.
    await page.goto(links.client)
    await wait_screen(page, "welcome")
    await page.reload()
    await wait_screen(page, "welcome")
    await expect(page.get_by_test_id("other-device-note")).to_be_visible()
    await page.goto(broker.url + "/today")
    await page.go_back()
    await wait_screen(page, "notice")
    await expect(page.get_by_test_id("notice")).to_have_attribute("data-code", "no_link")
    assert await page.evaluate("() => sessionStorage.length") == 0, "Back forgets what the tab kept"
    fresh = await context.new_page()
    await fresh.goto(broker.url + "/j")
    await wait_screen(fresh, "notice")
    await expect(fresh.get_by_test_id("notice")).to_have_attribute("data-code", "no_link")
    await no_token_anywhere(page, trail)
    await watch.assert_clean()


async def test_a_reload_after_a_group_link_comes_back_to_the_same_seat(
    broker: RunningBroker, new_context: NewContext, watch: Watch
) -> None:
    """The page keeps the seat's own token (``joined.seat_token``) for a reload, not the group
    link's: a reload asks for the same seat (as its other device) instead of taking another one."""
    session, tokens = await broker.hub.create_session(clients=2, group_link=True)
    key = b64url_encode(group_key(decode_link_key(new_link_key()), session.id))
    watch.secrets.append(key)
    page = await (await new_context()).new_page()
    await page.goto(f"{broker.url}/j/{tokens['group']}#{key}")
    await wait_screen(page, "welcome")
    await page.reload()
    await wait_screen(page, "welcome")
    await expect(page.get_by_test_id("other-device-note")).to_be_visible()
    assert page.url == broker.url + "/j"
    seats = (await broker.hub.get_session(session.id)).clients()
    assert [seat.device is not None for seat in seats].count(True) == 1, "one seat taken, not two"
    assert [seat.other is not None for seat in seats].count(True) == 1
    await watch.assert_clean()


# ---------------------------------------------------------------- what the browser keeps of the fields

CONTROL_FORM = """<!doctype html><html lang="en"><title>control</title>
<form action="/sent" method="get"><label>Word <input name="word" id="word" type="text"></label>
<button id="send">Send</button></form></html>"""


async def _control_form(_: web.Request) -> web.Response:
    return web.Response(text=CONTROL_FORM, content_type="text/html")


async def _control_sent(_: web.Request) -> web.Response:
    return web.Response(text="<title>sent</title>", content_type="text/html")


async def test_what_the_client_typed_is_not_in_chromiums_form_history(
    broker: RunningBroker, playwright: Playwright, tmp_path: Path
) -> None:
    """The emergency details typed during a session are nowhere in a Chromium profile afterwards:
    not in its form history (the ``autofill`` table of ``Web Data``, what it offers back in a
    field), not in any file of the profile. A plain form on another local page shows that this
    browser mode does keep form history (else the check would prove nothing)."""
    control = web.Application()
    control.router.add_get("/", _control_form)
    control.router.add_get("/sent", _control_sent)
    runner = web.AppRunner(control)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    links = await schedule(broker)
    location, contact = "Nightjar Cottage 77", "Wrenfield 0799 123"
    profile = tmp_path / "profile"
    context = await playwright.chromium.launch_persistent_context(
        str(profile), executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS, viewport=DESKTOP
    )
    try:
        page = context.pages[0] if context.pages else await context.new_page()
        await page.goto(f"http://127.0.0.1:{port}/")
        await page.click("#word")
        await page.keyboard.type("Controlwordxyz")
        await page.click("#send")
        await page.wait_for_url("**/sent**")
        await page.goto(links.client)
        await start_checklist(page)
        await wait_device_checks(page)
        await page.click("#step-next")
        await tick_all(page, "space")
        await page.click("#step-next")
        await tick_all(page, "consent")
        for selector, text in (("#details-location", location), ("#details-contact", contact)):
            await page.click(selector)
            await page.keyboard.type(text)
        await page.click("#checklist-submit")
        await wait_screen(page, "waiting")
        await page.get_by_test_id("quick-exit").click()
        await expect(page.get_by_test_id("today")).to_be_visible()
    finally:
        await context.close()
        await runner.cleanup()
    rows = sqlite3.connect(profile / "Default" / "Web Data").execute("SELECT name, value FROM autofill").fetchall()
    assert ("word", "Controlwordxyz") in rows, f"this Chromium keeps no form history, so nothing is shown: {rows}"
    assert not [row for row in rows if row[1] in (location, contact)], rows
    kept = [
        str(path.relative_to(profile))
        for path in profile.rglob("*")
        if path.is_file() and any(text.encode() in path.read_bytes() for text in (location, contact))
    ]
    assert kept == [], f"what the client typed is in the profile: {kept}"
