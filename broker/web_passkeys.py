"""The passkey routes: register, list and remove a therapist's passkeys, and the login step.

Registering needs a login session, partial ones included, so a therapist whose practice requires a
second factor can pick a passkey instead of an authenticator app; finishing that first
registration upgrades the session like confirming TOTP does (a fresh id). Logging in with a
passkey happens in ``POST /api/login``: the first answer after a right password carries the
options for ``navigator.credentials.get``, the second request carries the password again plus
the signed assertion (see web_auth.api_login).
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

import msgspec
from aiohttp import web

from . import passkeys
from .accounts import AccountError
from .audit import AuditEvent
from .passkeys import PasskeyError
from .web_auth import Empty, auth_of, json_error, me_body, read_json, require_login

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
    challenge = await passkeys.take_challenge(auth.store, "register:" + session.therapist)
    if challenge is None:
        return json_error(400, "passkey_expired", "That took too long. Please start adding the passkey again.")
    try:
        credential = passkeys.verify_registration(rp, body.credential, challenge)
        codes = await auth.accounts.add_passkey(session.therapist, credential)
    except (PasskeyError, AccountError) as exc:
        log.info("event=passkey_register_refused")
        return json_error(400, "passkey_refused", str(exc))
    log.info("event=passkey_registered")
    await auth.record(AuditEvent.SECOND_FACTOR_CHANGED, session.therapist)
    current = session
    if not session.full:
        await auth.destroy(session.id)
        current = await auth.create(session.therapist, full=True)
        await auth.record(AuditEvent.LOGIN_SUCCESS, session.therapist)
    response = web.json_response({"ok": True, "recovery_codes": codes, **await me_body(auth, current)})
    if current is not session:
        auth.set_cookie(response, current)
    return response


async def api_list(request: web.Request) -> web.Response:
    """The caller's passkeys: opaque ids and when each was added (nothing else is kept)."""
    auth = auth_of(request)
    session = await require_login(request)
    stored = await auth.accounts.passkeys(session.therapist)
    return web.json_response({"passkeys": [{"id": c["id"], "created_at": c.get("created_at")} for c in stored]})


async def api_remove(request: web.Request) -> web.Response:
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
    try:
        removed = await auth.accounts.remove_passkey(session.therapist, body.id)
    except AccountError as exc:
        return json_error(409, "conflict", str(exc))
    if not removed:
        return json_error(404, "not_found", "No such passkey on your account.")
    log.info("event=passkey_removed")
    await auth.record(AuditEvent.SECOND_FACTOR_CHANGED, session.therapist)
    return web.json_response({"ok": True, **await me_body(auth, session)})


def setup_passkeys(app: web.Application) -> None:
    app.router.add_post("/api/passkeys/options", api_register_options, name="api_passkey_options")
    app.router.add_post("/api/passkeys", api_register, name="api_passkey_register")
    app.router.add_get("/api/passkeys", api_list, name="api_passkey_list")
    app.router.add_post("/api/passkeys/remove", api_remove, name="api_passkey_remove")
