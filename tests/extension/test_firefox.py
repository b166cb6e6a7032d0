"""The extension in Firefox ESR (installed through WebDriver BiDi's ``webExtension.install``):
every response a pinned origin's page loads is held back until it matches the signed manifest.

A broker serving the practice's release unaltered: the page is marked verified. A broker whose
host was broken into (one module altered, every page re-pinned to fit it, so the browser's own
integrity checks pass): the altered module never runs and the tab shows the extension's warning
page; the same broker at an origin the extension does not pin runs it (the control). One byte of a
module changed on a running broker, the page itself unaltered: the module is refused by its body.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import pytest_asyncio

from tests.browser.firefox_bidi import Firefox, FirefoxPage
from tests.conftest import RunningBroker, schedule, start_broker
from tests.extension.kit import (
    ALTERED_MARK,
    LATER_MODULE,
    Practice,
    altered_and_repinned,
    flip_in_place,
    pinned_extension,
    signed_practice,
)

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="session")]

VERIFIED = "() => document.readyState === 'complete' && (document.documentElement.dataset.verifiedBuild ?? null)"
WARNING = """() => location.protocol === 'moz-extension:' && location.pathname.endsWith('/pages/warning.html')
  && document.querySelector('main')?.dataset.code"""


@dataclass
class Setup:
    practice: Practice
    clean: RunningBroker
    altered: RunningBroker
    unpinned_altered: RunningBroker
    firefox: Firefox


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def setup(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Setup]:
    tmp = tmp_path_factory.mktemp("extension-firefox")
    practice = signed_practice(tmp)
    altered_root = altered_and_repinned(practice, tmp)
    clean = await start_broker(tmp / "clean", web_root=str(practice.root))
    altered = await start_broker(tmp / "altered", web_root=str(altered_root))
    unpinned = await start_broker(tmp / "unpinned", web_root=str(altered_root))
    firefox = await Firefox.launch(network_events=False)
    try:
        await firefox.install_extension(pinned_extension(tmp, [clean.url, altered.url], practice.public_key))
        yield Setup(practice, clean, altered, unpinned, firefox)
    finally:
        await firefox.close()
        for running in (clean, altered, unpinned):
            await running.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def tab(setup: Setup) -> AsyncIterator[FirefoxPage]:
    page = await setup.firefox.new_page()
    yield page
    await page.close()


async def goto(page: FirefoxPage, url: str) -> None:
    """Navigate; a navigation the extension replaced by its warning page reports an abort."""
    try:
        await page.goto(url)
    except Exception as exc:  # noqa: BLE001 - BidiError (NS_BINDING_ABORTED) or the wait's timeout
        if "ABORT" not in str(exc):
            raise


async def open_verified(page: FirefoxPage, url: str) -> str:
    """The page, once the extension marked it verified (its content scripts are registered a
    moment after the browser starts: the first load may go unmarked, so it is loaded again)."""
    for _ in range(5):
        await goto(page, url)
        try:
            return str(await page.wait_for(VERIFIED, timeout=3))
        except AssertionError:
            continue
    raise AssertionError(f"{url} was never marked verified")


async def test_firefox_marks_the_unaltered_release_verified(setup: Setup, tab: FirefoxPage) -> None:
    links = await schedule(setup.clean)
    assert await open_verified(tab, links.clients[0]) == "0.1.0"
    await tab.wait_for("() => document.body.dataset.screen === 'welcome'")
    assert ALTERED_MARK not in tab.console


async def test_firefox_an_altered_module_never_runs_and_the_warning_shows(setup: Setup, tab: FirefoxPage) -> None:
    links = await schedule(setup.clean)
    await open_verified(tab, links.clients[0])  # the extension is ready
    control = await setup.firefox.new_page()
    try:
        await goto(control, (await schedule(setup.unpinned_altered)).clients[0])
        await control.wait_for("() => document.readyState === 'complete'")
        deadline = time.monotonic() + 10
        while ALTERED_MARK not in control.console and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert ALTERED_MARK in control.console, "the control: unpinned, the altered module runs"
    finally:
        await control.close()
    await goto(tab, (await schedule(setup.altered)).clients[0])
    code = await tab.wait_for(WARNING)
    assert code == "header", code  # the CSP pins the import map, which the attacker had to change
    text = await tab.text_of("main")
    assert "This page was stopped" in text and setup.altered.url in text
    assert ALTERED_MARK not in tab.console, "the altered module ran"


async def test_firefox_a_module_changed_on_the_running_broker_is_refused_by_its_bytes(
    setup: Setup, tab: FirefoxPage
) -> None:
    links = await schedule(setup.clean)
    await open_verified(tab, links.clients[0])
    module = setup.practice.root / "js" / LATER_MODULE
    original = flip_in_place(module)
    try:
        await tab.evaluate("(m) => { import(m).catch(() => {}); }", f"/static/js/{LATER_MODULE}")
        code = await tab.wait_for(WARNING)
    finally:
        module.write_bytes(original)
    assert code == "body", code
    assert LATER_MODULE in await tab.text_of("#detail")


async def test_firefox_the_pages_the_client_page_sends_to_are_verified(setup: Setup, tab: FirefoxPage) -> None:
    """The join page's address after a reload (/j) and the quick exit's page (/today) are in the
    manifest: a client with the extension is not stopped by reloading or leaving quickly."""
    for path in ("/j", "/today"):
        assert await open_verified(tab, setup.clean.url + path) == "0.1.0", path
