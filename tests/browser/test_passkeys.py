"""Passkeys in the real login page: Chromium's own virtual authenticator (DevTools WebAuthn
domain) makes and uses the credential, so the page's conversions and the broker's checks meet
a browser's genuine WebAuthn answers.

The broker is opened as http://localhost (a secure context where WebAuthn works; browsers refuse
passkeys on an IP address).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import urlsplit

import pytest
from aiohttp import web
from playwright.async_api import expect

from broker.accounts.totp import code_at
from tests.browser.kit import WAIT_MS, check_axe, shoot
from tests.http.test_web_auth import PASSWORD, FullBroker, free_port, start_full_broker

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.browser]


async def add_authenticator(context: Any, page: Any) -> Any:
    cdp = await context.new_cdp_session(page)
    await cdp.send("WebAuthn.enable")
    options = {
        "protocol": "ctap2",
        "transport": "internal",
        "hasResidentKey": True,
        "hasUserVerification": True,
        "isUserVerified": True,
        "automaticPresenceSimulation": True,
    }
    found = await cdp.send("WebAuthn.addVirtualAuthenticator", {"options": options})
    return cdp, found["authenticatorId"]


async def log_in(page: Any, base: str, name: str) -> None:
    await page.goto(base + "/login")
    await page.get_by_label("Login name").fill(name)
    await page.get_by_label("Password").fill(PASSWORD)
    await page.get_by_role("button", name="Log in").click()


async def test_passkey_as_the_required_second_factor(
    tmp_path: Any, new_context: Any, watch: Any, axe_source: str
) -> None:
    port = free_port()
    base = f"http://localhost:{port}"
    full = await start_full_broker(tmp_path, port=port, public_url=base, require_second_factor=True)
    # Chromium resolves "localhost" itself and tries ::1 first: listen there too.
    await web.TCPSite(full.runner, "::1", port).start()
    try:
        therapist = await full.auth.accounts.add("drew", PASSWORD)
        context = await new_context()
        page = await context.new_page()
        cdp, authenticator = await add_authenticator(context, page)

        # First login: the practice requires a second factor; the therapist picks a passkey.
        await log_in(page, base, "drew")
        await expect(page.get_by_role("heading", name="Set up your second factor")).to_be_visible(timeout=WAIT_MS)
        await page.get_by_role("button", name="Use a passkey instead").click()
        await expect(page.get_by_role("heading", name="Add a passkey")).to_be_visible()
        await check_axe(page, axe_source, "passkey")
        await shoot(page, "login-passkey")
        await page.get_by_role("button", name="Add a passkey").click()
        await expect(page.get_by_role("heading", name="Your recovery codes")).to_be_visible(timeout=WAIT_MS)
        assert await page.locator("#recovery-codes li").count() >= 8
        await page.get_by_role("button", name="I have stored them").click()
        await page.wait_for_url(base + "/dashboard")
        await page.locator("body[data-ready=true]").wait_for(timeout=WAIT_MS)
        await expect(page.locator("#setup-2fa")).to_be_hidden()
        await expect(page.get_by_role("link", name="Add a passkey")).to_be_visible()  # another one, later
        # The password typed before the enrolment opened (here: made) the label vault on the way.
        await expect(page.locator("#vault-state")).to_contain_text("sealed on this device")
        assert await full.auth.accounts.vault(therapist) is not None

        stored = await full.auth.accounts.passkeys(therapist)
        held = (await cdp.send("WebAuthn.getCredentials", {"authenticatorId": authenticator}))["credentials"]
        assert len(stored) == 1 and len(held) == 1
        assert held[0]["credentialId"].rstrip("=").replace("+", "-").replace("/", "_") == stored[0]["id"]

        # Log out, then in again: after the password the page asks the passkey by itself.
        await page.get_by_role("button", name="Log out").click()
        await page.wait_for_url("**/login**")
        await log_in(page, base, "drew")
        await page.wait_for_url(base + "/dashboard", timeout=WAIT_MS)
        await page.locator("body[data-ready=true]").wait_for(timeout=WAIT_MS)
        # After password and passkey the vault opens with the password (the passkey is a second factor).
        await expect(page.locator("#vault-state")).to_contain_text("sealed on this device")
        after = await full.auth.accounts.passkeys(therapist)
        assert after[0]["sign_count"] >= stored[0]["sign_count"]

        # Without the authenticator the password alone gets nowhere.
        await cdp.send("WebAuthn.removeVirtualAuthenticator", {"authenticatorId": authenticator})
        await page.get_by_role("button", name="Log out").click()
        await page.wait_for_url("**/login**")
        await log_in(page, base, "drew")
        await expect(page.get_by_role("button", name="Use your passkey")).to_be_visible(timeout=WAIT_MS)
        assert urlsplit(page.url).path == "/login"

        hosts = {urlsplit(u).hostname for u in watch.urls if not u.startswith(("data:", "blob:"))}
        assert hosts == {"localhost"}, hosts
        csp = [e for e in watch.console_errors if "Content Security Policy" in e]
        assert not csp and not watch.page_errors, (csp, watch.page_errors)
    finally:
        await full.stop()


REAUTH_WINDOW_S = 5 * 60


def later(full: FullBroker) -> None:
    """Move the broker's login clock past the five minutes a login counts as a recent proof."""
    full.auth.clock = lambda: time.time() + REAUTH_WINDOW_S + 60


def accept_confirms(page: Any) -> list[str]:
    """Accept the page's confirm() questions (a deliberate yes), keeping what they asked."""
    asked: list[str] = []

    def answer(dialog: Any) -> None:
        asked.append(dialog.message)
        asyncio.ensure_future(dialog.accept())

    page.on("dialog", answer)
    return asked


