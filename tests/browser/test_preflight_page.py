"""The join page when the broker's network pre-flight is busy: it says so, waits and tries again by itself
(issue 25, finding 4). A broker of its own with one pre-flight slot, held by another session's client
whose offer never completes, so the page's first offers are refused with preflight_busy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from aiortc import RTCConfiguration, RTCPeerConnection
from playwright.async_api import expect

from broker.client.broker_client import BrokerClient
from broker.signaling.protocol import PreflightAnswer
from tests.browser.conftest import NewContext
from tests.browser.kit import Watch, look, start_checklist, tick_all, wait_device_checks, wait_screen
from tests.conftest import schedule, start_broker

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="session")]


async def test_a_busy_preflight_is_explained_and_tried_again(
    tmp_path: Path, new_context: NewContext, watch: Watch, axe_source: str
) -> None:
    broker = await start_broker(tmp_path / "data", preflight_slots=1, preflight_wait_s=0.5)
    holder = BrokerClient((await schedule(broker)).client, reconnect=False)
    stalled = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        await holder.connect()
        stalled.createDataChannel("preflight")
        await stalled.setLocalDescription(await stalled.createOffer())
        await holder.send_raw(json.dumps({"type": "preflight_offer", "sdp": stalled.localDescription.sdp}))
        await holder.expect(PreflightAnswer)  # the only slot is taken until the broker's timeout

        links = await schedule(broker)
        watch.secrets.append(links.link_key)
        page = await (await new_context()).new_page()
        await page.goto(links.client)
        await start_checklist(page)
        item = page.get_by_test_id("item-preflight")
        await expect(item).to_contain_text("Many network checks are running right now")
        await expect(item).to_contain_text("Trying again in")
        await expect(item).to_have_attribute("data-status", "pending")  # not a failure: nothing to fix
        await look(page, axe_source, "client-preflight-busy")
        await wait_device_checks(page)  # the slot came free and the page's own check ran
        await page.click("#step-next")
        await tick_all(page, "space")
        await page.click("#step-next")
        await tick_all(page, "consent")
        await page.fill("#details-location", "Home")
        await page.fill("#details-contact", "Sam")
        await page.click("#checklist-submit")
        await wait_screen(page, "waiting")  # the broker recorded the page's pre-flight itself
        await watch.assert_clean()
    finally:
        await stalled.close()
        await holder.close()
        await broker.stop()
