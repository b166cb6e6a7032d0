"""Arrival alerts and a word to the waiting room in Chromium (issue 28, item 3).

The therapist's session page and dashboard each alert when a client enters the waiting room: a
tone played through WebAudio (counted in the page: every oscillator started), the number waiting
in the tab title, and a desktop notification "A client is waiting" without a label (permission
granted through the browser context). The dashboard hears it pushed (GET /api/arrivals), well
before its 30 s poll. The therapist sends the waiting client a note from the list and a typed
one; the client's waiting screen shows each as plain text, and no frame between the pages and
the broker holds the text.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from playwright.async_api import Browser, BrowserContext, Page, expect

from tests.browser.conftest import NewContext
from tests.browser.kit import CSP_WATCH, DESKTOP, look, pass_checklist, wait_screen
from tests.conftest import RunningBroker, schedule
from tests.http.test_dashboard import schedule_in_page
from tests.http.test_web_auth import PASSWORD, FullBroker, start_full_broker

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="session")]

#: Records what the page does with sound and notifications, without changing it: every
#: oscillator started, and every Notification constructed (the real one is still made).
ALERT_WATCH = """
(() => {
  window.__tones = 0;
  window.__notifications = [];
  const start = OscillatorNode.prototype.start;
  OscillatorNode.prototype.start = function (...args) { window.__tones += 1; return start.apply(this, args); };
  const Real = window.Notification;
  if (!Real) return;
  class Watched extends Real {
    constructor(title, options = {}) {
      super(title, options);
      window.__notifications.push({ title, body: options.body ?? "" });
    }
  }
  Object.defineProperty(Watched, "permission", { get: () => Real.permission });
  Watched.requestPermission = (...args) => Real.requestPermission(...args);
  window.Notification = Watched;
})();
"""


async def alerting_context(new_context: NewContext) -> BrowserContext:
    context = await new_context(permissions=["notifications"])
    await context.add_init_script(ALERT_WATCH)
    return context


def frames_of(page: Page) -> list[str]:
    """Every WebSocket text frame the page sends or receives, from now on."""
    frames: list[str] = []

    def on_socket(ws: Any) -> None:
        ws.on("framesent", lambda payload: frames.append(str(payload)))
        ws.on("framereceived", lambda payload: frames.append(str(payload)))

    page.on("websocket", on_socket)
    return frames


async def test_arrival_alert_and_a_word_to_the_waiting_room(
    broker: RunningBroker, new_context: NewContext, axe_source: str
) -> None:
    links = await schedule(broker)
    therapist = await (await alerting_context(new_context)).new_page()
    therapist_frames = frames_of(therapist)
    await therapist.goto(links.therapist)
    await wait_screen(therapist, "dashboard")
    base_title = await therapist.title()
    assert not base_title.startswith("(")
    # The sound choice is a visible toggle, remembered in this browser; a click also lets audio play.
    sound = therapist.get_by_label("Sound when a client arrives")
    await expect(sound).to_be_checked()
    await sound.uncheck()
    assert await therapist.evaluate("localStorage.getItem('tt-arrival-sound')") == "off"
    await sound.check()
    await expect(therapist.get_by_test_id("arrival-notify-state")).to_have_text("Desktop notifications are on.")
    await expect(therapist.get_by_label("Name the client in notifications")).not_to_be_checked()

    client = await (await new_context()).new_page()
    client_frames = frames_of(client)
    await client.goto(links.client)
    await pass_checklist(client)

    await expect(therapist).to_have_title(f"(1) {base_title}", timeout=10_000)
    await therapist.wait_for_function("window.__tones >= 2", timeout=10_000)  # the two notes of the tone
    assert await therapist.evaluate("window.__notifications") == [{"title": "A client is waiting", "body": ""}]

    # A note from the list.
    form = therapist.get_by_test_id("note-form")
    await expect(form).to_be_visible()
    await therapist.get_by_test_id("note-preset").select_option(index=1)
    await therapist.get_by_test_id("note-send").click()
    await expect(therapist.get_by_test_id("note-status")).to_have_text("Sent to Client.")
    preset = "I’m running about 5 minutes late. Thank you for waiting."
    note = client.get_by_test_id("therapist-note")
    await expect(note).to_have_attribute("role", "status")
    await expect(note).to_have_text(f"Your therapist says: “{preset}”")
    # A typed one, shown as text, never as markup.
    typed = "Two <b>more</b> minutes & thanks"
    await therapist.get_by_test_id("note-preset").select_option(label="Write your own…")
    await therapist.get_by_label("Your message (up to 280 characters)").fill(typed)
    await therapist.get_by_test_id("note-send").click()
    await expect(note).to_have_text(f"Your therapist says: “{typed}”")
    assert await note.locator("b").count() == 0
    await look(therapist, axe_source, "therapist-note-sent")
    await look(client, axe_source, "waiting-room-with-note")

    # What crossed the broker: the sealed note, never its text.
    sent = [json.loads(f) for f in therapist_frames if '"waiting_note"' in f]
    got = [json.loads(f) for f in client_frames if '"therapist_note"' in f]
    assert len(sent) == 2 and len(got) == 2
    assert [m["sealed"] for m in got] == [m["sealed"] for m in sent]
    for frame in therapist_frames + client_frames:
        for word in ("running about", "more</b>", "Two <b>", "thanks"):
            assert word not in frame

    # A note the broker refuses (a stale choice: a seat this session does not have) says so, not "Sent".
    await therapist.evaluate(
        """() => { const to = document.getElementById("note-to");
                   to.append(new Option("Stale", "Nobody00")); to.value = "Nobody00"; }"""
    )
    await therapist.get_by_test_id("note-preset").select_option(index=1)
    await therapist.get_by_test_id("note-send").click()
    await expect(therapist.get_by_test_id("note-status")).to_have_text(re.compile(r"^Not sent: \S"))
    assert len([f for f in client_frames if '"therapist_note"' in f]) == 2

    # Admitted: nobody waits, the title says so.
    await therapist.get_by_test_id("admit").click()
    await expect(therapist).to_have_title(base_title, timeout=10_000)


@pytest_asyncio.fixture(loop_scope="session")
async def full(tmp_path: Path) -> AsyncIterator[FullBroker]:
    running = await start_full_broker(tmp_path / "data")
    await running.auth.accounts.add("dana", PASSWORD)
    yield running
    await running.stop()


async def test_the_dashboard_hears_an_arrival_at_once(
    full: FullBroker, chromium: Browser, new_context: NewContext
) -> None:
    context = await chromium.new_context(viewport=DESKTOP, permissions=["notifications"])
    await context.add_init_script(CSP_WATCH)
    await context.add_init_script(ALERT_WATCH)
    await context.grant_permissions(["notifications", "clipboard-read", "clipboard-write"], origin=full.url)
    try:
        page = await context.new_page()
        await page.goto(full.url + "/login")
        await page.get_by_label("Login name").fill("dana")
        await page.get_by_label("Password").fill(PASSWORD)
        await page.get_by_role("button", name="Log in").click()
        await page.get_by_role("button", name="Not now").click()  # the second factor offered after login
        await page.wait_for_url(full.url + "/dashboard")
        await page.locator("body[data-ready=true]").wait_for()
        base_title = await page.title()
        await page.get_by_label("Sound when a client arrives").uncheck()
        await page.get_by_label("Sound when a client arrives").check()  # a click lets audio play
        card = await schedule_in_page(page)
        await card.get_by_role("button", name="Copy link for Client", exact=True).click()
        link = await page.evaluate("navigator.clipboard.readText()")

        client = await (await new_context()).new_page()
        await client.goto(link)
        await pass_checklist(client)
        # Pushed: well before the dashboard's 30 s poll could have noticed.
        await expect(page).to_have_title(f"(1) {base_title}", timeout=10_000)
        await page.wait_for_function("window.__tones >= 2", timeout=10_000)
        assert await page.evaluate("window.__notifications") == [{"title": "A client is waiting", "body": ""}]
        await client.close()  # gone from the waiting room: the count goes back
        await expect(page).to_have_title(base_title, timeout=10_000)
    finally:
        await context.close()