async def localhost_broker(tmp_path: Any) -> tuple[FullBroker, str]:
    port = free_port()
    base = f"http://localhost:{port}"
    full = await start_full_broker(tmp_path, port=port, public_url=base)
    await web.TCPSite(full.runner, "::1", port).start()
    return full, base


async def test_adding_a_passkey_later_asks_for_the_password_first(
    tmp_path: Any, new_context: Any, watch: Any, axe_source: str
) -> None:
    """Review finding 8 in the page: more than five minutes after the login, adding a passkey to an
    account that has an authenticator app asks for the password in a dialog, then goes through."""
    full, base = await localhost_broker(tmp_path)
    try:
        therapist = await full.auth.accounts.add("drew", PASSWORD)
        enrolment = await full.auth.accounts.enable_totp(therapist, "Practice")
        codes = await full.auth.accounts.confirm_totp(therapist, code_at(enrolment.secret, time.time()))
        assert codes
        context = await new_context()
        page = await context.new_page()
        await add_authenticator(context, page)
        await log_in(page, base, "drew")
        await page.get_by_label("Code from your authenticator app").fill(codes[0])
        await page.get_by_role("button", name="Log in").click()
        await page.wait_for_url(base + "/dashboard", timeout=WAIT_MS)
        await page.locator("body[data-ready=true]").wait_for(timeout=WAIT_MS)

        later(full)
        await page.get_by_role("link", name="Second factors").click()
        await expect(page.get_by_role("heading", name="Your second factors")).to_be_visible(timeout=WAIT_MS)
        await expect(page.get_by_text("Authenticator app: set up.")).to_be_visible()
        await expect(page.get_by_text("No passkeys yet.")).to_be_visible()
        await check_axe(page, axe_source, "second-factors")
        await shoot(page, "login-second-factors")
        await page.get_by_role("button", name="Add a passkey").click()
        await page.get_by_role("button", name="Add a passkey").click()  # the passkey screen's button
        dialog = page.get_by_role("dialog", name="Confirm it is you")
        await expect(dialog).to_be_visible(timeout=WAIT_MS)
        await check_axe(page, axe_source, "reauth")
        await shoot(page, "login-reauth")
        await dialog.get_by_label("Your password").fill("not the password at all 42")
        await dialog.get_by_role("button", name="Confirm").click()
        await expect(dialog.get_by_role("alert")).to_contain_text("not right", timeout=WAIT_MS)
        await dialog.get_by_label("Your password").fill(PASSWORD)
        await dialog.get_by_role("button", name="Confirm").click()
        await expect(page.get_by_role("status")).to_have_text("Passkey added.", timeout=WAIT_MS)
        await expect(dialog).to_be_hidden()
        assert len(await full.auth.accounts.passkeys(therapist)) == 1
        await expect(page.get_by_role("button", name="Remove the passkey added", exact=False)).to_be_visible()
        await shoot(page, "login-second-factors-passkey")
        csp = [e for e in watch.console_errors if "Content Security Policy" in e]
        assert not csp and not watch.page_errors, (csp, watch.page_errors)
    finally:
        await full.stop()


async def test_new_codes_with_the_passkey_as_proof_then_removing_the_last_factor(
    tmp_path: Any, new_context: Any, watch: Any
) -> None:
    """The passkey itself answers the proof of identity; removing the account's only second factor
    is asked about first, and the page then says the account logs in with a password only."""
    full, base = await localhost_broker(tmp_path)
    try:
        therapist = await full.auth.accounts.add("drew", PASSWORD)
        context = await new_context()
        page = await context.new_page()
        asked = accept_confirms(page)
        await add_authenticator(context, page)
        await log_in(page, base, "drew")
        await page.get_by_role("button", name="Not now").click()  # the second factor offered after login
        await page.wait_for_url(base + "/dashboard", timeout=WAIT_MS)
        await page.get_by_role("link", name="Add a passkey").click()
        await page.get_by_role("button", name="Add a passkey").click()  # just logged in: no extra proof
        await expect(page.get_by_role("heading", name="Your recovery codes")).to_be_visible(timeout=WAIT_MS)
        first_codes = await page.locator("#recovery-codes li").all_text_contents()
        await page.get_by_role("button", name="I have stored them").click()
        await page.wait_for_url(base + "/dashboard", timeout=WAIT_MS)

        later(full)
        await page.get_by_role("link", name="Second factors").click()
        await page.get_by_role("button", name="New recovery codes").click()
        dialog = page.get_by_role("dialog", name="Confirm it is you")
        await expect(dialog).to_be_visible(timeout=WAIT_MS)
        await dialog.get_by_role("button", name="Use your passkey instead").click()
        await expect(page.get_by_role("heading", name="Your recovery codes")).to_be_visible(timeout=WAIT_MS)
        new_codes = await page.locator("#recovery-codes li").all_text_contents()
        assert len(new_codes) == 10 and not set(new_codes) & set(first_codes)
        await page.get_by_role("button", name="I have stored them").click()
        await page.wait_for_url(base + "/dashboard", timeout=WAIT_MS)

        await page.get_by_role("link", name="Second factors").click()
        await page.get_by_role("button", name="Remove the passkey added", exact=False).click()
        await expect(page.get_by_role("status")).to_contain_text("password only", timeout=WAIT_MS)
        assert any("password only" in question for question in asked)
        assert await full.auth.accounts.passkeys(therapist) == []
        await expect(page.get_by_text("You log in with your password only.", exact=False)).to_be_visible()
        csp = [e for e in watch.console_errors if "Content Security Policy" in e]
        assert not csp and not watch.page_errors, (csp, watch.page_errors)
    finally:
        await full.stop()
