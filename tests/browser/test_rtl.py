"""Right to left ready (issue 33): with a pseudo-RTL catalogue (tests/i18n/pseudo.py: longer
texts, written right to left) the client's pages mirror, and on a phone nothing overlaps and
nothing runs off the side. The catalogue is added to a copy of web/, whose release is rebuilt, as
a practice adding a language would."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from playwright.async_api import Page, expect

from broker.webmanifest.release import build_release
from tests.browser.conftest import NewContext
from tests.browser.kit import PHONE, Watch, check_axe, fill_details, tick_all, wait_device_checks, wait_screen
from tests.conftest import RunningBroker, schedule, start_broker
from tests.i18n.pseudo import PSEUDO_RTL, pseudo_rtl
from tests.webmanifest.web_copies import copy_web

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="session")]

#: Every visible piece of text (each line box of each text node) and every control, with the
#: pairs that overlap by more than a pixel each way, and whether the page is wider than the screen.
LAYOUT = """
() => {
  const visible = (el) => {
    if (el.closest('.visually-hidden, [hidden], dialog:not([open])')) return false;
    const details = el.closest('details:not([open])');
    if (details && !el.closest('summary')) return false;
    const style = getComputedStyle(el);
    return style.visibility !== 'hidden' && style.display !== 'none';
  };
  const pieces = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    if (!node.textContent.trim() || !visible(node.parentElement)) continue;
    if (node.parentElement.closest('script, style, noscript, option')) continue;
    const range = document.createRange();
    range.selectNodeContents(node);
    const rects = [...range.getClientRects()].filter((r) => r.width > 0 && r.height > 0);
    if (rects.length) pieces.push({ el: node.parentElement, what: node.textContent.trim().slice(0, 30), rects });
  }
  for (const el of document.querySelectorAll('button, input, select, textarea, meter, progress, video, a.quick-exit')) {
    if (!visible(el)) continue;
    const r = el.getBoundingClientRect();
    if (r.width > 0 && r.height > 0) pieces.push({ el, what: `<${el.tagName.toLowerCase()}#${el.id}>`, rects: [r], box: true });
  }
  const overlaps = [];
  for (let i = 0; i < pieces.length; i++) {
    for (let j = i + 1; j < pieces.length; j++) {
      const a = pieces[i], b = pieces[j];
      if ((a.box && a.el.contains(b.el)) || (b.box && b.el.contains(a.el))) continue;
      for (const ra of a.rects) for (const rb of b.rects) {
        const w = Math.min(ra.right, rb.right) - Math.max(ra.left, rb.left);
        const h = Math.min(ra.bottom, rb.bottom) - Math.max(ra.top, rb.top);
        if (w > 1 && h > 1) overlaps.push(`${a.what} / ${b.what}`);
      }
    }
  }
  return { overlaps: [...new Set(overlaps)], wider: document.documentElement.scrollWidth > innerWidth + 1 };
}
"""


@pytest_asyncio.fixture(loop_scope="session")
async def rtl_broker(tmp_path: Path) -> AsyncIterator[RunningBroker]:
    root = copy_web(tmp_path)
    english = json.loads((root / "i18n" / "en.json").read_text(encoding="utf-8"))
    (root / "i18n" / f"{PSEUDO_RTL}.json").write_text(
        json.dumps(pseudo_rtl(english), ensure_ascii=False, indent=1), encoding="utf-8"
    )
    build_release(root)
    running = await start_broker(tmp_path / "data", web_root=str(root), languages=("en", "es", PSEUDO_RTL))
    yield running
    await running.stop()


async def nothing_overlaps(page: Page, where: str) -> None:
    await page.evaluate("window.scrollTo(0, 0)")
    layout = await page.evaluate(LAYOUT)
    assert layout["overlaps"] == [], f"{where}: overlapping texts or controls"
    assert not layout["wider"], f"{where}: the page is wider than the phone"


async def box(page: Page, selector: str) -> dict[str, float]:
    found = await page.locator(selector).first.bounding_box()
    assert found is not None, selector
    return found


async def test_pseudo_rtl_pages_mirror_and_nothing_overlaps(
    rtl_broker: RunningBroker, new_context: NewContext, watch: Watch, axe_source: str
) -> None:
    links = await schedule(rtl_broker, clients=1)
    watch.secrets.append(links.link_key)
    context = await new_context(viewport=PHONE, is_mobile=True, has_touch=True, locale="en-US")
    page = await context.new_page()
    await page.goto(links.client.replace("#", f"?lang={PSEUDO_RTL}#", 1))
    await wait_screen(page, "welcome")
    await expect(page.locator("html")).to_have_attribute("dir", "rtl")
    await expect(page.locator("#welcome-title")).to_have_text("Wélçómé~~")
    # Mirrored: the quick exit at the line's end (the left), the practice's name at its start (the right).
    width = PHONE["width"]
    quick_exit, brand = await box(page, "#quick-exit"), await box(page, "#practice-name")
    assert quick_exit["x"] + quick_exit["width"] < width / 2 < brand["x"] + brand["width"]
    await nothing_overlaps(page, "welcome")
    await page.click("#welcome-start")
    await wait_device_checks(page)
    await page.locator("#device-details summary").click()
    await nothing_overlaps(page, "checklist, device")
    # Each check's mark sits at the start of its line (the right), its words after it.
    mark, words = await box(page, "[data-testid=item-camera] .mark"), await box(page, "[data-testid=item-camera] .text")
    assert mark["x"] > words["x"]
    await check_axe(page, axe_source, "rtl-device")
    await page.click("#step-next")
    await page.locator("#safety-plan summary").click()
    await nothing_overlaps(page, "checklist, space")
    await tick_all(page, "space")
    await page.click("#step-next")
    await tick_all(page, "consent")
    await fill_details(page, "Home", "Sam, 0123")
    await nothing_overlaps(page, "checklist, consent")
    await page.click("#checklist-submit")
    await wait_screen(page, "waiting")
    await nothing_overlaps(page, "waiting room")
    await watch.assert_clean()
