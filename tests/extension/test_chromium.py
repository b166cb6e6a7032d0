"""The extension in Chromium (loaded with ``--load-extension`` into a persistent context, headless):
Chromium gives an extension no response bodies, so it detects and stops. It reads each response's
headers as they arrive, fetches each file the page loaded again and compares it with the signed
manifest, and compares the page's own pins; on a mismatch the page's tracks and connections end
and the tab shows the warning page within a second.

A broker serving the practice's release unaltered: the page is marked verified and the badge says
"verified build 0.1.0". In a verified page holding a camera track and a peer connection, a module
changed on the broker and then loaded: the track ends, the connection closes, the warning shows
within 1 s. A broker whose host was broken into (a module altered, the pages re-pinned): the page
is stopped within 1 s of loading (its altered module may have run in that time: Chromium cannot hold
a response back, so this is detection, not refusal).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio
from playwright.async_api import BrowserContext, Page, Playwright, Worker, expect

from tests.browser.conftest import NewContext
from tests.browser.kit import CHROMIUM_ARGS, DESKTOP, code_with, pass_checklist, wait_screen
from tests.conftest import RunningBroker, schedule, start_broker
from tests.extension.kit import (
    LATER_MODULE,
    MARGIN_S,
    STOP_WITHIN_S,
    Practice,
    altered_and_repinned,
    flip_in_place,
    pinned_extension,
    signed_practice,
)

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="session"), pytest.mark.alone]

VERIFIED = "() => document.readyState === 'complete' && (document.documentElement.dataset.verifiedBuild ?? null)"
#: In the page: a camera and microphone track and a peer connection, as a call holds them, and a
#: report (through an exposed function) of their state the moment the extension stops the page.
HOLD_MEDIA = """async () => {
  const stream = await navigator.mediaDevices.getUserMedia({video: true, audio: true});
  const pc = new RTCPeerConnection();
  pc.addTrack(stream.getVideoTracks()[0], stream);
  document.addEventListener('broker-web-verify:stopped', () => window.reportStop(JSON.stringify({
    tracks: stream.getTracks().map((t) => t.readyState), pc: pc.signalingState})));
  return stream.getTracks().map((t) => t.readyState);
}"""


@dataclass
class Setup:
    practice: Practice
    clean: RunningBroker
    altered: RunningBroker
    unpinned: RunningBroker
    context: BrowserContext
    worker: Worker
    reports: list[dict[str, Any]] = field(default_factory=list)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def setup(
    tmp_path_factory: pytest.TempPathFactory,
    playwright: Playwright,  # noqa: F811
) -> AsyncIterator[Setup]:
    tmp = tmp_path_factory.mktemp("extension-chromium")
    practice = signed_practice(tmp)
    clean = await start_broker(tmp / "clean", web_root=str(practice.root))
    altered = await start_broker(tmp / "altered", web_root=str(altered_and_repinned(practice, tmp)))
    unpinned = await start_broker(tmp / "unpinned", web_root=str(practice.root))
    extension = pinned_extension(tmp, [clean.url, altered.url], practice.public_key)
    context = await playwright.chromium.launch_persistent_context(
        str(tmp / "profile"),
        executable_path="/usr/bin/chromium",
        headless=True,
        viewport=DESKTOP,
        args=[*CHROMIUM_ARGS, f"--disable-extensions-except={extension}", f"--load-extension={extension}"],
        ignore_default_args=["--disable-extensions"],
    )
    try:
        worker = (
            context.service_workers[0] if context.service_workers else await context.wait_for_event("serviceworker")
        )
        # Ready once the content scripts for the pinned origins are registered.
        deadline = time.monotonic() + 10
        while not await worker.evaluate("chrome.scripting.getRegisteredContentScripts().then((s) => s.length)"):
            assert time.monotonic() < deadline, "the extension registered no content script"
            await asyncio.sleep(0.1)
        setup = Setup(practice, clean, altered, unpinned, context, worker)
        await context.expose_function("reportStop", lambda text: setup.reports.append(json.loads(text)))
        yield setup
    finally:
        await context.close()
        for running in (clean, altered, unpinned):
            await running.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def page(setup: Setup) -> AsyncIterator[Page]:
    setup.reports.clear()
    page = await setup.context.new_page()
    yield page
    await page.close()


async def badge_title(setup: Setup, page: Page) -> str:
    title = await setup.worker.evaluate(
        """async (url) => {
          const [tab] = (await chrome.tabs.query({})).filter((t) => t.url === url);
          return tab ? chrome.action.getTitle({tabId: tab.id}) : null; }""",
        page.url,
    )
    return str(title)


async def warning_code(setup: Setup, page: Page, deadline: float) -> str:
    """Wait until the tab shows the extension's warning page (by the deadline); its reason code."""
    prefix = f"chrome-extension://{setup.worker.url.split('/')[2]}/pages/warning.html"
    while not page.url.startswith(prefix):
        assert time.monotonic() < deadline, f"no warning page in time: {page.url}"
        await asyncio.sleep(0.02)
    await page.wait_for_selector("main[data-code]", state="attached")
    return str(await page.get_attribute("main", "data-code"))


#: In the extension's service worker: every request made by no tab (the extension's own), recorded.
RECORD_OWN_REQUESTS = """() => { globalThis.ownRequests = [];
  chrome.webRequest.onBeforeRequest.addListener((d) => { if (d.tabId < 0) ownRequests.push(d.url); },
    {urls: ['<all_urls>']}); }"""


