"""Labels in the real dashboard (issue 28, item 1): typed in one browser context, readable in a
second context of the same therapist after login, still readable after the therapist changes their
password, and announced as lost after an administrator resets it. The label never appears in clear
in a request, in the broker's data directory or in its logs (a label canary).

A passkey login carries the password too (passkeys are a second factor), so PRF is not needed (docs/security.md 3.5).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from playwright.async_api import Page, expect

from tests.browser.conftest import NewContext
from tests.browser.kit import look
from tests.http.test_web_auth import PASSWORD, start_full_broker

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="session")]

SESSION_LABEL = "canary-label Sam & Alex, couple 3f9a"
SEAT_LABEL = "canary-seat Jordan 77c2"
NOTE = "canary-note prefers mornings 18be"
NEW_PASSWORD = "harbour willow steadily 8352"


async def log_in(new_context: NewContext, url: str, password: str, sent: list[str] | None = None) -> Page:
    page = await (await new_context()).new_page()
    if sent is not None:
        page.on("request", lambda r: sent.append(f"{r.method} {r.url}\n{r.headers}\n{r.post_data or ''}"))
    await page.goto(url + "/login")
    await page.get_by_label("Login name").fill("robin")
    await page.get_by_label("Password").fill(password)
    await page.get_by_role("button", name="Log in").click()
    await page.get_by_role("button", name="Not now").click()  # the second factor offered after login
    await page.wait_for_url(url + "/dashboard")
    await page.locator("body[data-ready=true]").wait_for()
    return page


async def test_a_label_typed_in_one_context_is_read_in_another_and_never_seen_by_the_broker(
    tmp_path: Path, new_context: NewContext, caplog: pytest.LogCaptureFixture, axe_source: str
) -> None:
    caplog.set_level(logging.DEBUG)
    data = tmp_path / "data"
    full = await start_full_broker(data)
    try:
        therapist = await full.auth.accounts.add("robin", PASSWORD)
        sent: list[str] = []
        first = await log_in(new_context, full.url, PASSWORD, sent)
        await expect(first.locator("#vault-state")).to_contain_text("sealed on this device")
        async with first.expect_response(lambda r: r.url.endswith("/api/sessions") and r.request.method == "POST"):
            await first.get_by_role("button", name="Schedule").click()
        card = first.locator("li.session")
        await card.get_by_role("button", name="Add a label for the session").click()
        await card.get_by_role("textbox", name="Label for the session").fill(SESSION_LABEL)
        await card.get_by_role("textbox", name="Note for the session").fill(NOTE)
        await card.get_by_role("button", name="Save label").click()
        await expect(card.locator(".label-text").first).to_have_text(SESSION_LABEL)
        seat = card.locator("li.seat")
        await seat.get_by_role("button", name="Add a label for Client").click()
        await seat.get_by_role("textbox", name="Label for Client").fill(SEAT_LABEL)
        await seat.get_by_role("button", name="Save label").click()
        await expect(seat.locator(".label-text")).to_have_text(SEAT_LABEL)
        await seat.get_by_role("button", name="Edit label for Client").click()  # a form open, for the check
        await look(first, axe_source, "dashboard-labels")
        await seat.get_by_role("button", name="Cancel").click()
        secret_href = await card.get_by_role("link", name="Open session").get_attribute("href")
        assert secret_href and "#" in secret_href

        # A second context (another device) of the same therapist, after its own login.
        second = await log_in(new_context, full.url, PASSWORD)
        other_card = second.locator("li.session")
        await expect(other_card.locator(".vault-label[data-slot=session] .label-text")).to_have_text(SESSION_LABEL)
        await expect(other_card.locator(".vault-label[data-slot=session] .label-note")).to_have_text(NOTE)
        await expect(other_card.locator("li.seat .label-text")).to_have_text(SEAT_LABEL)
        # The session secret came through the vault: this device opens the session verified by link.
        assert await other_card.get_by_role("link", name="Open session").get_attribute("href") == secret_href

        # The therapist changes their password there; a third login with the new one still reads the labels.
        await second.locator("#password-change summary").click()
        await second.get_by_label("Current password").fill(PASSWORD)
        await second.get_by_label("New password").fill(NEW_PASSWORD)
        await second.get_by_role("button", name="Change password").click()
        await expect(second.locator("#password-result")).to_contain_text("Your password was changed")
        third = await log_in(new_context, full.url, NEW_PASSWORD)
        await expect(third.locator(".vault-label[data-slot=session] .label-text")).to_have_text(SESSION_LABEL)
        await expect(third.locator("#vault-lost")).to_be_hidden()
        # The QR dialog says whose link it is by the vault's label; once cancelled, the session's
        # card in the history carries its label too (the vault keeps its items for the history).
        card3 = third.locator("li.session").first
        await card3.locator("li.seat").get_by_role("button", name="Show QR code for Client").click()
        await expect(third.locator("#qr-dialog").get_by_role("heading")).to_contain_text(SEAT_LABEL)
        await third.locator("#qr-dialog").get_by_role("button", name="Close").click()
        session_id = await card3.get_attribute("data-session")
        third.once("dialog", lambda d: d.accept())
        await card3.get_by_role("button", name="Cancel session").click()
        ended = third.locator(f'#history [data-session="{session_id}"]')
        await expect(ended.locator(".label-text")).to_have_text(SESSION_LABEL, timeout=15_000)

        # An administrator resets the password: the next login says the old labels are lost.
        await full.auth.accounts.reset_password(therapist, PASSWORD)
        fourth = await log_in(new_context, full.url, PASSWORD)
        await expect(fourth.locator("#vault-lost")).to_contain_text("cannot be read any more")
        await look(fourth, axe_source, "dashboard-labels-lost")
        await expect(fourth.locator(".label-text")).to_have_count(0)

        # The label canary: in no request the first page made, no file of the data directory, no log record.
        canaries = (SESSION_LABEL, SEAT_LABEL, NOTE)
        assert sent and not [c for c in canaries for request in sent if c in request]
        stored = b"".join(p.read_bytes() for p in data.rglob("*") if p.is_file())
        assert not [c for c in canaries if c.encode() in stored]
        logged = "\n".join(r.getMessage() for r in caplog.records)
        assert "event=vault_item_stored" in logged
        assert not [c for c in canaries if c in logged]
        for page in (first, second, third, fourth):
            await page.context.close()
    finally:
        await full.stop()
