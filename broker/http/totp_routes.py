"""The authenticator-app (TOTP) routes and new recovery codes.

Setting up the app works from a partial login session too (the practice requires a second factor
and the account has none yet): confirming it upgrades the session. Every change here ends the
therapist's other login sessions (the account's sessions epoch moves on, see account_store.py) while
the session that made it carries on under a fresh cookie; and on an account that already has a
second factor, it needs a recent proof of identity (reauth.py).
"""

from __future__ import annotations

import logging

import msgspec
import segno
from aiohttp import web

from broker.accounts import account as acc
from broker.accounts import totp
from broker.accounts.account import AccountError
from broker.http.json_api import Code, Empty, json_error, read_json
from broker.http.login_sessions import auth_of, require_login, reserve_attempt, throttled
from broker.http.reauth import factors_changed, has_second_factor, reauth_refusal

log = logging.getLogger("broker.web_auth")


class ConfirmRequest(msgspec.Struct, forbid_unknown_fields=True):
    code: Code


async def api_enrol(request: web.Request) -> web.Response:
    """Start TOTP enrolment: the QR code and URI for the authenticator app (secret not yet active)."""
    auth = auth_of(request)
    session = await require_login(request, allow_partial=True)
    await read_json(request, Empty)
    account = await auth.accounts.get(session.therapist)
    assert account is not None
    if account.totp_enabled:
        return json_error(
            409, "already_enrolled", "A second factor is already set up. Your administrator can reset it."
        )
    if (refusal := await reauth_refusal(auth, session, account)) is not None:
        return refusal
    enrolment = await auth.accounts.enable_totp(session.therapist, auth.policy.issuer)
    return web.json_response(
        {
            "qr_svg": enrolment.qr_svg,
            "qr_data_uri": segno.make(enrolment.uri, error="m").svg_data_uri(scale=5, border=4),
            "uri": enrolment.uri,
            "secret": totp.secret_base32(enrolment.secret),
        }
    )


async def api_confirm(request: web.Request) -> web.Response:
    """Activate the pending TOTP secret with a first code; the recovery codes are shown this once."""
    auth = auth_of(request)
    session = await require_login(request, allow_partial=True)
    body: ConfirmRequest = await read_json(request, ConfirmRequest)
    account = await auth.accounts.get(session.therapist)
    assert account is not None
    if (refusal := await reauth_refusal(auth, session, account)) is not None:
        return refusal
    throttle_key = "2fa-confirm:" + session.therapist
    decision = await reserve_attempt(auth, throttle_key, None, lambda: auth.accounts.get(session.therapist))
    if not decision.allowed:
        return await throttled(auth, decision.locked, decision.retry_after)
    epoch = acc.new_sessions_epoch()
    codes = await auth.accounts.confirm_totp(session.therapist, body.code, epoch=epoch)
    if codes is None:
        await auth.throttle.confirm_failure(throttle_key)
        # Guessing codes with a known password counts towards the account's durable lockout.
        await auth.accounts.count_failure(session.therapist)
        return json_error(400, "invalid_code", "That code did not match. Check the time on your phone and try again.")
    await auth.throttle.record_success(throttle_key)
    await auth.accounts.clear_failures(session.therapist)
    # New privileges (or new factors), new id: the old one, and every other session, ended.
    return await factors_changed(auth, session, epoch, {"recovery_codes": codes})


async def api_recovery_codes(request: web.Request) -> web.Response:
    """Ten new recovery codes, shown this once; the old ones stop working."""
    auth = auth_of(request)
    session = await require_login(request)
    await read_json(request, Empty)
    account = await auth.accounts.get(session.therapist)
    assert account is not None
    if not has_second_factor(account):
        return json_error(
            409, "no_second_factor", "Recovery codes come with a second factor: set up an app or a passkey first."
        )
    if (refusal := await reauth_refusal(auth, session, account)) is not None:
        return refusal
    epoch = acc.new_sessions_epoch()
    try:
        codes = await auth.accounts.new_recovery_codes(session.therapist, epoch=epoch)
    except AccountError as exc:  # the last second factor went away meanwhile
        return json_error(409, "no_second_factor", str(exc))
    log.info("event=recovery_codes_renewed")
    return await factors_changed(auth, session, epoch, {"recovery_codes": codes})


def setup_totp(app: web.Application) -> None:
    app.router.add_post("/api/2fa/enrol", api_enrol, name="api_2fa_enrol")
    app.router.add_post("/api/2fa/confirm", api_confirm, name="api_2fa_confirm")
    app.router.add_post("/api/recovery-codes", api_recovery_codes, name="api_recovery_codes")
