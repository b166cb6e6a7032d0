"""In Chromium: a second factor offered right after a password-only login, and recovery codes shown
whole (no code broken over two lines, also on a phone) with working copy and download buttons."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.http.test_web_auth import CHROMIUM_ARGS, PASSWORD, start_full_broker, totp_code

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="session")]

RECOVERY_CODE = re.compile(r"^[A-Z2-7]{4}(-[A-Z2-7]{4}){3}$")

#: Each code: the text, how many line boxes it takes, and whether it stays inside the window.
CODES_AS_SHOWN = """
() => [...document.querySelectorAll('#recovery-codes code')].map((code) => ({
  text: code.textContent,
  lines: code.getClientRects().length,
  inside: code.getBoundingClientRect().right <= window.innerWidth,
}))
"""


async def test_chromium_second_factor_offered_after_login_and_recovery_codes_copy_and_download(
    tmp_path: Path,
) -> None:
    from playwright.async_api import async_playwright

    full = await start_full_broker(tmp_path / "data")
    await full.auth.accounts.add("robin", PASSWORD, "Robin Example")
    try:
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS)
            context = await browser.new_context(viewport={"width": 390, "height": 844}, accept_downloads=True)
            await context.grant_permissions(["clipboard-read", "clipboard-write"], origin=full.url)
            page = await context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda err: errors.append(str(err)))

            async def log_in() -> None:
                await page.goto(full.url + "/login")
                await page.get_by_label("Login name").fill("robin")
                await page.get_by_label("Password").fill(PASSWORD)
                await page.get_by_role("button", name="Log in").click()
                await page.get_by_role("heading", name="Protect your account with a second factor").wait_for()

            # Offered, and "Not now" goes on to the dashboard.
            await log_in()
            assert await page.title() == "Protect your account with a second factor"
            await page.get_by_role("button", name="Not now").click()
            await page.wait_for_url(full.url + "/dashboard")
            await page.get_by_role("button", name="Log out").click()
            await page.wait_for_url(full.url + "/login?reason=logout")

            # Offered again at the next login; this time the therapist sets up the app.
            await log_in()
            await page.get_by_role("button", name="Set up an authenticator app").click()
            await page.get_by_role("heading", name="Set up your second factor").wait_for()
            await page.get_by_text("Cannot scan?").click()
            secret = (await page.locator("#enrol-secret").text_content() or "").replace(" ", "")
            await page.get_by_label("Code shown by the app").fill(totp_code(secret, time.time()))
            await page.get_by_role("button", name="Confirm").click()
            await page.get_by_role("heading", name="Your recovery codes").wait_for()

            shown = await page.evaluate(CODES_AS_SHOWN)
            codes = [code["text"] for code in shown]
            assert len(codes) == 10 and all(RECOVERY_CODE.match(c) for c in codes), codes
            assert all(code["lines"] == 1 for code in shown), f"a code broken over two lines: {shown}"
            assert all(code["inside"] for code in shown), f"a code runs out of the window: {shown}"

            await page.get_by_role("button", name="Copy the codes").click()
            await page.get_by_role("status").filter(has_text="Copied").wait_for()
            assert (await page.evaluate("navigator.clipboard.readText()")).split() == codes

            async with page.expect_download() as started:
                await page.get_by_role("button", name="Download as a text file").click()
            download = await started.value
            assert download.suggested_filename == "recovery-codes.txt"
            saved = Path(await download.path()).read_text(encoding="utf-8")
            assert [line for line in saved.splitlines() if RECOVERY_CODE.match(line)] == codes

            await page.get_by_role("button", name="I have stored them").click()
            await page.wait_for_url(full.url + "/dashboard")
            assert errors == []
            await browser.close()
    finally:
        await full.stop()


async def test_chromium_no_offer_when_the_account_has_a_second_factor(tmp_path: Path) -> None:
    """Logging in with a second factor goes straight to the dashboard (nothing to offer)."""
    from playwright.async_api import async_playwright

    full = await start_full_broker(tmp_path / "data")
    therapist = await full.auth.accounts.add("robin", PASSWORD)
    enrolment = await full.auth.accounts.enable_totp(therapist, "test")
    from broker.accounts.totp import secret_base32

    secret = secret_base32(enrolment.secret)
    assert await full.auth.accounts.confirm_totp(therapist, totp_code(secret, time.time())) is not None
    try:
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS)
            page = await browser.new_page()
            await page.goto(full.url + "/login")
            await page.get_by_label("Login name").fill("robin")
            await page.get_by_label("Password").fill(PASSWORD)
            await page.get_by_role("button", name="Log in").click()
            await page.get_by_label("Code from your authenticator app").wait_for()
            await page.get_by_label("Code from your authenticator app").fill(totp_code(secret, time.time() + 30))
            await page.get_by_role("button", name="Log in").click()
            await page.wait_for_url(full.url + "/dashboard")
            await browser.close()
    finally:
        await full.stop()
