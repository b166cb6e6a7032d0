"""The therapist's link key: kept in IndexedDB so /t/<token> reopens without the fragment;
without any key the therapist continues unverified and both sides say so."""

from __future__ import annotations

import pytest
from playwright.async_api import expect

from tests.browser.conftest import NewContext
from tests.browser.kit import (
    BOOT_RETRIED,
    Watch,
    code_with,
    frames_decoded,
    look,
    pass_checklist,
    refuse_module,
    wait_screen,
)
from tests.conftest import RunningBroker, schedule

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="session")]


async def test_therapist_reopens_the_session_without_the_fragment(
    broker: RunningBroker, new_context: NewContext, watch: Watch
) -> None:
    links = await schedule(broker, clients=1)
    watch.secrets.append(links.link_key)
    therapist_context = await new_context()
    first = await therapist_context.new_page()
    await first.goto(links.therapist)
    await wait_screen(first, "dashboard")
    await expect(first.get_by_test_id("verify-state")).to_have_attribute("data-verified", "yes")
    await first.close()

    again = await therapist_context.new_page()
    await again.goto(links.therapist.split("#", 1)[0])
    await wait_screen(again, "dashboard")
    await expect(again.get_by_test_id("verify-state")).to_have_attribute("data-verified", "yes")

    # The kept key really is the link key: it opens the client's sealed emergency details.
    client = await (await new_context()).new_page()
    await client.goto(links.client)
    await pass_checklist(client, location="Flat 2, River Street")
    seat = again.get_by_test_id("seat")
    await seat.locator("details.emergency summary").click()
    await expect(seat.get_by_test_id("emergency-details")).to_contain_text("Flat 2, River Street")
    await watch.assert_clean()


async def test_a_therapist_page_whose_modules_did_not_arrive_tries_again_with_its_key_then_says_reload(
    broker: RunningBroker, new_context: NewContext, watch: Watch
) -> None:
    """A module lost on the way (here: ui.js refused once) leaves therapist.js unrun; the boot guard
    reloads the page once, the link key still in the address (therapist.js takes it out only when
    it runs), and it opens verified in a browser that kept no key. Lost every time, the page says
    to reload, the link still whole in the address, and leaves no flag behind."""
    links = await schedule(broker, clients=1)
    watch.secrets.append(links.link_key)

    once = await (await new_context()).new_page()
    refused = await refuse_module(once, "ui.js", times=1)
    await once.goto(links.therapist)
    await wait_screen(once, "dashboard")  # not "nokey": the reload still had the fragment
    await expect(once.get_by_test_id("verify-state")).to_have_attribute("data-verified", "yes")
    assert refused and "#" not in once.url
    assert await once.evaluate(BOOT_RETRIED) is None

    always = await (await new_context()).new_page()
    refused = await refuse_module(always, "ui.js")
    await always.goto(links.therapist)
    await expect(always.locator("#boot-failed")).to_be_visible()
    await expect(always.locator("body")).to_have_attribute("data-screen", "loading")
    assert len(refused) == 2, "tried twice: the first load and one reload"
    assert always.url == links.therapist, "the same link still works: a reload opens it"
    assert await always.evaluate(BOOT_RETRIED) is None  # nothing left behind
    watch.console_errors.clear()  # the refused module's own load errors, on purpose
    watch.page_errors.clear()
    await watch.assert_clean()


async def test_without_any_key_the_therapist_continues_unverified(
    broker: RunningBroker, new_context: NewContext, watch: Watch, axe_source: str
) -> None:
    links = await schedule(broker, clients=1)
    watch.secrets.append(links.link_key)
    client_peer, therapist_peer = links.peers[links.client], links.peers[links.therapist]

    therapist = await (await new_context()).new_page()
    await therapist.goto(links.therapist.split("#", 1)[0])
    await wait_screen(therapist, "nokey")
    await look(therapist, axe_source, "therapist-no-link-key")
    await therapist.click("#nokey-continue")
    await wait_screen(therapist, "dashboard")
    await expect(therapist.get_by_test_id("verify-state")).to_have_attribute("data-verified", "no")
    await expect(therapist.get_by_test_id("verify-state")).to_contain_text("not verified by link", ignore_case=True)
    await expect(therapist.get_by_test_id("unverified-banner")).to_be_visible()

    client = await (await new_context()).new_page()
    await client.goto(links.client)
    await pass_checklist(client)
    seat = therapist.get_by_test_id("seat")
    await seat.locator("details.emergency summary").click()
    await expect(seat.locator("details.emergency")).to_contain_text("Sealed with the link key")
    await seat.get_by_test_id("admit").click()

    # The client's page holds the key and sees an offer without MAC: it asks first.
    await wait_screen(client, "unverified")
    await look(client, axe_source, "client-compare-safety-code")
    await client.click("#unverified-continue")
    await wait_screen(client, "call")
    await expect(client.get_by_test_id("unverified-banner")).to_be_visible()
    await frames_decoded(client, 1)
    await frames_decoded(therapist, 1)
    assert await code_with(client, therapist_peer) == await code_with(therapist, client_peer)
    await expect(client.locator(f'[data-testid=tile][data-peer="{therapist_peer}"]')).to_have_attribute(
        "data-trust", "unverified"
    )
    therapist_tile = therapist.locator(f'[data-testid=tile][data-peer="{client_peer}"]')
    await expect(therapist_tile).to_have_attribute("data-trust", "unverified")
    await expect(therapist_tile.get_by_test_id("trust")).to_have_text("Not verified by link — compare the safety codes")
    await look(client, axe_source, "client-call-unverified")
    await look(therapist, axe_source, "therapist-call-unverified")
    await watch.assert_clean()
