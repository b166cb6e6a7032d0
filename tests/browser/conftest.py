"""Browser fixtures: one Debian Chromium per test session (fake camera and microphone),
a new context per person, and a watch on every page they open; one Firefox ESR per test
session (over WebDriver BiDi), a tab in a fresh user context per test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import pytest_asyncio
from playwright.async_api import Browser, BrowserContext, Playwright, async_playwright

from tests.browser.firefox_bidi import Firefox, FirefoxPage
from tests.browser.kit import CHROMIUM_ARGS, CSP_WATCH, DESKTOP, Watch, fetch_axe

NewContext = Callable[..., Awaitable[BrowserContext]]


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def playwright() -> AsyncIterator[Playwright]:
    async with async_playwright() as p:
        yield p


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def chromium(playwright: Playwright) -> AsyncIterator[Browser]:
    browser = await playwright.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS)
    yield browser
    await browser.close()


@pytest.fixture(scope="session")
def axe_source() -> str:
    return fetch_axe()


@pytest_asyncio.fixture(loop_scope="session")
async def watch() -> Watch:
    return Watch()


@pytest_asyncio.fixture(loop_scope="session")
async def new_context(chromium: Browser, watch: Watch) -> AsyncIterator[NewContext]:
    """Contexts for one test (a person each); every page they open is watched."""
    made: list[BrowserContext] = []

    async def make(**options: Any) -> BrowserContext:
        context = await chromium.new_context(**{"viewport": DESKTOP, **options})
        await context.add_init_script(CSP_WATCH)
        context.on("page", watch.attach)
        made.append(context)
        return context

    yield make
    for context in made:
        await context.close()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def firefox() -> AsyncIterator[Firefox]:
    """One Firefox for the whole test session; a missing firefox-esr fails here (scripts/test installs it)."""
    browser = await Firefox.launch()
    yield browser
    await browser.close()


@pytest_asyncio.fixture(loop_scope="session")
async def firefox_page(firefox: Firefox) -> AsyncIterator[FirefoxPage]:
    """A tab in a fresh user context, with the CSP watch running before any page script."""
    page = await firefox.new_page(CSP_WATCH)
    await page.set_viewport(DESKTOP["width"], DESKTOP["height"])
    yield page
    await page.close()
