"""The landing page, and the client's whole way in with the keyboard alone (visible focus on the way)."""

from __future__ import annotations

import re

import pytest
from playwright.async_api import Page, expect

from tests.browser.conftest import NewContext
from tests.browser.kit import Watch, look, wait_device_checks, wait_screen
from tests.conftest import RunningBroker, schedule

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="session")]


async def test_landing_page(broker: RunningBroker, new_context: NewContext, watch: Watch, axe_source: str) -> None:
    page = await (await new_context()).new_page()
    await page.goto(broker.url + "/")
    await expect(page.locator("h1")).to_contain_text("Private video sessions")
    await look(page, axe_source, "index")
    await watch.assert_clean()


async def tab_to(page: Page, selector: str, limit: int = 60) -> None:
    """Press Tab until the element is focused, as a keyboard user would."""
    for _ in range(limit):
        if await page.evaluate("(s) => document.activeElement?.matches(s) ?? false", selector):
            return
        await page.keyboard.press("Tab")
    raise AssertionError(f"{selector} cannot be reached with Tab")


async def focus_is_visible(page: Page) -> bool:
    return bool(
        await page.evaluate(
            "() => { const s = getComputedStyle(document.activeElement); return s.outlineStyle !== 'none' && parseFloat(s.outlineWidth) >= 2; }"
        )
    )


async def test_keyboard_alone_from_welcome_to_call(
    broker: RunningBroker, new_context: NewContext, watch: Watch
) -> None:
    links = await schedule(broker, clients=1)
    watch.secrets.append(links.link_key)
    page = await (await new_context()).new_page()
    await page.goto(links.client)
    await wait_screen(page, "welcome")
    await tab_to(page, "#welcome-start")
    assert await focus_is_visible(page)
    await page.keyboard.press("Enter")
    await wait_screen(page, "checklist")
    await wait_device_checks(page)
    await tab_to(page, "#step-next")
    await page.keyboard.press("Enter")
    for box in await page.locator("#step-space input[type=checkbox]").all():
        await tab_to(page, f"#{await box.get_attribute('id')}")
        assert await focus_is_visible(page)
        await page.keyboard.press("Space")
        await expect(box).to_be_checked()
    await tab_to(page, "#step-next")
    await page.keyboard.press("Enter")
    await tab_to(page, "#step-consent input[type=checkbox]")
    await page.keyboard.press("Space")
    await tab_to(page, "#details-location")
    await page.keyboard.type("Home")
    await tab_to(page, "#details-contact")
    await page.keyboard.type("Alex, 555 0100")
    await tab_to(page, "#checklist-submit")
    await page.keyboard.press("Enter")
    await wait_screen(page, "waiting")

    therapist = await (await new_context()).new_page()
    await therapist.goto(links.therapist)
    await wait_screen(therapist, "dashboard")
    await tab_to(therapist, "[data-testid=admit]")
    await therapist.keyboard.press("Enter")
    await wait_screen(page, "call")
    await tab_to(page, "[data-testid=toggle-mic]")
    assert await focus_is_visible(page)
    await page.keyboard.press("Space")
    await expect(page.get_by_test_id("toggle-mic")).to_have_attribute("aria-pressed", "true")
    await tab_to(page, "[data-testid=toggle-chat]")
    await page.keyboard.press("Enter")
    await expect(page.get_by_test_id("chat-input")).to_be_focused()
    await expect(page.locator("[data-testid=tile] [data-testid=safety-code]")).to_have_text(
        re.compile(r"\d{3} \d{3} \d{3}")
    )
    await page.keyboard.type("typed with the keyboard")
    await page.keyboard.press("Enter")
    # The chat channel opens a moment after the call screen shows; until then the page keeps the
    # text and says it could not be sent, and the person presses Enter again.
    chat_input = page.get_by_test_id("chat-input")
    for _ in range(100):
        if await chat_input.input_value() == "":
            break
        await page.wait_for_timeout(100)
        await page.keyboard.press("Enter")
    await expect(chat_input).to_have_value("")
    await expect(therapist.get_by_test_id("chat-unread")).to_have_text("1")
    await tab_to(page, "[data-testid=leave]")
    await page.keyboard.press("Enter")
    await tab_to(page, "#leave-dialog button[value=confirm]")
    await page.keyboard.press("Enter")
    await wait_screen(page, "ended")
    await watch.assert_clean()
