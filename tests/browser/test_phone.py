"""The client's checklist on a phone (390x844): at most three steps, the device checks in one line
with the details a tap away, progress counted in steps, and the consent text part of the page
(no box of its own that scrolls)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from playwright.async_api import Page, expect

from tests.browser.conftest import NewContext
from tests.browser.kit import (
    PHONE,
    Watch,
    check_axe,
    fill_details,
    start_checklist,
    tick_all,
    wait_device_checks,
    wait_screen,
)
from tests.conftest import RunningBroker, schedule

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="session")]

#: Where the phone screenshots go for the issue note (set PHONE_SCREENS to a folder), else nowhere.
SCREENS = os.environ.get("PHONE_SCREENS")

#: Elements from <body> down to the consent text (itself included) that clip their content and
#: scroll it on their own: a box inside the page that has to be scrolled separately.
NESTED_SCROLLERS = """
() => {
  const found = [];
  for (let node = document.getElementById('consent-text'); node && node !== document.body; node = node.parentElement) {
    const style = getComputedStyle(node);
    const scrolls = ['auto', 'scroll'].includes(style.overflowY) || ['auto', 'scroll'].includes(style.overflowX);
    const clips = node.scrollHeight > node.clientHeight + 1 || node.scrollWidth > node.clientWidth + 1;
    if (scrolls && clips) found.push(node.id || node.className || node.tagName);
  }
  return found;
}
"""


async def snap(page: Page, name: str) -> None:
    if SCREENS:
        Path(SCREENS).mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(Path(SCREENS) / f"{name}.png"), full_page=True)


async def test_phone_checklist_in_three_steps(
    broker: RunningBroker, new_context: NewContext, watch: Watch, axe_source: str
) -> None:
    links = await schedule(broker, clients=1)
    watch.secrets.append(links.link_key)
    context = await new_context(viewport=PHONE, is_mobile=True, has_touch=True)
    page = await context.new_page()
    await page.goto(links.client)
    await start_checklist(page)
    progress = page.get_by_test_id("checklist-progress")
    await expect(progress).to_have_text("Step 1 of 3: Your device")
    await expect(page.locator("#stepper li")).to_have_count(3)
    await expect(page.locator("#checklist-progress")).to_have_attribute("max", "3")

    # Step 1: the automatic checks are one line; each check is behind the disclosure.
    await wait_device_checks(page)
    summary = page.get_by_test_id("device-summary")
    await expect(summary).to_have_text("Camera, microphone and connection are ready")
    await expect(summary).to_have_attribute("data-status", "ok")
    await expect(page.get_by_test_id("item-camera")).to_be_hidden()
    await check_axe(page, axe_source, "phone-step-1")
    await snap(page, "phone-step-1-device")
    await page.locator("#device-details summary").click()
    await expect(page.get_by_test_id("item-camera")).to_be_visible()
    await expect(page.get_by_test_id("item-preflight")).to_be_visible()
    await check_axe(page, axe_source, "phone-step-1-details")
    await snap(page, "phone-step-1-details")
    await page.click("#step-next")

    # Step 2: the points the client confirms.
    await expect(progress).to_have_text("Step 2 of 3: Your space")
    await tick_all(page, "space")
    await check_axe(page, axe_source, "phone-step-2")
    await snap(page, "phone-step-2-space")
    await page.click("#step-next")

    # Step 3: the consent text in the page itself, its acceptance and the emergency details.
    await expect(progress).to_have_text("Step 3 of 3: Consent and emergency details")
    consent = page.get_by_test_id("consent-text")
    await expect(consent).to_be_visible()
    await expect(page.locator("#details-location")).to_be_visible()
    assert await page.evaluate(NESTED_SCROLLERS) == []
    assert await consent.get_attribute("tabindex") is None  # nothing of its own to scroll with the keyboard
    # The submit button stays out of reach until everything needed is done.
    await page.click("#checklist-submit")
    await expect(page.get_by_test_id("checklist-error")).to_contain_text("confirm")
    await tick_all(page, "consent")
    await page.click("#checklist-submit")
    await expect(page.get_by_test_id("checklist-error")).to_contain_text("fill in both fields")
    await fill_details(page, "Home, 4 Elm Road", "Sam, 0123 456")
    await check_axe(page, axe_source, "phone-step-3")
    await snap(page, "phone-step-3-consent")
    await page.click("#checklist-submit")
    await wait_screen(page, "waiting")
    await watch.assert_clean()


async def test_failed_device_check_opens_the_details(
    broker: RunningBroker, new_context: NewContext, watch: Watch, axe_source: str
) -> None:
    """A needed check that failed is never hidden behind the disclosure: the line says so and the details open."""
    links = await schedule(broker, clients=1)
    watch.secrets.append(links.link_key)
    context = await new_context(viewport=PHONE, is_mobile=True, has_touch=True)
    await context.add_init_script(
        "if (navigator.mediaDevices) navigator.mediaDevices.getUserMedia ="
        " () => Promise.reject(new DOMException('no', 'NotAllowedError'));"
    )
    page = await context.new_page()
    await page.goto(links.client)
    await start_checklist(page)
    summary = page.get_by_test_id("device-summary")
    await expect(summary).to_have_attribute("data-status", "fail")
    await expect(summary).to_contain_text("your attention")
    await expect(page.get_by_test_id("device-details")).to_have_attribute("open", "")
    await expect(page.get_by_test_id("item-camera")).to_be_visible()
    await expect(page.get_by_test_id("item-preflight")).to_have_attribute("data-status", "ok")
    await page.click("#step-next")
    await expect(page.get_by_test_id("checklist-error")).to_contain_text("did not work")
    await expect(page.get_by_test_id("checklist-progress")).to_have_text("Step 1 of 3: Your device")
    await check_axe(page, axe_source, "phone-device-failed")
    await watch.assert_clean()
