"""The passkey routes: register, list and remove a therapist's passkeys, and the login step.

Registering needs a login session, partial ones included, so a therapist whose practice requires a
second factor can pick a passkey instead of an authenticator app; finishing that first
registration upgrades the session like confirming TOTP does (a fresh id). Adding or removing a
passkey ends the therapist's other login sessions while this one carries on under a fresh cookie,
and on an account that already has a second factor it needs a recent proof of identity
(reauth.py). Removing the last second factor must be asked for explicitly
(``confirm_password_only``): the account then logs in with its password alone.

Logging in with a passkey happens in ``POST /api/login``: the first answer after a right password
carries the options for ``navigator.credentials.get``, the second request carries the password
again plus the signed assertion (see web_auth.api_login).
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

import msgspec
from aiohttp import web

from broker.accounts import account as acc
from broker.accounts import passkeys
from broker.accounts.account import AccountError
from broker.accounts.passkeys import PasskeyError
from broker.http.json_api import Empty, json_error, read_json
from broker.http.login_sessions import auth_of, require_login
from broker.http.reauth import factors_changed, reauth_refusal

log = logging.getLogger("broker.web_auth")

_CredentialId = Annotated[str, msgspec.Meta(max_length=1024)]

UNAVAILABLE = (
    409,
    "passkeys_unavailable",
    (
        "Passkeys need the broker to be opened by its name (for example https://therapy.example.org or "
        "http://localhost), not by an IP address."
    ),
)


class RegisterRequest(msgspec.Struct, forbid_unknown_fields=True):
    credential: dict[str, Any]


class RemoveRequest(msgspec.Struct, forbid_unknown_fields=True):
    id: _CredentialId
    #: Must be true to remove the account's last second factor (it then logs in with a password only).
    confirm_password_only: bool = False


PASSWORD_ONLY = "Passkey removed. Your account now logs in with a password only, and its recovery codes no longer work."


async def api_register_options(request: web.Request) -> web.Response:
    """Options for ``navigator.credentials.create``; the challenge is kept for two minutes."""
    auth = auth_of(request)
    session = await require_login(request, allow_partial=True)
    await read_json(request, Empty)
    rp = auth.relying_party
    if rp is None:
        return json_error(*UNAVAILABLE)
    account = await auth.accounts.get(session.therapist)
    assert account is not None
    if (refusal := await reauth_refusal(auth, session, account)) is not None:
        return refusal
    stored = await auth.accounts.passkeys(session.therapist)
    options, challenge = passkeys.registration_options(rp, account.id, account.username, stored)
    await passkeys.keep_challenge(auth.store, "register:" + session.therapist, challenge)
    return web.json_response({"publicKey": options})


async def api_register(request: web.Request) -> web.Response:
    """Check the authenticator's answer and store the passkey; first one: recovery codes, full session."""
    auth = auth_of(request)
    session = await require_login(request, allow_partial=True)
    body: RegisterRequest = await read_json(request, RegisterRequest)
    rp = auth.relying_party
    if rp is None:
        return json_error(*UNAVAILABLE)
    account = await auth.accounts.get(session.therapist)
    assert account is not None
    if (refusal := await reauth_refusal(auth, session, account)) is not None:
        return refusal  # before the challenge is spent: the page can prove who it is and send again
    challenge = await passkeys.take_challenge(auth.store, "register:" + session.therapist)
    if challenge is None:
        return json_error(400, "passkey_expired", "That took too long. Please start adding the passkey again.")
    epoch = acc.new_sessions_epoch()
    try:
        credential = passkeys.verify_registration(rp, body.credential, challenge)
        codes = await auth.accounts.add_passkey(session.therapist, credential, epoch=epoch)
    except (PasskeyError, AccountError) as exc:
        log.info("event=passkey_register_refused")
        return json_error(400, "passkey_refused", str(exc))
    log.info("event=passkey_registered")
    return await factors_changed(auth, session, epoch, {"recovery_codes": codes})


async def api_list(request: web.Request) -> web.Response:
    """The caller's passkeys: opaque ids and when each was added (nothing else is kept)."""
    auth = auth_of(request)
    session = await require_login(request)
    stored = await auth.accounts.passkeys(session.therapist)
    return web.json_response({"passkeys": [{"id": c["id"], "created_at": c.get("created_at")} for c in stored]})


async def api_remove(request: web.Request) -> web.Response:
    """Remove a passkey; the account's last second factor only when asked for explicitly."""
    auth = auth_of(request)
    session = await require_login(request)
    body: RemoveRequest = await read_json(request, RemoveRequest)
    account = await auth.accounts.get(session.therapist)
    assert account is not None
    stored = await auth.accounts.passkeys(session.therapist)
    if not any(c["id"] == body.id for c in stored):
        return json_error(404, "not_found", "No such passkey on your account.")
    last_factor = not account.totp_enabled and len(stored) <= 1
    if last_factor and auth.policy.require_second_factor:
        return json_error(
            409,
            "second_factor_required",
            "Your practice requires a second factor: add another passkey or an authenticator app first.",
        )
    if last_factor and not body.confirm_password_only:
        return json_error(
            409,
            "last_second_factor",
            "This passkey is your last second factor. Without it your account logs in with a password only, "
            "and your recovery codes stop working. Remove it only if that is what you want.",
        )
    if (refusal := await reauth_refusal(auth, session, account)) is not None:
        return refusal
    epoch = acc.new_sessions_epoch()
    try:
        removed = await auth.accounts.remove_passkey(session.therapist, body.id, epoch=epoch)
    except AccountError as exc:
        return json_error(409, "conflict", str(exc))
    if not removed:
        return json_error(404, "not_found", "No such passkey on your account.")
    log.info("event=passkey_removed")
    extra = {"message": PASSWORD_ONLY} if last_factor else {}
    return await factors_changed(auth, session, epoch, {"password_only": last_factor, **extra})


def setup_passkeys(app: web.Application) -> None:
    app.router.add_post("/api/passkeys/options", api_register_options, name="api_passkey_options")
    app.router.add_post("/api/passkeys", api_register, name="api_passkey_register")
    app.router.add_get("/api/passkeys", api_list, name="api_passkey_list")
    app.router.add_post("/api/passkeys/remove", api_remove, name="api_passkey_remove")
