"""Passkeys in the real login page: Chromium's own virtual authenticator (DevTools WebAuthn
domain) makes and uses the credential, so the page's conversions and the broker's checks meet
a browser's genuine WebAuthn answers.

The broker is opened as http://localhost (a secure context where WebAuthn works; browsers refuse
passkeys on an IP address).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import pytest
from aiohttp import web
from playwright.async_api import expect

from ..test_web_auth import PASSWORD, free_port, start_full_broker
from .kit import WAIT_MS, check_axe, shoot

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


async def test_passkey_as_the_required_second_factor(tmp_path: Any, new_context: Any, watch: Any, axe_source: str) -> None:
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

        stored = await full.auth.accounts.passkeys(therapist)
        held = (await cdp.send("WebAuthn.getCredentials", {"authenticatorId": authenticator}))["credentials"]
        assert len(stored) == 1 and len(held) == 1
        assert held[0]["credentialId"].rstrip("=").replace("+", "-").replace("/", "_") == stored[0]["id"]

        # Log out, then in again: after the password the page asks the passkey by itself.
        await page.get_by_role("button", name="Log out").click()
        await page.wait_for_url("**/login**")
        await log_in(page, base, "drew")
        await page.wait_for_url(base + "/dashboard", timeout=WAIT_MS)
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
