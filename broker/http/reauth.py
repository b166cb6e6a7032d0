"""Recent re-authentication before a therapist changes how they log in.

A cookie and its CSRF token (a browser left open, a page script gone wrong) must not be enough to
add, replace or remove a second factor, or to get new recovery codes: whoever holds them could
otherwise lock the therapist out or make the account theirs. Those routes need the therapist to
have proved who they are within the last ``REAUTH_WINDOW_S`` of that login session, by the login
itself or by ``POST /api/reauth`` with their password, a code (authenticator app or recovery code)
or a passkey. Otherwise they answer 403 ``reauth_required``, saying which proofs the account can
give (with passkey options when it has passkeys), and the page asks and tries again.

An account without any second factor needs no extra proof to set up its first one: nothing but
the password protects it, and the login that asked for the password is the session's start.

Re-authenticating is throttled and counted exactly like a login for the same name (the same
throttle keys, the same durable lockout), so a stolen cookie is no way round the login's limits.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from aiohttp import web

from broker.accounts import account as acc
from broker.accounts import passkeys
from broker.accounts.passkeys import PasskeyError
from broker.audit.log import AuditEvent, AuditOutcome
from broker.http.json_api import BadRequest, Code, Secret, json_error, read_json
from broker.http.login_sessions import (
    LOADED,
    LoginSession,
    WebAuth,
    auth_of,
    me_body,
    require_login,
    reserve_attempt,
    throttled,
)

log = logging.getLogger("broker.web_auth")

#: How long after proving who they are a therapist may change their second factors.
REAUTH_WINDOW_S = 5 * 60
_CHALLENGE_PURPOSE = "reauth:"


class ReauthRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Exactly one proof: the password, a code, or a passkey assertion for the options sent."""

    password: Secret | None = None
    code: Code | None = None
    passkey: dict[str, Any] | None = None


def has_second_factor(account: acc.Account) -> bool:
    return account.totp_enabled or account.passkeys > 0


def reauth_until(session: LoginSession) -> float:
    """Until when (Unix seconds) the session may change second factors without a new proof."""
    return session.verified + REAUTH_WINDOW_S


async def reauth_refusal(auth: WebAuth, session: LoginSession, account: acc.Account) -> web.Response | None:
    """None when ``session`` may change ``account``'s second factors now; else the 403 to send."""
    if not has_second_factor(account) or auth.clock() <= reauth_until(session):
        return None
    factors = ["password"]
    extra: dict[str, Any] = {}
    if account.totp_enabled or account.recovery_codes_left:
        factors.append("code")
    rp = auth.relying_party
    if account.passkeys and rp is not None:
        options, challenge = passkeys.authentication_options(rp, await auth.accounts.passkeys(account.id))
        await passkeys.keep_challenge(auth.store, _CHALLENGE_PURPOSE + account.id, challenge)
        factors.append("passkey")
        extra["passkey"] = {"publicKey": options}
    log.info("event=reauth_required")
    return json_error(
        403,
        "reauth_required",
        "To change how you log in, first confirm it is you with your password or your second factor.",
        factors=factors,
        **extra,
    )


async def api_reauth(request: web.Request) -> web.Response:
    """Prove who you are again; for the next five minutes second factors may be changed."""
    auth = auth_of(request)
    session = await require_login(request, allow_partial=True)
    body: ReauthRequest = await read_json(request, ReauthRequest)
    if sum(proof is not None for proof in (body.password, body.code, body.passkey)) != 1:
        raise BadRequest("Send one of password, code or passkey.")
    account = await auth.accounts.get(session.therapist)
    assert account is not None  # the session was loaded just now, which checks the account
    key = auth.accounts.account_key(account.username)
    address = auth.address(request)
    decision = await reserve_attempt(auth, key, address, lambda: auth.accounts.get(session.therapist))
    if not decision.allowed:
        return await throttled(auth, decision.locked, decision.retry_after)
    assert decision.reserved_at is not None
    proof = await _check_proof(auth, session, account, body)
    if proof is None:
        await auth.throttle.confirm_failure(key)
        log.info("event=reauth_failed")
        await auth.record(AuditEvent.LOGIN_FAILURE, session.therapist, AuditOutcome.DENIED)
        return json_error(403, "reauth_failed", "That password or code is not right, or the passkey did not verify.")
    await auth.throttle.record_success(key, address, decision.reserved_at)
    await auth.accounts.clear_failures(session.therapist)
    fresh = await auth.reverified(session)
    request[LOADED] = fresh
    log.info("event=reauth_ok")
    await auth.record(AuditEvent.REAUTHENTICATED, session.therapist)
    if proof == acc.RECOVERY_CODE_USED:
        await auth.record(AuditEvent.RECOVERY_CODE_USED, session.therapist)
    return web.json_response({"ok": True, "reauth_until": reauth_until(fresh), **await me_body(auth, fresh)})


async def _check_proof(auth: WebAuth, session: LoginSession, account: acc.Account, body: ReauthRequest) -> str | None:
    """The proof's kind when it holds (``OK``, ``RECOVERY_CODE_USED``, ``PASSKEY_USED``), else None.
    Wrong ones count towards the account's durable lockout, as at login."""
    if body.password is not None:
        row = await auth.accounts.check_password(account.username, body.password)
        return acc.OK if row is not None and row["id"] == session.therapist else None
    if body.code is not None:
        return await auth.accounts.check_code(session.therapist, body.code)
    challenge = await passkeys.take_challenge(auth.store, _CHALLENGE_PURPOSE + session.therapist)
    rp = auth.relying_party
    if challenge is None or rp is None or body.passkey is None:
        return None
    try:
        used, count = passkeys.verify_authentication(
            rp, body.passkey, challenge, await auth.accounts.passkeys(session.therapist)
        )
    except PasskeyError:
        log.info("event=passkey_reauth_refused")
        await auth.accounts.count_failure(session.therapist)
        return None
    await auth.accounts.passkey_used(session.therapist, used, count)
    return acc.PASSKEY_USED


def setup_reauth(app: web.Application) -> None:
    app.router.add_post("/api/reauth", api_reauth, name="api_reauth")


async def factors_changed(auth: WebAuth, session: LoginSession, epoch: str, answer: dict[str, Any]) -> web.Response:
    """A second factor was set up, removed or renewed: audit it and carry this login session on
    under a new cookie in the account's new sessions ``epoch`` (every other session ended with the
    change). A partial session that just set up its first factor is a full login from now on."""
    await auth.record(AuditEvent.SECOND_FACTOR_CHANGED, session.therapist)
    fresh = await auth.renew(session, epoch=epoch, full=True)
    if not session.full:
        await auth.record(AuditEvent.LOGIN_SUCCESS, session.therapist)
    response = web.json_response({"ok": True, **answer, **await me_body(auth, fresh)})
    auth.set_cookie(response, fresh)
    return response
