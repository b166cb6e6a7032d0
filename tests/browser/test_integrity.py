"""In the browser, no script runs unless its bytes match the digest the page pins (SRI, the import
map, and ``Integrity-Policy`` for a script that carries none), and no string becomes HTML or script
through a DOM sink (Trusted Types): in Chromium, and in Firefox ESR.

The broker serves a copy of web/ with a few probe pages added: one loads a module with its right
digest (it runs: the control), the others load it with none, with a wrong one, or as a classic
script without one (none of them may run). A module altered on the broker's disk while it runs,
as on a host broken into, never runs either: the join, therapist and login pages say to reload.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from playwright.async_api import Page, expect

from broker.webmanifest.integrity import sri
from broker.webmanifest.release import build_release
from tests.browser.conftest import NewContext
from tests.browser.firefox_bidi import FirefoxPage
from tests.browser.kit import wait_screen
from tests.conftest import RunningBroker, schedule, start_broker
from tests.webmanifest.web_copies import copy_web

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="session")]

PROBE = b'document.documentElement.dataset.probe = "ran";\n'
ALTERED_MARK = b'document.documentElement.dataset.altered = "ran";\n'
PAGE = '<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>probe</title>\n{}\n</head><body></body></html>\n'
PROBE_PAGES = {
    "probe-pinned.html": f'<script type="module" src="/static/js/probe.js" integrity="{sri(PROBE)}"></script>',
    "probe-unpinned.html": '<script type="module" src="/static/js/probe.js"></script>',
    "probe-mismatch.html": f'<script type="module" src="/static/js/probe.js" integrity="{sri(PROBE + b" ")}"></script>',
    "probe-classic.html": '<script src="/static/js/probe.js"></script>',
}
BLOCKED = [name for name in PROBE_PAGES if name != "probe-pinned.html"]

#: Each DOM sink that turns a string into markup or script, tried in the page: each must throw.
SINKS = """() => {
  const tries = {
    innerHTML: () => { document.body.innerHTML = '<img src=x id=injected>'; },
    outerHTML: () => { document.querySelector('main').outerHTML = '<main id=injected></main>'; },
    insertAdjacentHTML: () => document.body.insertAdjacentHTML('beforeend', '<b id=injected></b>'),
    documentWrite: () => document.write('<b id=injected></b>'),
    createContextualFragment: () => document.body.append(document.createRange().createContextualFragment('<b id=injected></b>')),
    scriptText: () => { const s = document.createElement('script'); s.textContent = 'window.injected = 1'; document.body.append(s); },
    scriptSrc: () => { const s = document.createElement('script'); s.src = '/static/js/ui.js'; },
    eventHandlerAttribute: () => document.body.setAttribute('onclick', 'window.injected = 1'),
    iframeSrcdoc: () => { const f = document.createElement('iframe'); f.srcdoc = '<b>x</b>'; },
    policy: () => trustedTypes.createPolicy('escape', { createHTML: (s) => s }),
  };
  const outcome = {};
  for (const [name, attempt] of Object.entries(tries)) {
    try { attempt(); outcome[name] = 'allowed'; } catch (e) { outcome[name] = e.name; }
  }
  outcome.injected = !!document.getElementById('injected') || 'injected' in window;
  return outcome;
}"""
ALL_REFUSED = {
    "innerHTML": "TypeError",
    "outerHTML": "TypeError",
    "insertAdjacentHTML": "TypeError",
    "documentWrite": "TypeError",
    "createContextualFragment": "TypeError",
    "scriptText": "TypeError",
    "scriptSrc": "TypeError",
    "eventHandlerAttribute": "TypeError",
    "iframeSrcdoc": "TypeError",
    "policy": "TypeError",
    "injected": False,
}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def probed(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[RunningBroker, Path]]:
    """A broker serving a copy of web/ with the probe pages: (broker, its web root)."""
    tmp = tmp_path_factory.mktemp("integrity")
    root = copy_web(tmp)
    (root / "js" / "probe.js").write_bytes(PROBE)
    build_release(root)  # a new module: the pages' import map lists it (as `broker web-manifest build` does)
    for name, script in PROBE_PAGES.items():
        (root / name).write_text(PAGE.format(script), encoding="utf-8")
    running = await start_broker(tmp / "data", web_root=str(root))
    yield running, root
    await running.stop()


async def probe_of(page: Page) -> str | None:
    await page.wait_for_load_state("load")  # module scripts have run, or failed, by then
    return await page.evaluate("document.documentElement.dataset.probe ?? null")  # type: ignore[no-any-return]


async def test_a_script_without_a_matching_integrity_hash_never_runs(
    probed: tuple[RunningBroker, Path], new_context: NewContext
) -> None:
    running, _ = probed
    page = await (await new_context()).new_page()
    await page.goto(f"{running.url}/static/probe-pinned.html")
    assert await probe_of(page) == "ran", "the control: the same module, pinned, runs"
    for name in BLOCKED:
        page = await (await new_context()).new_page()
        await page.goto(f"{running.url}/static/{name}")
        assert await probe_of(page) is None, f"{name}: the module ran"


async def test_a_module_altered_on_the_running_broker_never_runs(
    probed: tuple[RunningBroker, Path], new_context: NewContext
) -> None:
    running, root = probed
    links = await schedule(running)
    page = await (await new_context()).new_page()
    await page.goto(links.clients[0])
    await wait_screen(page, "welcome")
    module = root / "js" / "i18n.js"  # imported by every page's main module
    original = module.read_bytes()
    module.write_bytes(ALTERED_MARK + original)
    try:
        # The client's page, the therapist's and the login page: the boot guard (a classic script,
        # pinned too) reloads once, then says to reload.
        for address, screen in (
            (links.clients[0], "loading"),
            (links.therapist, "loading"),
            (f"{running.url}/login", None),
        ):
            page = await (await new_context()).new_page()
            await page.goto(address)
            await expect(page.locator("#boot-failed")).to_be_visible()
            assert await page.evaluate("document.documentElement.dataset.altered ?? null") is None, address
            assert await page.evaluate("document.documentElement.dataset.started ?? null") is None, address
            assert await page.evaluate("document.body.dataset.screen ?? null") == screen, "no module of the page ran"
    finally:
        module.write_bytes(original)


async def test_injecting_html_through_a_sink_is_blocked_by_trusted_types(
    broker: RunningBroker, new_context: NewContext
) -> None:
    links = await schedule(broker)
    page = await (await new_context()).new_page()
    await page.goto(links.clients[0])
    await wait_screen(page, "welcome")
    assert await page.evaluate(SINKS) == ALL_REFUSED
    violations = await page.evaluate("window.__cspViolations")
    assert any(v.startswith("require-trusted-types-for") for v in violations), violations
    await wait_screen(page, "welcome")  # the page itself is untouched


async def test_firefox_runs_only_pinned_scripts_and_refuses_sinks(
    probed: tuple[RunningBroker, Path],
    firefox_page: FirefoxPage,  # noqa: F811
) -> None:
    running, _ = probed
    probe = "() => document.readyState === 'complete' && (document.documentElement.dataset.probe ?? 'none')"
    await firefox_page.goto(f"{running.url}/static/probe-pinned.html")
    assert await firefox_page.wait_for(probe) == "ran"
    for name in BLOCKED:
        await firefox_page.goto(f"{running.url}/static/{name}")
        assert await firefox_page.wait_for(probe) == "none", f"{name}: the module ran in Firefox"
    links = await schedule(running)
    await firefox_page.goto(links.clients[0])
    await firefox_page.wait_for("() => document.body.dataset.screen === 'welcome'")
    assert await firefox_page.evaluate(SINKS) == ALL_REFUSED