async def test_chromium_marks_the_unaltered_release_verified(setup: Setup, page: Page) -> None:
    await setup.worker.evaluate(RECORD_OWN_REQUESTS)
    await page.goto((await schedule(setup.clean)).clients[0])
    assert await (await page.wait_for_function(VERIFIED)).json_value() == "0.1.0"
    assert await badge_title(setup, page) == "verified build 0.1.0"
    # The verified page runs on: it leaves its loading screen (slowly, on a loaded machine).
    await page.wait_for_function("document.body.dataset.screen && document.body.dataset.screen !== 'loading'")
    own = await setup.worker.evaluate("ownRequests")
    assert f"{setup.clean.url}/.well-known/broker-web/manifest.json" in own
    assert all(url.startswith(setup.clean.url + "/") for url in own), "a request left for another origin"


async def test_chromium_a_module_changed_mid_call_ends_the_tracks_and_warns_within_a_second(
    setup: Setup, page: Page
) -> None:
    await page.goto((await schedule(setup.clean)).clients[0])
    await page.wait_for_function(VERIFIED)
    assert await page.evaluate(HOLD_MEDIA) == ["live", "live"]
    module = setup.practice.root / "js" / LATER_MODULE
    original = flip_in_place(module)
    try:
        started = time.monotonic()
        await page.evaluate("(m) => { import(m).catch(() => {}); }", f"/static/js/{LATER_MODULE}")
        code = await warning_code(setup, page, started + STOP_WITHIN_S + MARGIN_S)
    finally:
        module.write_bytes(original)
    assert code == "body", code
    assert setup.reports == [{"tracks": ["ended", "ended"], "pc": "closed"}]


async def test_chromium_a_broken_into_broker_is_stopped_within_a_second_of_loading(setup: Setup, page: Page) -> None:
    started = time.monotonic()
    await page.goto((await schedule(setup.altered)).clients[0], wait_until="commit")
    code = await warning_code(setup, page, started + STOP_WITHIN_S + MARGIN_S)
    assert code == "header", code  # the CSP pins the import map, which the attacker had to change
    assert "This page was stopped" in await page.inner_text("main")


async def test_the_therapist_sees_their_app_is_verified_next_to_the_safety_code(
    setup: Setup, page: Page, new_context: NewContext
) -> None:
    """The client's page is verified by the extension; the therapist's browser has none: the
    therapist sees "Their app is verified" by the client's safety code (sent over the pair's data
    channel), and the client sees nothing about the therapist's app (unverified is normal)."""
    links = await schedule(setup.clean)
    client_peer, therapist_peer = links.peers[links.client], links.peers[links.therapist]
    await page.goto(links.client)
    await page.wait_for_function(VERIFIED)
    await pass_checklist(page)
    therapist = await (await new_context()).new_page()
    await therapist.goto(links.therapist)
    await wait_screen(therapist, "dashboard")
    await therapist.get_by_test_id("admit").click()
    await wait_screen(page, "call")
    assert await code_with(page, therapist_peer) == await code_with(therapist, client_peer)
    client_tile = therapist.locator(f'[data-testid=tile][data-peer="{client_peer}"]')
    await expect(client_tile.get_by_test_id("their-app")).to_have_text("Their app is verified")
    assert "0.1.0" in str(await client_tile.get_by_test_id("their-app").get_attribute("title"))
    therapist_tile = page.locator(f'[data-testid=tile][data-peer="{therapist_peer}"]')
    await expect(therapist_tile).to_have_attribute("data-state", "connected")
    await expect(therapist_tile.get_by_test_id("their-app")).to_have_count(0)


async def test_chromium_pinning_a_practice_from_its_site(setup: Setup, page: Page) -> None:
    """Not pinned: nothing is checked or marked, the badge offers to pin (from the headers alone).
    Asked, the extension shows the key that signed the site's manifest, with its fingerprint;
    pinned, the next visit is verified."""
    link = (await schedule(setup.unpinned)).clients[0]
    await page.goto(link)
    await page.wait_for_load_state("load")
    assert await badge_title(setup, page) == "This may be a practice's call page: pin its signing key?"
    assert await page.evaluate("document.documentElement.dataset.verifiedBuild ?? null") is None
    extension_page = await setup.context.new_page()
    await extension_page.goto(f"chrome-extension://{setup.worker.url.split('/')[2]}/pages/warning.html")
    origin = setup.unpinned.url
    offer = await extension_page.evaluate("(origin) => chrome.runtime.sendMessage({type: 'offer', origin})", origin)
    assert offer["version"] == "0.1.0"
    assert [signer["key"] for signer in offer["signers"]] == [setup.practice.public_key]
    assert re.fullmatch(r"([0-9a-f]{4} ){7}[0-9a-f]{4}", offer["signers"][0]["fingerprint"])
    key = setup.practice.public_key
    try:
        await extension_page.evaluate(
            "([origin, key]) => chrome.runtime.sendMessage({type: 'pin', origin, key})", [origin, key]
        )
        await page.goto(link)
        assert await (await page.wait_for_function(VERIFIED)).json_value() == "0.1.0"
        assert await badge_title(setup, page) == "verified build 0.1.0"
    finally:
        await extension_page.evaluate("(origin) => chrome.runtime.sendMessage({type: 'unpin', origin})", origin)
        await extension_page.close()
