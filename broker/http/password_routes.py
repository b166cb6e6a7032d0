"""The therapist changes their own password, and their vault key is re-wrapped in the same step.

``POST /api/password`` takes the current password (checked, throttled and counted like a login),
the new one (the password policy applies) and the vault key wrapped by the browser under the new
password (vault_routes.py): the new hash and the re-wrapped key are written together, so labels stay
readable. Every other login session of the account ends; this one carries on under a new cookie.
"""

from __future__ import annotations

import logging

import msgspec
from aiohttp import web

from broker.accounts import account as acc
from broker.accounts.passwords import PasswordRejected
from broker.audit.log import AuditEvent, AuditOutcome
from broker.http.json_api import Secret, json_error, read_json
from broker.http.login_sessions import auth_of, me_body, require_login, reserve_attempt, throttled
from broker.http.vault_routes import VaultRecord, encode_record

log = logging.getLogger("broker.web_auth")


class ChangePassword(msgspec.Struct, forbid_unknown_fields=True):
    password: Secret
    new_password: Secret
    #: The vault key wrapped under the new password; null only for an account without a vault.
    vault: VaultRecord | None = None


async def api_change_password(request: web.Request) -> web.Response:
    """Change the password; the vault key re-wrapped by the browser is stored with it."""
    auth = auth_of(request)
    session = await require_login(request)
    body: ChangePassword = await read_json(request, ChangePassword)
    account = await auth.accounts.get(session.therapist)
    assert account is not None  # the session was loaded just now, which checks the account
    if body.vault is None and await auth.accounts.vault(session.therapist) is not None:
        return json_error(
            400,
            "vault_required",
            "Send your vault key wrapped under the new password, or your labels would become unreadable.",
        )
    key = auth.accounts.account_key(account.username)
    address = auth.address(request)
    decision = await reserve_attempt(auth, key, address, lambda: auth.accounts.get(session.therapist))
    if not decision.allowed:
        return await throttled(auth, decision.locked, decision.retry_after)
    assert decision.reserved_at is not None
    row = await auth.accounts.check_password(account.username, body.password)
    if row is None or row["id"] != session.therapist:
        await auth.throttle.confirm_failure(key)
        log.info("event=password_change_refused")
        await auth.record(AuditEvent.LOGIN_FAILURE, session.therapist, AuditOutcome.DENIED)
        return json_error(403, "reauth_failed", "Your current password is not right.")
    await auth.throttle.record_success(key, address, decision.reserved_at)
    epoch = acc.new_sessions_epoch()
    vault = encode_record(body.vault) if body.vault is not None else None
    try:
        await auth.accounts.change_password(session.therapist, body.new_password, vault, epoch=epoch)
    except PasswordRejected as exc:
        return json_error(400, "password_rejected", exc.reason)
    log.info("event=password_changed")
    await auth.record(AuditEvent.PASSWORD_RESET, session.therapist)
    fresh = await auth.renew(session, epoch=epoch, full=True)
    response = web.json_response({"ok": True, **await me_body(auth, fresh)})
    auth.set_cookie(response, fresh)
    return response


def setup_password(app: web.Application) -> None:
    app.router.add_post("/api/password", api_change_password, name="api_password")
