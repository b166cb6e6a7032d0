"""Therapist login for the web: the login page, the login API, logout, and the wiring of it all.

Failed logins answer byte for byte the same whatever was wrong, and growing delays and a lockout
per login name and per client address (an HMAC, never the address) slow guessing down; each
attempt is reserved in the throttle before its password is checked, so simultaneous guesses get no
more checks than consecutive ones. Login sessions, the cookie and CSRF: login_sessions.py. The
second-factor routes live in totp_routes.py and passkey_routes.py, re-authentication in
reauth.py; ``setup_auth`` adds them all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Annotated, Any

import msgspec
from aiohttp import web

from broker.accounts import account as acc
from broker.accounts import passkeys
from broker.accounts.account_store import AccountStore
from broker.accounts.passkeys import PasskeyError
from broker.accounts.throttle import Throttle
from broker.audit.log import AuditEvent, AuditLog, AuditOutcome
from broker.config import Config, Keys
from broker.http.json_api import Code, Secret, json_error, read_json
from broker.http.login_sessions import (
    AUTH,
    LOGIN_COOKIE,
    WebAuth,
    auth_of,
    csrf_middleware,
    me_body,
    require_login,
    reserve_attempt,
    throttled,
)
from broker.http.pages import html_page
from broker.http.passkey_routes import setup_passkeys
from broker.http.reauth import setup_reauth
from broker.http.totp_routes import setup_totp
from broker.metrics.labels import LoginOutcome, ThrottleLimit
from broker.metrics.registry import metrics_of
from broker.store.base import Store

log = logging.getLogger("broker.web_auth")

_Name = Annotated[str, msgspec.Meta(max_length=256)]


class LoginRequest(msgspec.Struct, forbid_unknown_fields=True):
    username: _Name
    password: Secret
    code: Code | None = None
    #: A WebAuthn assertion (``PublicKeyCredential.toJSON()``) answering the options we sent.
    passkey: dict[str, Any] | None = None


async def login_page(request: web.Request) -> web.StreamResponse:
    return html_page(request, "login.html")


_INVALID = (401, "invalid_credentials", "The login name, password or code is not right.")


async def api_login(request: web.Request) -> web.StreamResponse:
    """Log in: the password, then a second factor if the account has one."""
    auth = auth_of(request)
    body: LoginRequest = await read_json(request, LoginRequest)
    account = auth.accounts.account_key(body.username)
    address = auth.address(request)
    # The attempt is counted before scrypt runs: concurrent guesses beyond the schedule get a 429.
    decision = await reserve_attempt(auth, account, address, lambda: auth.accounts.get_by_username(body.username))
    if not decision.allowed:
        _count(request, LoginOutcome.THROTTLED)
        return await throttled(auth, decision.locked, decision.retry_after)
    assert decision.reserved_at is not None
    if body.passkey is not None:
        result = await _passkey_login(auth, body, account)
    else:
        code = body.code if body.code and body.code.strip() else None
        result = await auth.accounts.verify_login(
            body.username, body.password, code, require_second_factor=auth.policy.require_second_factor
        )
    if result.reason == acc.INVALID_CREDENTIALS:
        await auth.throttle.confirm_failure(account)
        log.info("event=login_failed")
        await auth.record(AuditEvent.LOGIN_FAILURE, None, AuditOutcome.DENIED)
        _count(request, LoginOutcome.INVALID)
        return json_error(*_INVALID)
    if result.reason == acc.SECOND_FACTOR_REQUIRED:
        await auth.throttle.release(account, address, decision.reserved_at)
        _count(request, LoginOutcome.SECOND_FACTOR_REQUIRED)
        return await _second_factor_required(auth, body.username, account)
    assert result.therapist_id is not None
    await auth.throttle.record_success(account, address, decision.reserved_at)
    full = result.reason != acc.SECOND_FACTOR_ENROLMENT_REQUIRED
    _count(request, LoginOutcome.OK)
    return await _start_session(request, result, full=full)


def _count(request: web.Request, outcome: LoginOutcome) -> None:
    metrics = metrics_of(request.app)
    if metrics is not None:
        metrics.login(outcome)
        if outcome is LoginOutcome.THROTTLED:
            metrics.throttle(ThrottleLimit.LOGIN)


async def _second_factor_required(auth: WebAuth, username: str, account_key: str) -> web.Response:
    """The password was right: say which second factors the account has, with passkey options."""
    account = await auth.accounts.get_by_username(username)
    assert account is not None
    factors = ["code"] if account.totp_enabled or account.recovery_codes_left else []
    extra: dict[str, Any] = {}
    rp = auth.relying_party
    if account.passkeys and rp is not None:
        options, challenge = passkeys.authentication_options(rp, await auth.accounts.passkeys(account.id))
        await passkeys.keep_challenge(auth.store, "login:" + account_key, challenge)
        extra["passkey"] = {"publicKey": options}
        factors.insert(0, "passkey")
    if extra:
        message = "Use your passkey, or enter a code." if factors[1:] else "Use your passkey."
    elif factors:
        message = "Enter the code from your authenticator app (or a recovery code)."
    else:  # passkeys only, on an address where browsers refuse them
        message = (
            "Your account uses a passkey, which does not work at this address. Open the broker by its name, "
            "or ask your administrator."
        )
    return json_error(401, "second_factor_required", message, factors=factors, **extra)


async def _passkey_login(auth: WebAuth, body: LoginRequest, account_key: str) -> acc.LoginResult:
    """Password and passkey assertion together; any failure counts like a wrong password."""
    denied = acc.LoginResult(ok=False, therapist_id=None, reason=acc.INVALID_CREDENTIALS)
    row = await auth.accounts.check_password(body.username, body.password)
    challenge = await passkeys.take_challenge(auth.store, "login:" + account_key)
    rp = auth.relying_party
    if row is None or challenge is None or rp is None or body.passkey is None:
        return denied
    therapist_id: str = row["id"]
    try:
        used, count = passkeys.verify_authentication(
            rp, body.passkey, challenge, await auth.accounts.passkeys(therapist_id)
        )
    except PasskeyError:
        log.info("event=passkey_login_refused")
        await auth.accounts.count_failure(therapist_id)
        return denied
    await auth.accounts.passkey_used(therapist_id, used, count)
    return await auth.accounts.finish_login(row, body.password, acc.PASSKEY_USED)


async def _start_session(request: web.Request, result: acc.LoginResult, *, full: bool) -> web.Response:
    """A new session id at every login: any session the browser still had is ended first."""
    auth = auth_of(request)
    therapist = result.therapist_id
    assert therapist is not None
    old = request.cookies.get(LOGIN_COOKIE)
    if old:
        await auth.destroy(old)
    session = await auth.create(therapist, full=full, epoch=result.sessions_epoch)
    log.info("event=login_ok full=%s", full)
    if full:
        await auth.record(AuditEvent.LOGIN_SUCCESS, therapist)
    if result.reason == acc.RECOVERY_CODE_USED:
        await auth.record(AuditEvent.RECOVERY_CODE_USED, therapist)
    body = await me_body(auth, session)
    response = web.json_response({"ok": True, **body})
    auth.set_cookie(response, session)
    return response


async def api_me(request: web.Request) -> web.Response:
    """Who is logged in, and the CSRF token."""
    session = await require_login(request, allow_partial=True)
    return web.json_response(await me_body(auth_of(request), session))


async def api_logout(request: web.Request) -> web.Response:
    """Log out: end the login session and clear the cookie."""
    auth = auth_of(request)
    session = await require_login(request, allow_partial=True)
    await auth.destroy(session.id)
    log.info("event=logout")
    await auth.record(AuditEvent.LOGOUT, session.therapist)
    response = web.json_response({"ok": True})
    auth.clear_cookie(response)
    return response


# ---------------------------------------------------------------- wiring


def setup_auth(
    app: web.Application,
    *,
    store: Store,
    accounts: AccountStore,
    throttle: Throttle,
    audit: AuditLog | None,
    config: Config,
    keys: Keys,
    clock: Callable[[], float] = time.time,
) -> None:
    """Add the login page, the login API and the CSRF guard to ``app`` (before it starts).

    ``throttle`` and ``accounts`` must lock out after the same number of failures: a login
    refused by this process's lock is let through again once the durable record says an
    administrator unlocked the account.
    """
    if throttle.lockout_after != accounts.lockout_after:
        raise ValueError("The login throttle and AccountStore must use the same lockout_after")
    app[AUTH] = WebAuth(
        store=store, accounts=accounts, throttle=throttle, audit=audit, config=config, keys=keys, clock=clock
    )
    app.middlewares.append(csrf_middleware(config))
    app.router.add_get("/login", login_page, name="login")
    app.router.add_post("/api/login", api_login, name="api_login")
    app.router.add_post("/api/logout", api_logout, name="api_logout")
    app.router.add_get("/api/me", api_me, name="api_me")
    # The second-factor routes build on the login session; they are added here so that one call wires all.
    setup_reauth(app)
    setup_totp(app)
    setup_passkeys(app)
