"""A client's link opened in a second browser while the client is in the call (issue 25, finding 1).

The second browser sees the checklist, the therapist sees "opened on another device", and the
client stays in the call, decoding video, until the therapist decides: turned away, the second
browser gets the declined notice; let in (after the therapist confirms), the seat moves to it, the
first browser shows that the session moved, and the call goes on with the new one.
"""

from __future__ import annotations

import pytest
from playwright.async_api import expect

from tests.browser.conftest import NewContext
from tests.browser.kit import Watch, code_with, frames_decoded, look, pass_checklist, start_checklist, wait_screen
from tests.conftest import RunningBroker, schedule

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="session")]


async def test_a_second_browser_with_the_link_waits_for_the_therapist(
    broker: RunningBroker, new_context: NewContext, watch: Watch, axe_source: str
) -> None:
    links = await schedule(broker, clients=1)
    watch.secrets.append(links.link_key)
    client_peer, therapist_peer = links.peers[links.client], links.peers[links.therapist]

    therapist = await (await new_context()).new_page()
    await therapist.goto(links.therapist)
    await wait_screen(therapist, "dashboard")
    client = await (await new_context()).new_page()
    await client.goto(links.client)
    await pass_checklist(client)
    seat = therapist.get_by_test_id("seat")
    await seat.get_by_test_id("admit").click()
    await wait_screen(client, "call")
    await frames_decoded(client, 1)
    await frames_decoded(therapist, 1)

    # Someone else opens the same link (the whole link, key included) in another browser.
    stranger = await (await new_context()).new_page()
    await stranger.goto(links.client)
    await wait_screen(stranger, "welcome")
    await expect(stranger.get_by_test_id("other-device-note")).to_be_visible()
    await look(stranger, axe_source, "other-device-welcome")
    other = seat.get_by_test_id("other-device")
    await expect(other).to_contain_text("opened on another device")
    await expect(other).to_have_attribute("data-state", "checking")
    await look(therapist, axe_source, "therapist-other-device")
    await start_checklist(stranger)
    # The client is still in the call: the seat is theirs, nothing was replaced.
    await expect(seat).to_have_attribute("data-state", "admitted")
    assert await client.evaluate("document.body.dataset.screen") == "call"
    await frames_decoded(client, 1)

    # Turned away: the second browser gets the declined notice, the client carries on.
    await seat.get_by_test_id("decline-other-device").click()
    await wait_screen(stranger, "notice")
    await expect(stranger.get_by_test_id("notice")).to_have_attribute("data-code", "declined")
    await expect(seat.get_by_test_id("other-device-declined")).to_be_visible()
    await frames_decoded(client, 1)

    # The therapist lets another device ask; the client's phone opens the link and finishes the checklist.
    await seat.get_by_test_id("allow-other-device").click()
    await expect(seat.get_by_test_id("other-device-declined")).to_be_hidden()
    phone = await (await new_context()).new_page()
    await phone.goto(links.client)
    await pass_checklist(phone, location="Office, 2 Oak Lane", contact="Alex, 0987 654")
    await expect(other).to_have_attribute("data-state", "waiting")
    await other.locator("details.emergency summary").click()
    await expect(other.get_by_test_id("emergency-details")).to_contain_text("2 Oak Lane")
    assert await client.evaluate("document.body.dataset.screen") == "call"

    # Let in, after the therapist confirms: the seat moves to the phone, the old browser stops.
    await other.get_by_test_id("admit-other-device").click()
    await look(therapist, axe_source, "therapist-move-seat-dialog")
    await therapist.get_by_test_id("confirm-move-seat").click()
    await wait_screen(client, "notice")
    await expect(client.get_by_test_id("notice")).to_have_attribute("data-code", "replaced")
    await look(client, axe_source, "client-moved-to-another-device")
    await wait_screen(phone, "call")
    await frames_decoded(phone, 1)
    await frames_decoded(therapist, 1)
    code = await code_with(phone, therapist_peer)
    assert code == await code_with(therapist, client_peer)
    await watch.assert_clean()
