"""Every state a person must understand, reached for real and shown: camera or microphone
denied or missing (and fixed), a link revoked, expired, not yet valid or incomplete, the
session ended while away or lost with an emptied Redis, declined, removed, the seat opened in
another window, a bad link at HTTP level, and re-testing devices in the waiting room."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from playwright.async_api import Page, expect

from broker.client.broker_client import BrokerClient
from broker.signaling.protocol import Peers, WaitingRoom
from tests.browser.conftest import NewContext
from tests.browser.kit import Watch, look, pass_checklist, start_checklist, wait_screen
from tests.conftest import RunningBroker, SessionLinks, schedule, start_broker
from tests.redis_server import RedisServer, free_port

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="session")]

# The person's answer to the browser's camera prompt, decided by the test: the fake-media
# flag always says yes, so "no" and "no device" are given here, before any page script runs.
MEDIA_ANSWER = """
window.__mediaAnswer = %s;
if (navigator.mediaDevices) {
const realGetUserMedia = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
navigator.mediaDevices.getUserMedia = (constraints) => {
  const answer = window.__mediaAnswer;
  if (answer === 'deny') return Promise.reject(new DOMException('Permission denied', 'NotAllowedError'));
  if (answer === 'none') return Promise.reject(new DOMException('Requested device not found', 'NotFoundError'));
  return realGetUserMedia(constraints);
};
}
"""

DAY = 24 * 3600


@pytest_asyncio.fixture(loop_scope="session")
async def session_links(broker: RunningBroker, watch: Watch) -> SessionLinks:
    links = await schedule(broker, clients=1)
    watch.secrets.append(links.link_key)
    return links


@pytest_asyncio.fixture(loop_scope="session")
async def therapist_client(session_links: SessionLinks) -> AsyncIterator[BrokerClient]:
    """The therapist as the Python client (fast), speaking the same protocol."""
    client = BrokerClient(session_links.therapist, reconnect=False, agent="test-therapist")
    await client.connect()
    yield client
    await client.close()


async def open_client(new_context: NewContext, links: SessionLinks, media: str | None = None) -> Page:
    context = await new_context()
    if media is not None:
        await context.add_init_script(MEDIA_ANSWER % f"'{media}'")
    page = await context.new_page()
    await page.goto(links.client)
    await wait_screen(page, "welcome")
    return page


async def drop_connections(broker: RunningBroker, peer: str) -> None:
    for conn in list(broker.hub.connections.by_id.values()):
        if conn.peer_id == peer:
            await conn.transport.close(1012, "")


async def expect_notice(page: Page, code: str) -> None:
    """The notice for ``code``: a heading and one clear sentence (docs: issue 28's error pages)."""
    await wait_screen(page, "notice")
    card = page.get_by_test_id("notice")
    await expect(card).to_have_attribute("data-code", code)
    await expect(card.locator("p")).to_have_count(1)
    await expect(card.locator("p")).to_have_text(re.compile(r"^[A-Z][^.!?]*[.!?]$"))


async def waiting(therapist: BrokerClient, peer: str, state: str = "waiting") -> Any:
    return await therapist.expect(
        WaitingRoom, where=lambda m: any(s.peer == peer and s.state.value == state for s in m.seats), timeout=30
    )


async def test_camera_denied_then_allowed(
    session_links: SessionLinks, new_context: NewContext, watch: Watch, axe_source: str
) -> None:
    page = await open_client(new_context, session_links, media="deny")
    await start_checklist(page)
    problem = page.get_by_test_id("media-problem")
    await expect(problem).to_be_visible()
    await expect(problem).to_contain_text("not allowing this page to use the camera or microphone")
    await expect(problem).to_contain_text("choose Allow")
    await expect(page.get_by_test_id("item-camera")).to_have_attribute("data-status", "fail")
    await expect(page.get_by_test_id("item-microphone")).to_have_attribute("data-status", "fail")
    await expect(page.get_by_test_id("item-preflight")).to_have_attribute("data-status", "ok")
    await page.click("#step-next")
    await expect(page.get_by_test_id("checklist-error")).to_contain_text("did not work")
    await look(page, axe_source, "client-camera-denied")
    # The person allows access in the browser and tries again.
    await page.evaluate("window.__mediaAnswer = 'allow'")
    await page.click("#media-retry")
    await expect(problem).to_be_hidden()
    await expect(page.get_by_test_id("item-camera")).to_have_attribute("data-status", "ok")
    await expect(page.get_by_test_id("item-microphone")).to_have_attribute("data-status", "ok")
    await watch.assert_clean()


async def test_no_camera_or_microphone(
    session_links: SessionLinks, new_context: NewContext, watch: Watch, axe_source: str
) -> None:
    page = await open_client(new_context, session_links, media="none")
    await start_checklist(page)
    problem = page.get_by_test_id("media-problem")
    await expect(problem).to_contain_text("No camera or microphone was found")
    await expect(problem).to_contain_text("Plug in")
    await expect(page.get_by_test_id("item-camera")).to_have_attribute("data-status", "fail")
    await expect(page.get_by_test_id("item-preflight")).to_have_attribute("data-status", "ok")
    await look(page, axe_source, "client-no-devices")
    await watch.assert_clean()


async def test_link_revoked_while_open(
    broker: RunningBroker, session_links: SessionLinks, new_context: NewContext, watch: Watch, axe_source: str
) -> None:
    page = await open_client(new_context, session_links)
    await broker.hub.revoke_seat(session_links.session, session_links.peers[session_links.client])
    await expect_notice(page, "invalid_token")
    await expect(page.locator("#notice-title")).to_have_text("This link no longer works")
    await expect(page.locator("#notice-message")).to_contain_text("replaced your link")
    await look(page, axe_source, "client-link-revoked")
    await watch.assert_clean()


@pytest.mark.parametrize(
    ("shift", "code", "title"),
    [(+30 * DAY, "token_expired", "This link has expired"), (-30 * DAY, "token_not_yet_valid", "It is a little early")],
)
async def test_link_window_over_websocket(
    shift: int,
    code: str,
    title: str,
    broker: RunningBroker,
    session_links: SessionLinks,
    new_context: NewContext,
    watch: Watch,
    axe_source: str,
) -> None:
    """The page is open when the link's window closes (or, with the clock set back, has not opened)."""
    page = await open_client(new_context, session_links)
    hub = broker.hub
    real_clock = hub.clock
    hub.clock = lambda: time.time() + shift
    try:
        await drop_connections(broker, session_links.peers[session_links.client])
        await expect_notice(page, code)
    finally:
        hub.clock = real_clock
    await expect(page.locator("#notice-title")).to_have_text(title)
    await look(page, axe_source, f"client-{code.replace('_', '-')}")
    await watch.assert_clean()


async def test_session_ended_while_away(
    broker: RunningBroker,
    session_links: SessionLinks,
    therapist_client: BrokerClient,
    new_context: NewContext,
    watch: Watch,
    axe_source: str,
) -> None:
    page = await open_client(new_context, session_links)
    broker.hub.accepting = False  # the page cannot rejoin until the session is gone
    try:
        await drop_connections(broker, session_links.peers[session_links.client])
        await therapist_client.end()
    finally:
        broker.hub.accepting = True
    # The broker forgets an ended session entirely, so its link is simply no longer valid.
    await expect_notice(page, "invalid_token")
    await expect(page.locator("#notice-title")).to_have_text("This link no longer works")
    await expect(page.locator("#notice-message")).to_contain_text("may have ended")
    await look(page, axe_source, "client-session-ended-while-away")
    await watch.assert_clean()


async def test_session_cancelled_while_waiting_and_its_link_opened_again(
    broker: RunningBroker, new_context: NewContext, watch: Watch, axe_source: str
) -> None:
    """A client waiting when the therapist cancels is told the session was cancelled (not that it
    ended); the link opened afterwards says so too, on its notice page."""
    links = await schedule(broker, clients=1)
    watch.secrets.extend(links.secrets)
    page = await open_client(new_context, links)
    await pass_checklist(page)
    await broker.hub.cancel_session(links.session)
    await wait_screen(page, "ended")
    await expect(page.locator("#ended-title")).to_have_text("This session was cancelled")
    await look(page, axe_source, "client-session-cancelled")
    again = await (await new_context()).new_page()
    response = await again.goto(links.client)
    assert response is not None and response.status == 410
    await expect(again.locator("main")).to_have_attribute("data-code", "session_cancelled")
    await expect(again.locator("h1")).to_have_text("This session was cancelled")
    await watch.assert_clean()


async def test_declined_after_retesting_devices(
    session_links: SessionLinks,
    therapist_client: BrokerClient,
    new_context: NewContext,
    watch: Watch,
    axe_source: str,
) -> None:
    page = await open_client(new_context, session_links)
    await pass_checklist(page)
    await expect(page.get_by_test_id("therapist-status")).to_have_attribute("data-present", "yes")
    await page.locator("#retest summary").click()
    await expect(page.locator("#retest-status")).to_have_text("Camera and microphone are working.")
    await look(page, axe_source, "client-waiting-retest")
    peer = session_links.peers[session_links.client]
    await waiting(therapist_client, peer)
    await therapist_client.decline(peer)
    await expect_notice(page, "declined")
    await expect(page.locator("#notice-message")).to_contain_text("not something you did wrong")
    await look(page, axe_source, "client-declined")
    await watch.assert_clean()


async def test_removed_from_the_call(
    session_links: SessionLinks,
    therapist_client: BrokerClient,
    new_context: NewContext,
    watch: Watch,
    axe_source: str,
) -> None:
    page = await open_client(new_context, session_links)
    await pass_checklist(page)
    peer = session_links.peers[session_links.client]
    await waiting(therapist_client, peer)
    await therapist_client.admit(peer)
    await wait_screen(page, "call")
    await therapist_client.wait_connected(peer, timeout=30)
    await therapist_client.expect(Peers, where=lambda m: any(p.peer == peer for p in m.peers))
    await therapist_client.remove(peer)
    await expect_notice(page, "removed")
    await expect(page.locator("#notice-title")).to_have_text("You are no longer in the session")
    assert await page.evaluate("sessionStorage.length") == 0
    await look(page, axe_source, "client-removed")
    await watch.assert_clean()


async def test_seat_opened_in_another_window(
    session_links: SessionLinks, new_context: NewContext, watch: Watch, axe_source: str
) -> None:
    """A second window with the same link does not take the seat from the first: it says the link
    is open elsewhere and that the therapist will be asked; the first window carries on."""
    first = await open_client(new_context, session_links)
    await expect(first.get_by_test_id("other-device-note")).to_be_hidden()
    second = await open_client(new_context, session_links)
    await expect(second.get_by_test_id("other-device-note")).to_be_visible()
    await expect(second.get_by_test_id("other-device-note")).to_contain_text("already open somewhere else")
    await look(second, axe_source, "client-opened-elsewhere")
    await first.click("#welcome-start")
    await wait_screen(first, "checklist")  # the first window still holds its seat
    await watch.assert_clean()


async def test_link_without_its_key(
    session_links: SessionLinks, new_context: NewContext, watch: Watch, axe_source: str
) -> None:
    page = await (await new_context()).new_page()
    await page.goto(session_links.client.split("#", 1)[0])
    await expect_notice(page, "missing_key")
    await expect(page.locator("#notice-title")).to_have_text("This link is incomplete")
    await look(page, axe_source, "client-link-incomplete")
    await watch.assert_clean()


async def test_bad_link_at_http_level(
    broker: RunningBroker, new_context: NewContext, watch: Watch, axe_source: str
) -> None:
    page = await (await new_context()).new_page()
    response = await page.goto(f"{broker.url}/j/not-a-real-token")
    assert response is not None and response.status == 404
    await expect(page.locator("h1")).to_have_text("This link does not work")
    await look(page, axe_source, "link-invalid-http")
    response = await page.goto(f"{broker.url}/j/")  # a link cut short: the same layout, never a bare 404
    assert response is not None and response.status == 404
    await expect(page.locator("h1")).to_have_text("Page not found")
    await look(page, axe_source, "page-not-found")
    await watch.assert_clean()


async def test_session_lost_with_an_emptied_redis(
    tmp_path: Path, new_context: NewContext, watch: Watch, axe_source: str
) -> None:
    """The page is open when the session Redis comes back empty: it says plainly that the session
    could not be found and to contact the therapist, and never that someone replaced the link."""
    redis = RedisServer(free_port(), tmp_path / "redis")
    redis.workdir.mkdir()
    redis.start()
    running = await start_broker(tmp_path / "data", redis_url=redis.url)
    try:
        links = await schedule(running, clients=1)
        watch.secrets.append(links.link_key)
        page = await open_client(new_context, links)
        redis.restart()  # no persistence: it comes back empty
        marker = running.broker.marker
        assert marker is not None
        for _ in range(100):
            if marker.emptied_at is not None:
                break
            await asyncio.sleep(0.1)
        await drop_connections(running, links.peers[links.client])
        await expect_notice(page, "session_not_found")
        await expect(page.locator("#notice-title")).to_have_text("This session could not be found")
        await expect(page.locator("#notice-message")).to_contain_text("Nothing you did caused this")
        await expect(page.locator("#notice-message")).not_to_contain_text("replaced")
        await look(page, axe_source, "client-session-lost")
        await watch.assert_clean()
    finally:
        await running.stop()
        redis.stop()
