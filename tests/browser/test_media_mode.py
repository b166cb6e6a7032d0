"""Audio-only and low-bandwidth modes people choose (issue 31, item 3), in Chromium.

- The client chooses audio only on the device check: the camera is not opened, the camera item
  says it is not needed, the therapist's waiting room says so, and in the call the therapist's tile
  says "Client chose audio only"; the client's video sender sends nothing and the therapist sends
  no video to it. During the call the client turns video back on and off again with the Mode
  control. Nothing is kept in the client's browser when the client did not ask.
- The client ticks "Remember on this device": the next link opened in that browser starts in the
  remembered mode; unticking forgets it at once, a change during the call is kept, and the quick
  exit forgets it. Low bandwidth
  caps video at 150 kbit/s and a quarter of the size on both sides' senders.
- The therapist chooses audio only during the call: the client's tile says "Your therapist chose
  audio only"; the choice is kept on the therapist's device, so the next session starts with it.
  The dashboard (the therapist's account page) shows and changes the same setting, "Calls from this
  device", and a session opened from it starts with it.
- A camera the browser refuses (a Chromium that really denies it: only the microphone is granted)
  leads to the offer "Continue with audio only", and the client joins the call with it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page, Playwright, expect

from tests.browser.conftest import NewContext
from tests.browser.kit import (
    CHROMIUM_ARGS,
    CSP_WATCH,
    DESKTOP,
    RECORD_PEER_CONNECTIONS,
    Watch,
    check_axe,
    fill_details,
    frames_decoded,
    look,
    start_checklist,
    tick_all,
    wait_device_checks,
    wait_screen,
)
from tests.conftest import RunningBroker, SessionLinks, schedule
from tests.http.test_dashboard import schedule_in_page
from tests.http.test_web_auth import PASSWORD, FullBroker, start_full_broker

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="session")]

#: What this page's peer connection sends and receives: the video sender's track and encoding, and
#: the audio and video packets counted by getStats() (inbound and outbound).
SENDING = """async () => {
  const pcs = window.__peerConnections.filter((pc) => pc.connectionState === 'connected');
  const pc = pcs[pcs.length - 1];
  if (!pc) return null;
  const video = pc.getTransceivers().find((t) => t.receiver.track && t.receiver.track.kind === 'video');
  const enc = video.sender.getParameters().encodings[0] || {};
  const out = { videoTrack: video.sender.track ? video.sender.track.readyState : null,
                active: enc.active !== false, maxBitrate: enc.maxBitrate ?? null, scale: enc.scaleResolutionDownBy ?? 1,
                audioIn: 0, audioOut: 0, videoOut: 0 };
  (await pc.getStats()).forEach((s) => {
    if (s.type === 'inbound-rtp' && s.kind === 'audio') out.audioIn += s.packetsReceived;
    if (s.type === 'outbound-rtp' && s.kind === 'audio') out.audioOut += s.packetsSent;
    if (s.type === 'outbound-rtp' && s.kind === 'video') out.videoOut += s.packetsSent;
  });
  return out;
}"""

STORAGE = """async () => ({
  local: Object.fromEntries(Object.keys(localStorage).map((k) => [k, localStorage.getItem(k)])),
  session: sessionStorage.length,
  databases: (await indexedDB.databases()).map((d) => d.name),
})"""


def sends(condition: str) -> str:
    """A page function true once this page's connected call meets `condition` (about `s`, SENDING's figures)."""
    return f"() => ({SENDING})().then((s) => s !== null && ({condition}))"


def tile(page: Page, peer: str) -> Any:
    return page.locator(f'[data-testid=tile][data-peer="{peer}"]')


async def sending(page: Page) -> dict[str, Any]:
    found = await page.evaluate(SENDING)
    assert found is not None, "no connected call on this page"
    return dict(found)


async def finish_checklist(page: Page) -> None:
    """After the device step: the attested points, the consent and the details, into the waiting room."""
    await page.click("#step-next")
    await tick_all(page, "space")
    await page.click("#step-next")
    await tick_all(page, "consent")
    await fill_details(page, "Home", "Sam, 0123 456")
    await page.click("#checklist-submit")
    await wait_screen(page, "waiting")


async def recorded(context: Any) -> Any:
    """A context whose pages record their peer connections (for SENDING)."""
    await context.add_init_script(RECORD_PEER_CONNECTIONS)
    return context


async def open_page(context: Any, url: str) -> Page:
    page: Page = await context.new_page()
    await page.goto(url)
    return page


async def therapist_admits(therapist: Page, links: SessionLinks) -> None:
    await therapist.goto(links.therapist)
    await wait_screen(therapist, "dashboard")
    await therapist.get_by_test_id("admit").click()


async def videos_off(page: Page) -> None:
    """This page sends no video: its video sender has no track."""
    await page.wait_for_function(sends("s.videoTrack === null"))


async def test_the_client_chooses_audio_only_before_and_during_the_call(
    broker: RunningBroker, new_context: NewContext, watch: Watch, axe_source: str
) -> None:
    links = await schedule(broker, clients=1)
    watch.secrets.append(links.link_key)
    client_peer, therapist_peer = links.peers[links.client], links.peers[links.therapist]
    client = await open_page(await recorded(await new_context()), links.client)
    await start_checklist(client)
    await wait_device_checks(client)
    choice = client.get_by_test_id("mode-choice")
    await expect(client.get_by_test_id("mode-video")).to_be_checked()
    await expect(client.get_by_test_id("mode-remember")).not_to_be_checked()  # off unless the client asks
    await client.get_by_test_id("mode-audio_only").check()
    await expect(client.get_by_test_id("item-camera")).to_contain_text("Not needed: you chose audio only")
    await expect(client.locator("#preview-placeholder")).to_have_text("Audio only: your camera is off.")
    assert await client.evaluate("document.getElementById('preview-video').srcObject") is None
    await wait_device_checks(client)
    await expect(choice).to_be_visible()
    await look(client, axe_source, "client-mode-audio-only")
    await finish_checklist(client)

    therapist = await open_page(await recorded(await new_context()), links.therapist)
    await wait_screen(therapist, "dashboard")
    seat = therapist.get_by_test_id("seat")
    await expect(seat.get_by_test_id("seat-audio-only")).to_have_text("Chose audio only: no camera in this call.")
    await seat.get_by_test_id("admit").click()
    await wait_screen(client, "call")

    # The therapist is told, calmly, on the tile; the client sends no video and the therapist none to it.
    their_tile = tile(therapist, client_peer)
    await expect(their_tile).to_have_attribute("data-state", "connected")
    await expect(their_tile).to_have_attribute("data-remote-mode", "audio_only")
    await expect(their_tile.locator(".camera-off")).to_have_text("Client chose audio only")
    await expect(their_tile.locator(".camera-off")).to_be_visible()
    await videos_off(client)
    await therapist.wait_for_function(sends("s.active === false"))
    await expect(client.get_by_test_id("toggle-camera")).to_be_disabled()
    await expect(client.get_by_test_id("call-mode")).to_have_value("audio_only")
    # No frozen picture of the therapist either: the client's tile says why there is none.
    await expect(tile(client, therapist_peer).locator(".camera-off")).to_have_text("Audio only: no video")
    await expect(tile(client, therapist_peer).locator("video")).to_have_class("off")
    await client.wait_for_function(sends("s.audioIn > 50 && s.audioOut > 50"))
    await check_axe(client, axe_source, "client-call-audio-only")
    await check_axe(therapist, axe_source, "therapist-call-client-audio-only")
    # Nothing of the choice was kept: the client did not ask.
    kept = await client.evaluate(STORAGE)
    assert kept["local"] == {} and kept["databases"] == [], kept

    # During the call: video back on (the camera opens again, nothing renegotiated), then audio only again.
    connection = await their_tile.get_attribute("data-connection")
    await client.get_by_test_id("call-mode").select_option("video")
    await expect(their_tile).to_have_attribute("data-remote-mode", "video")
    await expect(their_tile.locator(".camera-off")).to_be_hidden()
    await client.wait_for_function(sends("s.videoTrack === 'live'"))
    await frames_decoded(therapist, 1)
    await frames_decoded(client, 1)  # the therapist sends video to it again
    await client.get_by_test_id("call-mode").select_option("audio_only")
    await expect(their_tile).to_have_attribute("data-remote-mode", "audio_only")
    await expect(their_tile.locator(".camera-off")).to_have_text("Client chose audio only")
    await videos_off(client)
    assert await their_tile.get_attribute("data-connection") == connection, "the mode changed without a new connection"
    await expect(tile(client, therapist_peer)).to_have_attribute("data-remote-mode", "video")
    kept = await client.evaluate(STORAGE)
    assert kept["local"] == {}, kept
    await watch.assert_clean()


async def test_the_client_remembers_only_when_asked_and_low_bandwidth_caps_video(
    broker: RunningBroker, new_context: NewContext, watch: Watch
) -> None:
    context = await recorded(await new_context())
    first = await schedule(broker, clients=1)
    client = await open_page(context, first.client)
    await start_checklist(client)
    await client.get_by_test_id("mode-low_bandwidth").check()
    assert (await client.evaluate(STORAGE))["local"] == {}, "kept before the client asked"
    await client.get_by_test_id("mode-remember").check()
    assert (await client.evaluate(STORAGE))["local"] == {"tt-call-mode": "low_bandwidth"}
    await client.close()

    # The next link opened in this browser starts with the remembered choice, and the call uses it.
    second = await schedule(broker, clients=1)
    client = await open_page(context, second.client)
    await start_checklist(client)
    await expect(client.get_by_test_id("mode-low_bandwidth")).to_be_checked()
    await expect(client.get_by_test_id("mode-remember")).to_be_checked()
    # Unticking forgets it at once; ticking keeps it again.
    note = client.get_by_test_id("storage-note")  # what the checklist says this browser keeps
    await expect(note).to_contain_text("keeps only your choice of how to join, as you asked")
    await client.get_by_test_id("mode-remember").uncheck()
    assert (await client.evaluate(STORAGE))["local"] == {}
    await expect(note).to_contain_text("When you leave, this page keeps nothing on your device.")
    await client.get_by_test_id("mode-remember").check()
    assert (await client.evaluate(STORAGE))["local"] == {"tt-call-mode": "low_bandwidth"}
    await expect(note).to_contain_text("keeps only your choice of how to join, as you asked")
    await wait_device_checks(client)
    await finish_checklist(client)
    therapist = await open_page(await recorded(await new_context()), second.therapist)
    await therapist_admits(therapist, second)
    await wait_screen(client, "call")
    await expect(client.get_by_test_id("call-mode")).to_have_value("low_bandwidth")
    # Capped on both sides' senders: the client's own, and the therapist's towards this client.
    capped = sends("s.maxBitrate !== null && s.maxBitrate <= 150000 && s.scale >= 4 && s.active")
    await client.wait_for_function(capped)
    await therapist.wait_for_function(capped)
    await frames_decoded(therapist, 1)

    # A change during the call is remembered too (the client asked); the quick exit leaves nothing.
    await client.get_by_test_id("call-mode").select_option("audio_only")
    await videos_off(client)
    assert (await client.evaluate(STORAGE))["local"] == {"tt-call-mode": "audio_only"}
    await client.keyboard.press("Escape")
    await client.keyboard.press("Escape")
    await client.wait_for_url("**/today")
    assert (await client.evaluate(STORAGE))["local"] == {}
    await watch.assert_clean()


async def test_the_therapist_chooses_audio_only_and_it_is_remembered_on_the_device(
    broker: RunningBroker, new_context: NewContext, watch: Watch, axe_source: str
) -> None:
    therapist_context = await recorded(await new_context())
    first = await schedule(broker, clients=1)
    client = await open_page(await recorded(await new_context()), first.client)
    await start_checklist(client)
    await wait_device_checks(client)
    await finish_checklist(client)
    therapist = await open_page(therapist_context, first.therapist)
    await wait_screen(therapist, "dashboard")
    await expect(therapist.get_by_test_id("call-mode")).to_have_value("video")  # before the call: the same control
    await therapist.get_by_test_id("admit").click()
    await frames_decoded(client, 1)
    therapist_peer = first.peers[first.therapist]

    await therapist.get_by_test_id("call-mode").select_option("audio_only")
    theirs = tile(client, therapist_peer)
    await expect(theirs).to_have_attribute("data-remote-mode", "audio_only")
    await expect(theirs.locator(".camera-off")).to_have_text("Your therapist chose audio only")
    await videos_off(therapist)
    await client.wait_for_function(sends("s.active === false"))
    assert await therapist.evaluate("localStorage.getItem('tt-media-mode')") == "audio_only"
    await expect(tile(therapist, first.peers[first.client]).locator(".camera-off")).to_have_text("Audio only: no video")
    await look(therapist, axe_source, "therapist-call-audio-only")
    await look(client, axe_source, "client-call-therapist-audio-only")

    # The next session on this device starts in audio only: the camera is never opened.
    second = await schedule(broker, clients=1)
    client2 = await open_page(await recorded(await new_context()), second.client)
    await start_checklist(client2)
    await wait_device_checks(client2)
    await finish_checklist(client2)
    therapist2 = await open_page(therapist_context, second.therapist)
    await wait_screen(therapist2, "dashboard")
    await expect(therapist2.get_by_test_id("call-mode")).to_have_value("audio_only")
    await expect(therapist2.get_by_test_id("toggle-camera")).to_be_disabled()
    await therapist2.get_by_test_id("admit").click()
    theirs2 = tile(client2, second.peers[second.therapist])
    await expect(theirs2).to_have_attribute("data-state", "connected")
    await expect(theirs2.locator(".camera-off")).to_have_text("Your therapist chose audio only")
    await videos_off(therapist2)
    await watch.assert_clean()


async def test_a_denied_camera_is_offered_audio_only_and_the_client_joins(
    playwright: Playwright, broker: RunningBroker, new_context: NewContext, axe_source: str
) -> None:
    # A Chromium that asks for real (no fake consent): only the microphone is granted, so the
    # camera request is refused by the browser itself, as when a person says no to the camera.
    args = [a for a in CHROMIUM_ARGS if a != "--use-fake-ui-for-media-stream"]
    args.append("--disable-features=WebRtcHideLocalIpsWithMdns")  # real host candidates, as with the fake UI
    denying: Browser = await playwright.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=args)
    try:
        links = await schedule(broker, clients=1)
        context = await denying.new_context(viewport=DESKTOP, permissions=["microphone"])
        await context.add_init_script(CSP_WATCH)
        client = await open_page(await recorded(context), links.client)
        await start_checklist(client)
        problem = client.get_by_test_id("media-problem")
        await expect(problem).to_be_visible()
        await expect(problem).to_contain_text("not allowing this page to use the camera")
        await expect(client.get_by_test_id("item-camera")).to_have_attribute("data-status", "fail")
        await expect(client.get_by_test_id("item-microphone")).to_have_attribute("data-status", "ok")
        offer = client.get_by_test_id("media-audio-only")
        await expect(offer).to_be_visible()
        await expect(offer).to_have_text("Continue with audio only")
        await look(client, axe_source, "client-camera-denied-audio-only-offer")
        await offer.click()
        await expect(problem).to_be_hidden()
        await expect(client.get_by_test_id("mode-audio_only")).to_be_checked()
        await wait_device_checks(client)
        await finish_checklist(client)

        therapist = await open_page(await recorded(await new_context()), links.therapist)
        await therapist_admits(therapist, links)
        await wait_screen(client, "call")
        their_tile = tile(therapist, links.peers[links.client])
        await expect(their_tile).to_have_attribute("data-state", "connected")
        await expect(their_tile.locator(".camera-off")).to_have_text("Client chose audio only")
        await therapist.wait_for_function(sends("s.audioIn > 50"))
        await client.wait_for_function(sends("s.audioIn > 50"))
        assert await client.evaluate("window.__cspViolations") == []
    finally:
        await denying.close()


@pytest_asyncio.fixture(loop_scope="session")
async def full(tmp_path: Path) -> AsyncIterator[FullBroker]:
    running = await start_full_broker(tmp_path / "data")
    await running.auth.accounts.add("dana", PASSWORD)
    yield running
    await running.stop()


async def test_the_dashboard_sets_how_this_device_joins_calls(
    full: FullBroker, new_context: NewContext, watch: Watch, axe_source: str
) -> None:
    page = await (await recorded(await new_context())).new_page()
    await page.goto(full.url + "/login")
    await page.get_by_label("Login name").fill("dana")
    await page.get_by_label("Password").fill(PASSWORD)
    await page.get_by_role("button", name="Log in").click()
    await page.get_by_role("button", name="Not now").click()  # the second factor offered after login
    await page.wait_for_url(full.url + "/dashboard")
    await page.locator("body[data-ready=true]").wait_for()
    setting = page.get_by_label("Calls from this device")
    await expect(setting).to_have_value("video")
    await setting.select_option("low_bandwidth")
    assert await page.evaluate("localStorage.getItem('tt-media-mode')") == "low_bandwidth"
    await check_axe(page, axe_source, "dashboard-call-mode-setting")
    card = await schedule_in_page(page)
    href = await card.get_by_role("link", name="Open session").get_attribute("href")
    assert href is not None
    await page.goto(href)
    await wait_screen(page, "dashboard")
    await expect(page.get_by_test_id("call-mode")).to_have_value("low_bandwidth")
    await page.get_by_test_id("call-mode").select_option("video")
    await page.go_back()
    await page.wait_for_url(full.url + "/dashboard")
    await expect(page.get_by_label("Calls from this device")).to_have_value("video")
    await watch.assert_clean()
