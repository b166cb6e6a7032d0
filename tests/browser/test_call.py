"""The whole way in Chromium: a client from the invite link to a connected call with the
therapist, everything a person does in the call, a reload, and the end; and a group session."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Page, expect

from broker.signaling.record import verify_record
from broker.signaling.relay import mailbox_key
from tests.browser.conftest import NewContext
from tests.browser.kit import Watch, code_with, frames_decoded, look, pass_checklist, wait_screen
from tests.conftest import RunningBroker, schedule

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="session")]

KEPT_KEY = """async (session) => {
  const db = await new Promise((ok, fail) => {
    const r = indexedDB.open('teletherapy-therapist', 1);
    r.onupgradeneeded = () => r.result.createObjectStore('link-keys');
    r.onsuccess = () => ok(r.result); r.onerror = () => fail(r.error);
  });
  const value = await new Promise((ok) => {
    const r = db.transaction('link-keys').objectStore('link-keys').get(session);
    r.onsuccess = () => ok(r.result ?? null);
  });
  db.close();
  return value === null ? null : value.length;
}"""

BROWSER_STORAGE = """async () => ({
  session: sessionStorage.length,
  local: localStorage.length,
  databases: (await indexedDB.databases()).map((d) => d.name),
})"""


def tile(page: Page, peer: str) -> Any:
    return page.locator(f'[data-testid=tile][data-peer="{peer}"]')


async def drop_connections(broker: RunningBroker, peer: str) -> None:
    """Cut a peer's WebSocket from the broker's side, as a network change would."""
    for conn in list(broker.hub.connections.by_id.values()):
        if conn.peer_id == peer:
            await conn.transport.close(1012, "")


async def resume_buffer_empties(broker: RunningBroker, session: str, peer: str, within_s: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while kept := await broker.hub.store.read_since(mailbox_key(session, peer), 0):
        assert loop.time() < deadline, f"{len(kept)} relays still kept for a page that read them"
        await asyncio.sleep(0.2)


async def test_client_from_link_to_call_to_end(
    broker: RunningBroker, new_context: NewContext, watch: Watch, axe_source: str
) -> None:
    links = await schedule(broker, clients=1)
    watch.secrets.append(links.link_key)
    client_peer, therapist_peer = links.peers[links.client], links.peers[links.therapist]

    client = await (await new_context()).new_page()
    await client.goto(links.client)
    await wait_screen(client, "welcome")
    await expect(client.get_by_test_id("appointment-time")).not_to_be_empty()
    assert "#" not in client.url, "the link key stays out of the address bar"
    await look(client, axe_source, "client-welcome")
    await pass_checklist(client, axe=axe_source, name="client-")

    # The therapist is not here yet, then arrives.
    status = client.get_by_test_id("therapist-status")
    await expect(status).to_have_attribute("data-present", "no")
    await look(client, axe_source, "client-waiting-therapist-absent")
    therapist_context = await new_context()
    therapist = await therapist_context.new_page()
    await therapist.goto(links.therapist)
    await wait_screen(therapist, "dashboard")
    await expect(status).to_have_attribute("data-present", "yes")
    await expect(status).to_contain_text("is here")
    await look(client, axe_source, "client-waiting")

    # The therapist sees the checklist summary and opens the sealed emergency details.
    seat = therapist.get_by_test_id("seat")
    await expect(seat).to_have_attribute("data-state", "waiting")
    await expect(seat.get_by_test_id("checklist-summary")).to_contain_text("every required step")
    await seat.locator("details.emergency summary").click()
    await expect(seat.get_by_test_id("emergency-details")).to_contain_text("4 Elm Road")
    await expect(seat.get_by_test_id("emergency-details")).to_contain_text("Sam, 0123 456")
    await expect(therapist.get_by_test_id("verify-state")).to_have_attribute("data-verified", "yes")
    await look(therapist, axe_source, "therapist-waiting-room")

    # Admit: both sides decode the other's video and show the same safety code, verified by link.
    await seat.get_by_test_id("admit").click()
    await wait_screen(client, "call")
    await frames_decoded(client, 1)
    await frames_decoded(therapist, 1)
    code = await code_with(client, therapist_peer)
    assert code == await code_with(therapist, client_peer)
    await expect(tile(client, therapist_peer)).to_have_attribute("data-trust", "verified_by_link")
    await expect(tile(therapist, client_peer)).to_have_attribute("data-trust", "verified_by_link")
    await expect(seat).to_have_attribute("data-state", "admitted")
    await look(client, axe_source, "client-call")
    await look(therapist, axe_source, "therapist-call")

    # Mute and camera off show on the other side.
    await client.get_by_test_id("toggle-mic").click()
    await expect(client.get_by_test_id("toggle-mic")).to_have_attribute("aria-pressed", "true")
    await expect(tile(therapist, client_peer)).to_have_attribute("data-remote-audio", "off")
    await expect(tile(therapist, client_peer).get_by_test_id("remote-muted")).to_be_visible()
    await therapist.get_by_test_id("toggle-camera").click()
    await expect(tile(client, therapist_peer)).to_have_attribute("data-remote-video", "off")
    await client.get_by_test_id("toggle-mic").click()
    await expect(tile(therapist, client_peer).get_by_test_id("remote-muted")).to_be_hidden()
    await therapist.get_by_test_id("toggle-camera").click()
    await expect(tile(client, therapist_peer)).to_have_attribute("data-remote-video", "on")

    # Encrypted chat over the data channel, both ways, with the keyboard.
    await client.get_by_test_id("toggle-chat").click()
    await client.get_by_test_id("chat-input").fill("Hello, can you hear me?")
    await client.keyboard.press("Enter")
    await expect(therapist.get_by_test_id("chat-unread")).to_have_text("1")
    await therapist.get_by_test_id("toggle-chat").click()
    await expect(therapist.get_by_test_id("chat-log")).to_contain_text("Hello, can you hear me?")
    await therapist.get_by_test_id("chat-input").fill("Yes, clearly.")
    await therapist.keyboard.press("Enter")
    await expect(client.get_by_test_id("chat-log")).to_contain_text("Yes, clearly.")
    await look(client, axe_source, "client-chat")

    # Each page acknowledges the relays it has read (ping.ack): the broker keeps none of the set-up.
    for peer in (client_peer, therapist_peer):
        await resume_buffer_empties(broker, links.session, peer)

    # The client's connection to the broker drops: a banner while it reconnects, the call carries on.
    broker.hub.accepting = False
    try:
        await drop_connections(broker, client_peer)
        await expect(client.get_by_test_id("reconnecting-banner")).to_be_visible()
        await look(client, axe_source, "client-reconnecting")
    finally:
        broker.hub.accepting = True
    await expect(client.get_by_test_id("reconnecting-banner")).to_be_hidden()
    await expect(tile(client, therapist_peer)).to_have_attribute("data-state", "connected")

    # A reload forgets the page's resume secret: the reloaded page is "another device" for the seat.
    # It goes through the checklist again and the therapist lets it in (a new connection, a new code).
    await client.reload()
    await wait_screen(client, "welcome")
    await expect(client.get_by_test_id("other-device-note")).to_be_visible()
    await expect(seat.get_by_test_id("other-device")).to_be_visible()
    await pass_checklist(client)
    await expect(seat.get_by_test_id("other-device")).to_have_attribute("data-state", "waiting")
    await seat.get_by_test_id("admit-other-device").click()  # the old page is gone: no question asked
    await wait_screen(client, "call")
    await frames_decoded(client, 1)
    await expect(tile(therapist, client_peer)).not_to_have_attribute("data-code", code)
    new_code = await code_with(client, therapist_peer)
    assert new_code != code
    await expect(tile(therapist, client_peer)).to_have_attribute("data-code", new_code)
    await frames_decoded(therapist, 1)

    # The therapist ends the session for everyone.
    await therapist.get_by_test_id("end-session").click()
    await look(therapist, axe_source, "therapist-end-dialog")
    await therapist.get_by_test_id("confirm-end").click()
    await wait_screen(client, "ended")
    await wait_screen(therapist, "ended")
    await expect(client.locator("#ended-message")).to_contain_text("Nothing was recorded")
    assert await client.evaluate(BROWSER_STORAGE) == {"session": 0, "local": 0, "databases": []}
    assert await therapist.evaluate(KEPT_KEY, links.session) is None
    await look(client, axe_source, "client-ended")
    await look(therapist, axe_source, "therapist-ended")

    # The therapist downloads the broker-signed session record; it verifies with the published key.
    async with therapist.expect_download() as download_info:
        await therapist.get_by_test_id("record-download").click()
    saved = json.loads(Path(await (await download_info.value).path()).read_text())
    record = saved["record"]
    assert record["session"] == links.session
    assert next(s for s in record["seats"] if s["peer"] == client_peer)["verified"] == "link"
    public = (await (await therapist.request.get(broker.url + "/.well-known/broker-signing-key")).json())["keys"][0]
    assert public["kid"] == saved["key_id"] and verify_record(record, saved["signature"], public["x"])
    await watch.assert_clean()


async def test_group_session_everyone_connected(
    broker: RunningBroker, new_context: NewContext, watch: Watch, axe_source: str
) -> None:
    links = await schedule(broker, clients=2)
    watch.secrets.append(links.link_key)
    therapist_peer = links.peers[links.therapist]
    peers = [links.peers[link] for link in links.clients]

    therapist = await (await new_context()).new_page()
    await therapist.goto(links.therapist)
    await wait_screen(therapist, "dashboard")
    clients = []
    for i, link in enumerate(links.clients):
        page = await (await new_context()).new_page()
        await page.goto(link)
        await pass_checklist(page, location=f"Room {i + 1}", contact=f"Contact {i + 1}")
        clients.append(page)
    seats = therapist.get_by_test_id("seat")
    await expect(seats.locator('[data-testid="admit"]')).to_have_count(2)
    await look(therapist, axe_source, "therapist-group-waiting-room")
    for peer in peers:
        await therapist.locator(f'[data-testid=seat][data-peer="{peer}"] [data-testid=admit]').click()

    # Everyone decodes everyone else's video; each pair shows one safety code on both ends.
    await frames_decoded(therapist, 2)
    for page in clients:
        await wait_screen(page, "call")
        await frames_decoded(page, 2)
    for peer, page in zip(peers, clients, strict=True):
        assert await code_with(page, therapist_peer) == await code_with(therapist, peer)
    assert await code_with(clients[0], peers[1]) == await code_with(clients[1], peers[0])
    await look(therapist, axe_source, "therapist-group-call")
    await look(clients[0], axe_source, "client-group-call")

    # One client leaves: the others see it, the therapist's waiting room says so.
    await clients[1].get_by_test_id("leave").click()
    await clients[1].locator("#leave-dialog button[value=confirm]").click()
    await wait_screen(clients[1], "ended")
    await expect(clients[1].locator("#ended-title")).to_have_text("You left the session")
    await expect(tile(therapist, peers[1])).to_have_count(0)
    await expect(tile(clients[0], peers[1])).to_have_count(0)
    await expect(therapist.locator(f'[data-testid=seat][data-peer="{peers[1]}"]')).to_have_attribute(
        "data-state", "left"
    )
    await frames_decoded(clients[0], 1)
    await look(clients[1], axe_source, "client-left")
    await look(therapist, axe_source, "therapist-client-left")

    # The therapist's page goes away: the remaining client is told and waits.
    await therapist.close()
    await expect(tile(clients[0], therapist_peer)).to_have_attribute("data-state", "away")
    await expect(tile(clients[0], therapist_peer).get_by_test_id("peer-state")).to_contain_text("come back")
    await look(clients[0], axe_source, "client-therapist-away")
    await watch.assert_clean()


async def test_client_closes_the_tab_and_comes_back(
    broker: RunningBroker, new_context: NewContext, watch: Watch, axe_source: str
) -> None:
    """The therapist's side sees the client gone; a new tab with the link is another device for the
    seat (the closed tab's resume secret went with it): it passes the checklist and the therapist
    lets it in, back into the call."""
    links = await schedule(broker, clients=1)
    watch.secrets.append(links.link_key)
    client_peer, therapist_peer = links.peers[links.client], links.peers[links.therapist]
    client_context = await new_context()
    client = await client_context.new_page()
    await client.goto(links.client)
    await pass_checklist(client)
    therapist = await (await new_context()).new_page()
    await therapist.goto(links.therapist)
    await wait_screen(therapist, "dashboard")
    await therapist.get_by_test_id("admit").click()
    await frames_decoded(therapist, 1)

    await client.close()
    away = tile(therapist, client_peer)
    await expect(away).to_have_attribute("data-state", "away")
    await expect(away.get_by_test_id("peer-state")).to_contain_text("come back")
    await expect(therapist.locator(f'[data-testid=seat][data-peer="{client_peer}"] .badge.offline')).to_be_visible()
    await look(therapist, axe_source, "therapist-client-away")

    back = await client_context.new_page()
    await back.goto(links.client)
    await wait_screen(back, "welcome")
    await expect(back.get_by_test_id("other-device-note")).to_be_visible()
    await pass_checklist(back)
    seat = therapist.locator(f'[data-testid=seat][data-peer="{client_peer}"]')
    await seat.get_by_test_id("admit-other-device").click()  # the old tab is gone: no question asked
    await wait_screen(back, "call")
    await frames_decoded(back, 1)
    await frames_decoded(therapist, 1)
    assert await code_with(back, therapist_peer) == await code_with(therapist, client_peer)
    await watch.assert_clean()


async def test_the_call_code_loads_during_the_checklist_and_a_lost_one_says_reload(
    broker: RunningBroker, new_context: NewContext, watch: Watch, axe_source: str
) -> None:
    """The call's modules are not part of the page until the client starts the checklist (the
    page is usable sooner: P5); when they cannot arrive, the admitted client is told to reload,
    never left on a blank screen, and the reload brings it into the call."""
    links = await schedule(broker, clients=1)
    watch.secrets.append(links.link_key)
    client_peer = links.peers[links.client]
    client = await (await new_context()).new_page()
    fetched: list[str] = []
    client.on("request", lambda request: fetched.append(request.url))
    await client.route("**/static/js/call.js", lambda route: route.abort())
    await client.goto(links.client)
    await wait_screen(client, "welcome")
    assert not [u for u in fetched if u.endswith(("/js/call.js", "/js/call_tools.js", "/js/whiteboard.js"))]
    await pass_checklist(client)
    assert [u for u in fetched if u.endswith("/js/call.js")], "fetched while the checklist was open"
    therapist = await (await new_context()).new_page()
    await therapist.goto(links.therapist)
    await wait_screen(therapist, "dashboard")
    await therapist.get_by_test_id("admit").click()
    await wait_screen(client, "notice")
    await expect(client.get_by_test_id("notice")).to_have_attribute("data-code", "call_unavailable")
    await expect(client.locator("#notice-action")).to_be_visible()
    await look(client, axe_source, "client-call-unavailable")
    await client.unroute("**/static/js/call.js")
    await client.locator("#notice-action").click()  # reload: the same tab is the seat's other device
    await wait_screen(client, "welcome")
    await pass_checklist(client)
    seat = therapist.locator(f'[data-testid=seat][data-peer="{client_peer}"]')
    await seat.get_by_test_id("admit-other-device").click()
    await wait_screen(client, "call")
    await frames_decoded(client, 1)
    watch.console_errors.clear()  # the aborted module's own load error, on purpose
    watch.page_errors.clear()
    await watch.assert_clean()


async def test_a_page_whose_modules_did_not_arrive_tries_again_then_says_reload(
    broker: RunningBroker, new_context: NewContext, watch: Watch
) -> None:
    """A module lost on the way (here: ui.js refused once) leaves the page unrun; the classic
    boot guard reloads it once and it opens. Lost every time, the page says to reload rather than
    stay on "Opening your session…" with no end."""
    links = await schedule(broker, clients=1)
    watch.secrets.append(links.link_key)
    refused: list[str] = []

    async def refuse_once(route: Any) -> None:
        if not refused:
            refused.append(route.request.url)
            await route.abort()
        else:
            await route.continue_()

    once = await (await new_context()).new_page()
    await once.route("**/static/js/ui.js", refuse_once)
    await once.goto(links.client)
    await wait_screen(once, "welcome")
    assert refused and "#" not in once.url
    assert await once.evaluate("sessionStorage.getItem('tt-boot-retried')") is None

    always = await (await new_context()).new_page()
    await always.route("**/static/js/ui.js", lambda route: route.abort())
    await always.goto(links.client)
    await expect(always.locator("#boot-failed")).to_be_visible()
    await expect(always.locator("body")).to_have_attribute("data-screen", "loading")
    assert await always.evaluate("sessionStorage.getItem('tt-boot-retried')") is None  # nothing left behind
    watch.console_errors.clear()  # the refused module's own load errors, on purpose
    watch.page_errors.clear()
    await watch.assert_clean()
