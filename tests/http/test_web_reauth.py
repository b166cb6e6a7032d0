"""Changing second factors needs a recent proof of identity (review finding 8).

Before, a cookie and its CSRF token were enough to add or remove passkeys, set up an app over a
passkey account, or (with the last passkey) drop the second factor and the recovery codes
altogether. Now those routes answer 403 ``reauth_required`` more than five minutes after the
session's login or last ``POST /api/reauth``. Same harness as test_web_auth.py (fake clock).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from broker.accounts.totp import code_at
from tests.http.test_web_auth import ORIGIN, PASSWORD, Harness, login_cookie, make_harness  # noqa: F401 - the fixture
from tests.http.test_web_passkeys import harness, passkey_login, register, reply_id
from tests.soft_authenticator import SoftAuthenticator

pytestmark = pytest.mark.asyncio(loop_scope="session")

WINDOW_S = 5 * 60


class Login:
    """One login session's cookie and CSRF token, kept up to date as the broker renews them."""

    def __init__(self, h: Harness, cookie: str, csrf: str) -> None:
        self.h, self.cookie, self.csrf = h, cookie, csrf

    async def post(self, path: str, body: Any) -> Any:
        reply = await self.h.request("POST", path, json=body, cookie=self.cookie, csrf=self.csrf)
        if reply.status == 200 and reply.cookies:
            self.cookie, self.csrf = login_cookie(reply), reply.json()["csrf"]
        return reply


async def with_passkey(make: Any, **fields: Any) -> tuple[Harness, SoftAuthenticator, Login]:
    """An account whose second factor is a passkey, logged in with it just now."""
    h = await harness(make, **fields)
    await h.accounts.add("robin", PASSWORD)
    cookie, csrf = await h.logged_in("robin")
    key = SoftAuthenticator(ORIGIN)
    assert (await register(h, cookie, csrf, key)).status == 200
    reply = await passkey_login(h, key)
    assert reply.status == 200
    return h, key, Login(h, login_cookie(reply), reply.json()["csrf"])


async def attempt(action: str, login: Login, key: SoftAuthenticator) -> Any:
    if action == "add_passkey":
        return await login.post("/api/passkeys/options", {})
    if action == "remove_passkey":
        return await login.post("/api/passkeys/remove", {"id": reply_id(key), "confirm_password_only": True})
    if action == "enrol_app":
        return await login.post("/api/2fa/enrol", {})
    return await login.post("/api/recovery-codes", {})


ACTIONS = ["add_passkey", "remove_passkey", "enrol_app", "recovery_codes"]


@pytest.mark.parametrize("action", ACTIONS)
async def test_cookie_and_csrf_alone_cannot_change_second_factors(make_harness: Any, action: str) -> None:
    h, key, login = await with_passkey(make_harness)
    before = await h.accounts.get_by_username("robin")
    h.clock.advance(WINDOW_S + 1)
    refused = await attempt(action, login, key)
    assert refused.status == 403, refused.body
    answer = refused.json()
    assert answer["error"] == "reauth_required" and "confirm it is you" in answer["message"]
    assert answer["factors"] == ["password", "code", "passkey"]  # recovery codes count as a code
    assert answer["passkey"]["publicKey"]["allowCredentials"][0]["id"] == reply_id(key)
    assert await h.accounts.get_by_username("robin") == before  # nothing changed
    assert (await h.request("GET", "/api/me", cookie=login.cookie)).status == 200  # still logged in

    proved = await login.post("/api/reauth", {"password": PASSWORD})
    assert proved.status == 200 and proved.json()["reauth_until"] == pytest.approx(h.clock() + WINDOW_S)
    assert not proved.cookies and proved.json()["csrf"] == login.csrf  # the same session goes on
    done = await attempt(action, login, key)
    assert done.status == 200, done.body
    assert "reauthenticated" in h.audit_events()


async def test_the_login_itself_counts_for_five_minutes(make_harness: Any) -> None:
    h, key, login = await with_passkey(make_harness)
    h.clock.advance(WINDOW_S - 5)
    assert (await login.post("/api/passkeys/options", {})).status == 200
    h.clock.advance(10)
    assert (await login.post("/api/passkeys/options", {})).json()["error"] == "reauth_required"


async def test_a_first_second_factor_needs_no_extra_proof(make_harness: Any) -> None:
    """An account with no second factor has only its password, which its login just asked for:
    setting up the first factor works however long ago that was (within the session's life)."""
    h = await harness(make_harness, login_idle_s=3600)
    await h.accounts.add("robin", PASSWORD)
    cookie, csrf = await h.logged_in("robin")
    h.clock.advance(40 * 60)
    login = Login(h, cookie, csrf)
    started = await login.post("/api/2fa/enrol", {})
    assert started.status == 200
    confirmed = await login.post("/api/2fa/confirm", {"code": code_at(_secret(started.json()["secret"]), h.clock())})
    assert confirmed.status == 200 and len(confirmed.json()["recovery_codes"]) == 10
    # Now that there is one, a second (a passkey) needs the proof, and so would new codes.
    assert (await login.post("/api/passkeys/options", {})).json()["error"] == "reauth_required"
    assert (await login.post("/api/recovery-codes", {})).json()["error"] == "reauth_required"


def _secret(b32: str) -> bytes:
    import base64

    return base64.b32decode(b32 + "=" * (-len(b32) % 8))


async def test_a_partial_session_sets_up_the_required_factor_without_extra_proof(make_harness: Any) -> None:
    h = await harness(make_harness, require_second_factor=True, login_idle_s=3600)
    await h.accounts.add("robin", PASSWORD)
    partial = await h.login("robin")
    assert partial.json()["enrolment_required"] is True
    h.clock.advance(30 * 60)
    login = Login(h, login_cookie(partial), partial.json()["csrf"])
    reply = await register(h, login.cookie, login.csrf, SoftAuthenticator(ORIGIN))
    assert reply.status == 200 and reply.json()["enrolment_required"] is False


@pytest.mark.parametrize("proof", ["code", "recovery_code", "passkey"])
async def test_a_second_factor_is_proof_enough(make_harness: Any, proof: str) -> None:
    h = await harness(make_harness)
    tid = await h.accounts.add("robin", PASSWORD)
    enrolment = await h.accounts.enable_totp(tid, "Practice")
    codes = await h.accounts.confirm_totp(tid, code_at(enrolment.secret, h.clock()))
    assert codes
    h.clock.advance(30)
    cookie, csrf = await h.logged_in("robin", code=code_at(enrolment.secret, h.clock()))
    login = Login(h, cookie, csrf)
    key = SoftAuthenticator(ORIGIN)
    assert (await register(h, login.cookie, login.csrf, key)).status == 200  # just logged in
    login = Login(h, *(await h.logged_in("robin", code=codes[0])))
    h.clock.advance(WINDOW_S + 31)
    refused = await login.post("/api/recovery-codes", {})
    assert refused.status == 403
    if proof == "code":
        body: dict[str, Any] = {"code": code_at(enrolment.secret, h.clock())}
    elif proof == "recovery_code":
        body = {"code": codes[1]}
    else:
        body = {"passkey": key.get(refused.json()["passkey"])}
    assert (await login.post("/api/reauth", body)).status == 200
    assert (await login.post("/api/recovery-codes", {})).status == 200
    if proof == "recovery_code":
        assert "recovery_code_used" in h.audit_events()


async def test_wrong_proofs_are_refused_counted_and_throttled_like_logins(make_harness: Any) -> None:
    h, key, login = await with_passkey(make_harness)
    h.clock.advance(WINDOW_S + 1)
    tid = (await h.accounts.get_by_username("robin")).id  # type: ignore[union-attr]
    wrong = await login.post("/api/reauth", {"password": "not my password at all 1"})
    assert wrong.status == 403 and wrong.json()["error"] == "reauth_failed"
    bad_code = await login.post("/api/reauth", {"code": "000000"})
    assert bad_code.status == 403
    assert (await h.accounts.rows.by_id(tid))["failures"] == 2  # type: ignore[index]
    # The same counters as logins by that name: a third failure, then the login itself must wait.
    assert (await login.post("/api/reauth", {"password": "not my password at all 2"})).status == 403
    slowed = await h.login("robin")
    assert slowed.status == 429 and slowed.json()["error"] == "too_many_attempts"
    assert (await login.post("/api/reauth", {"password": PASSWORD})).status == 429
    assert (await attempt("add_passkey", login, key)).json()["error"] == "reauth_required"
    for body in ({}, {"password": PASSWORD, "code": "123456"}, {"token": "x"}):
        assert (await login.post("/api/reauth", body)).json()["error"] == "bad_request"


async def test_simultaneous_reauth_guesses_get_no_more_checks_than_the_schedule(make_harness: Any) -> None:
    h, key, login = await with_passkey(make_harness)
    h.clock.advance(WINDOW_S + 1)
    replies = await asyncio.gather(
        *(login.post("/api/reauth", {"password": f"guess number {i} of many"}) for i in range(30))
    )
    assert sorted(r.status for r in replies) == [403] * 3 + [429] * 27


async def test_removing_the_last_second_factor_is_deliberate_and_says_what_it_means(make_harness: Any) -> None:
    h, key, login = await with_passkey(make_harness)
    tid = (await h.accounts.get_by_username("robin")).id  # type: ignore[union-attr]
    asked = await login.post("/api/passkeys/remove", {"id": reply_id(key)})
    assert asked.status == 409 and asked.json()["error"] == "last_second_factor"
    assert "password only" in asked.json()["message"]
    assert len(await h.accounts.passkeys(tid)) == 1
    h.clock.advance(WINDOW_S + 1)
    confirmed = {"id": reply_id(key), "confirm_password_only": True}
    assert (await login.post("/api/passkeys/remove", confirmed)).json()["error"] == "reauth_required"
    assert (await login.post("/api/reauth", {"password": PASSWORD})).status == 200
    removed = await login.post("/api/passkeys/remove", confirmed)
    assert removed.status == 200 and removed.json()["password_only"] is True
    assert "password only" in removed.json()["message"]
    assert removed.json()["therapist"]["recovery_codes_left"] == 0
    assert (await h.login("robin")).status == 200


async def test_reauth_needs_a_login_session_and_csrf(make_harness: Any) -> None:
    h, _, login = await with_passkey(make_harness)
    assert (await h.request("POST", "/api/reauth", json={"password": PASSWORD})).status == 401
    no_token = await h.request("POST", "/api/reauth", json={"password": PASSWORD}, cookie=login.cookie)
    assert no_token.status == 403 and no_token.json()["error"] == "forbidden"
