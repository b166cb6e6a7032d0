"""Therapist login for the web: pages, JSON API, login sessions, CSRF and throttling.

A login session is a random id in an ``HttpOnly; Secure; SameSite=Strict`` cookie named
``__Host-broker_login``. The store never holds that id, only an HMAC of it, so a dump of the
store (or of Redis) cannot be replayed as a cookie. A fresh id is made at every login and every
change of how the therapist logs in (a second factor set up, added or removed, new recovery
codes); an id is never reused or extended past its absolute lifetime. Each record carries its own
CSRF token, the account's sessions epoch it was made under (a password reset, a second-factor
change or a disable anywhere moves the epoch on and so ends it, see accounts.py), and when the
therapist last proved who they are (web_reauth.py).

The ``Secure`` attribute and the ``__Host-`` prefix need a secure origin. Browsers treat
``http://127.0.0.1`` and ``http://localhost`` as secure (Chromium accepts and sends such cookies
over plain http there), so the zero-setup loopback install works; anywhere else the broker must
sit behind TLS, which ``check_config`` already insists on.

Every state-changing request under ``/api/`` needs an allowed ``Origin``; every one except
``/api/login`` (which has no login session yet) also needs ``X-CSRF-Token`` equal to its login
session's token. Failed logins answer byte for byte the same whatever was wrong, and growing
delays and a lockout per login name and per client address (an HMAC, never the address) slow
guessing down; each attempt is reserved in the throttle before its password is checked, so
simultaneous guesses get no more checks than consecutive ones.

The second-factor routes live in web_totp.py and web_passkeys.py, re-authentication in
web_reauth.py; ``setup_auth`` adds them all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import msgspec
from aiohttp import web
from aiohttp.typedefs import Middleware
from redis.exceptions import RedisError

from broker.accounts import account as acc
from broker.accounts import passkeys
from broker.accounts.account_store import AccountStore
from broker.accounts.passkeys import PasskeyError, RelyingParty
from broker.accounts.throttle import Decision, Throttle
from broker.audit.log import AuditEvent, AuditLog, AuditOutcome
from broker.config import Config, Keys
from broker.http.client_address import request_address_key
from broker.http.json_depth import MAX_DEPTH, too_deep
from broker.store.base import Store, StoreUnavailable

log = logging.getLogger("broker.web_auth")

LOGIN_COOKIE = "__Host-broker_login"
CSRF_HEADER = "X-CSRF-Token"
#: Requests sent by timers (list refresh) carry this header so they do not count as activity.
BACKGROUND_HEADER = "X-Broker-Background"
ACCOUNTS_FILENAME = "accounts.sqlite3"
AUDIT_FILENAME = "audit.log"

DEFAULT_IDLE_S = 15 * 60
DEFAULT_ABSOLUTE_S = 12 * 3600
DEFAULT_ISSUER = "Teletherapy broker"

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_TOKEN_EXEMPT = frozenset({"/api/login"})
_KEY_PREFIX = "login:"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def accounts_path(config: Config) -> Path:
    """Where the therapist accounts live: DATA_DIR/accounts.sqlite3."""
    return config.accounts_path


def audit_path(config: Config) -> Path:
    """Where the audit log lives: DATA_DIR/audit.log (shared by the server and the CLI)."""
    return config.audit_path


# ---------------------------------------------------------------- policy knobs


@dataclass(frozen=True)
class LoginPolicy:
    """Login settings read from the configuration (with defaults until Config has the fields)."""

    idle_s: float = DEFAULT_IDLE_S
    absolute_s: float = DEFAULT_ABSOLUTE_S
    require_second_factor: bool = False
    issuer: str = DEFAULT_ISSUER

    @classmethod
    def from_config(cls, config: Config) -> LoginPolicy:
        return cls(
            idle_s=float(getattr(config, "login_idle_s", DEFAULT_IDLE_S)),
            absolute_s=float(getattr(config, "login_absolute_s", DEFAULT_ABSOLUTE_S)),
            require_second_factor=bool(getattr(config, "require_second_factor", False)),
            issuer=str(getattr(config, "practice_name", "") or DEFAULT_ISSUER),
        )


# ---------------------------------------------------------------- request bodies

_Name = Annotated[str, msgspec.Meta(max_length=256)]
Secret = Annotated[str, msgspec.Meta(max_length=1024)]
Code = Annotated[str, msgspec.Meta(max_length=64)]


class LoginRequest(msgspec.Struct, forbid_unknown_fields=True):
    username: _Name
    password: Secret
    code: Code | None = None
    #: A WebAuthn assertion (``PublicKeyCredential.toJSON()``) answering the options we sent.
    passkey: dict[str, Any] | None = None


class Empty(msgspec.Struct, forbid_unknown_fields=True):
    pass


def json_error(status: int, error: str, message: str, **extra: Any) -> web.Response:
    """The one shape of every API refusal: a stable code and a sentence for people."""
    headers = {}
    if "retry_after" in extra:
        headers["Retry-After"] = str(extra["retry_after"])
    return web.json_response({"error": error, "message": message, **extra}, status=status, headers=headers)


class BadRequest(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


async def read_json(request: web.Request, kind: type[Any]) -> Any:
    """Decode a JSON body strictly; anything else is a BadRequest with a plain message.

    Every JSON body of the API comes through here, so here is where nesting is bounded: a decoder
    recursing a thousand levels into a ``dict[str, Any]`` field (a passkey) would otherwise end in
    RecursionError and a 500.
    """
    if request.content_type != "application/json":
        raise BadRequest("Send the request as application/json.")
    raw = await request.read()
    if too_deep(raw):
        raise BadRequest(f"The request nests objects or arrays too deeply (at most {MAX_DEPTH} levels).")
    try:
        return msgspec.json.decode(raw or b"{}", type=kind)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"The request is not valid: {exc}") from None
    except msgspec.DecodeError:
        raise BadRequest("The request body is not valid JSON.") from None
    except RecursionError:  # not reachable past too_deep; kept so that no body can ever cause a 500
        raise BadRequest("The request nests objects or arrays too deeply.") from None


# ---------------------------------------------------------------- login sessions


class LoginRecord(msgspec.Struct, forbid_unknown_fields=True):
    therapist: str
    csrf: str
    created: float
    #: False while the therapist must still enrol a second factor: only the 2FA routes work.
    full: bool = True
    #: The account's sessions epoch when this session was made; another one ends the session.
    epoch: str = ""
    #: When the therapist last proved who they are in this session (the login, or /api/reauth).
    verified: float = 0.0


@dataclass(frozen=True)
class LoginSession:
    """A live login: the cookie value (never stored) and its record."""

    id: str
    therapist: str
    csrf: str
    created: float
    full: bool
    epoch: str = ""
    verified: float = 0.0


#: The request's login session, loaded at most once per request.
LOADED: web.RequestKey[LoginSession | None] = web.RequestKey("login_session")


class WebAuth:
    """Login sessions, throttling and the login API; one per application."""

    def __init__(
        self,
        *,
        store: Store,
        accounts: AccountStore,
        throttle: Throttle,
        audit: AuditLog | None,
        config: Config,
        keys: Keys,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.accounts = accounts
        self.throttle = throttle
        self.audit = audit
        self.config = config
        self.policy = LoginPolicy.from_config(config)
        #: Who passkeys are for; None when the public address is an IP address (no passkeys there).
        self.relying_party = RelyingParty.from_config(config)
        self.clock = clock
        self._session_key = keys.derive("login-session")
        self._address_secret = keys.address

    # ----- store

    def _store_key(self, session_id: str) -> str:
        digest = hmac.new(self._session_key, session_id.encode("ascii", "replace"), hashlib.sha256).hexdigest()
        return _KEY_PREFIX + digest[:40]

    def _ttl(self, created: float) -> float:
        return min(self.policy.idle_s, created + self.policy.absolute_s - self.clock())

    async def create(self, therapist: str, *, full: bool, epoch: str) -> LoginSession:
        """A brand-new login session with its own id and CSRF token, under the account's sessions
        ``epoch`` as read with the password hash it was checked against; the login counts as
        proof of who the therapist is (``verified``)."""
        now = self.clock()
        session = LoginSession(
            id=secrets.token_urlsafe(32),
            therapist=therapist,
            csrf=secrets.token_urlsafe(32),
            created=now,
            full=full,
            epoch=epoch,
            verified=now,
        )
        await self._write(session)
        return session

    async def renew(self, session: LoginSession, *, epoch: str, full: bool = True) -> LoginSession:
        """The session that just changed how its therapist logs in carries on under a new id and
        CSRF token in the account's new sessions ``epoch`` (every other session ended with the
        change); its lifetime and its last proof of identity carry over."""
        await self.destroy(session.id)
        fresh = dataclasses.replace(
            session, id=secrets.token_urlsafe(32), csrf=secrets.token_urlsafe(32), full=full, epoch=epoch
        )
        await self._write(fresh)
        return fresh

    async def reverified(self, session: LoginSession) -> LoginSession:
        """The therapist proved who they are again (``/api/reauth``): note when."""
        fresh = dataclasses.replace(session, verified=self.clock())
        await self._write(fresh)
        return fresh

    async def _write(self, session: LoginSession) -> None:
        record = LoginRecord(
            session.therapist, session.csrf, session.created, session.full, session.epoch, session.verified
        )
        await self.store.put(self._store_key(session.id), msgspec.json.encode(record), self._ttl(session.created))

    async def load(self, session_id: str | None, *, touch: bool = True) -> LoginSession | None:
        """The live session for a cookie value; refreshes its idle timer unless ``touch`` is off."""
        if not session_id or len(session_id) > 128:
            return None
        key = self._store_key(session_id)
        raw = await self.store.get(key)
        if raw is None:
            return None
        try:
            record = msgspec.json.decode(raw, type=LoginRecord)
        except (msgspec.ValidationError, msgspec.DecodeError):
            await self.store.update(key, lambda _: (None, None), 1.0)
            return None
        if self._ttl(record.created) <= 0:
            await self.store.update(key, lambda _: (None, None), 1.0)
            return None
        session = LoginSession(
            session_id, record.therapist, record.csrf, record.created, record.full, record.epoch, record.verified
        )
        account = await self.accounts.get(session.therapist)
        # A password reset, a second-factor change or a disable ends the session, in whichever
        # process (the CLI, another broker) it happened: the account's epoch moved on.
        if account is None or account.disabled or not hmac.compare_digest(account.sessions_epoch, session.epoch):
            await self.destroy(session_id)
            return None
        if touch:
            await self._write(session)
        return session

    async def destroy(self, session_id: str) -> None:
        await self.store.update(self._store_key(session_id), lambda _: (None, None), 1.0)

    # ----- requests

    def address(self, request: web.Request) -> str:
        """Opaque key of the client address (behind a trusted proxy: the last X-Forwarded-For hop)."""
        return request_address_key(request, self._address_secret, self.config.trust_proxy)

    async def session_of(self, request: web.Request) -> LoginSession | None:
        """The request's login session (loaded once per request)."""
        if LOADED not in request:
            touch = request.headers.get(BACKGROUND_HEADER) != "1"
            request[LOADED] = await self.load(request.cookies.get(LOGIN_COOKIE), touch=touch)
        return request[LOADED]

    def set_cookie(self, response: web.StreamResponse, session: LoginSession) -> None:
        # A session cookie (no Max-Age): it also ends when the browser closes.
        response.set_cookie(LOGIN_COOKIE, session.id, path="/", secure=True, httponly=True, samesite="Strict")

    def clear_cookie(self, response: web.StreamResponse) -> None:
        response.del_cookie(LOGIN_COOKIE, path="/", secure=True, httponly=True, samesite="Strict")

    async def record(self, event: AuditEvent, actor: str | None, outcome: AuditOutcome = AuditOutcome.OK) -> None:
        if self.audit is not None:
            await self.audit.append(event, actor, None, outcome)


AUTH = web.AppKey("web_auth", WebAuth)


def auth_of(request: web.Request) -> WebAuth:
    return request.app[AUTH]


class LoginRequired(web.HTTPUnauthorized):
    """No (full) login session: a JSON 401 that the pages turn into the login screen."""

    def __init__(self) -> None:
        body = json.dumps({"error": "login_required", "message": "Please log in."})
        super().__init__(text=body, content_type="application/json")


async def require_login(request: web.Request, *, allow_partial: bool = False) -> LoginSession:
    """The caller's login session, or a 401. Partial sessions (2FA enrolment pending) only if allowed."""
    session = await auth_of(request).session_of(request)
    if session is None or (not session.full and not allow_partial):
        raise LoginRequired()
    return session


def login_required(handler: Handler) -> Handler:
    """Decorator for API handlers that need a logged-in therapist."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        await require_login(request)
        return await handler(request)

    wrapped.__name__ = getattr(handler, "__name__", "handler")
    wrapped.__doc__ = handler.__doc__
    return wrapped


# ---------------------------------------------------------------- CSRF


def csrf_middleware(config: Config) -> Middleware:
    """Refuse state-changing API requests from other origins or without the session's token."""
    allowed = frozenset(config.origins)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/api/"):
            return await handler(request)
        try:
            return await guarded(request, handler)
        except (StoreUnavailable, RedisError, ConnectionError, TimeoutError):
            # The session store, or the Redis holding accounts and login counters, is away.
            log.warning("event=api_unavailable")
            return json_error(503, "unavailable", "The service is briefly unavailable. Try again shortly.")

    async def guarded(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method not in _SAFE_METHODS:
            origin = request.headers.get("Origin")
            if not origin or origin not in allowed:
                log.info("event=csrf_refused reason=origin")
                return json_error(403, "forbidden", "This request must come from the broker's own pages.")
            if request.path not in _TOKEN_EXEMPT:
                session = await auth_of(request).session_of(request)
                if session is None:
                    raise LoginRequired()
                token = request.headers.get(CSRF_HEADER, "")
                if not hmac.compare_digest(token.encode("utf-8", "replace"), session.csrf.encode("ascii")):
                    log.info("event=csrf_refused reason=token")
                    return json_error(403, "forbidden", "The page is out of date. Reload it and try again.")
        try:
            return await handler(request)
        except BadRequest as exc:
            return json_error(400, "bad_request", exc.message)

    return middleware


# ---------------------------------------------------------------- handlers


def web_root() -> Path:
    from broker.http.app import web_root as root

    return root()


def html_page(name: str) -> web.FileResponse:
    return web.FileResponse(web_root() / name, headers={"Content-Type": "text/html; charset=utf-8"})


async def login_page(request: web.Request) -> web.StreamResponse:
    return html_page("login.html")


_INVALID = (401, "invalid_credentials", "The login name, password or code is not right.")


async def api_login(request: web.Request) -> web.StreamResponse:
    auth = auth_of(request)
    body: LoginRequest = await read_json(request, LoginRequest)
    account = auth.accounts.account_key(body.username)
    address = auth.address(request)
    # The attempt is counted before scrypt runs: concurrent guesses beyond the schedule get a 429.
    decision = await reserve_attempt(auth, account, address, lambda: auth.accounts.get_by_username(body.username))
    if not decision.allowed:
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
        return json_error(*_INVALID)
    if result.reason == acc.SECOND_FACTOR_REQUIRED:
        await auth.throttle.release(account, address, decision.reserved_at)
        return await _second_factor_required(auth, body.username, account)
    assert result.therapist_id is not None
    await auth.throttle.record_success(account, address, decision.reserved_at)
    full = result.reason != acc.SECOND_FACTOR_ENROLMENT_REQUIRED
    return await _start_session(request, result, full=full)


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


async def reserve_attempt(
    auth: WebAuth, key: str, address: str | None, account: Callable[[], Awaitable[acc.Account | None]]
) -> Decision:
    """Reserve an attempt for ``key`` (counted as a failure until its outcome says otherwise).
    The durable account record is the authority on locks: once ``broker therapist unlock``
    cleared it, the throttle's lock is lifted too."""
    decision = await auth.throttle.reserve(key, address)
    if decision.locked:
        found = await account()
        if found is not None and not found.locked:
            await auth.throttle.unlock(key)
            decision = await auth.throttle.reserve(key, address)
    return decision


async def throttled(auth: WebAuth, locked: bool, retry_after: float) -> web.Response:
    if locked:
        log.info("event=login_locked")
        await auth.record(AuditEvent.LOGIN_LOCKED, None, AuditOutcome.LOCKED)
        return json_error(
            429, "locked", "Too many failed attempts. Ask your practice administrator to unlock the account."
        )
    wait = max(1, math.ceil(retry_after))
    await auth.record(AuditEvent.LOGIN_FAILURE, None, AuditOutcome.THROTTLED)
    return json_error(
        429, "too_many_attempts", f"Too many attempts. Wait {wait} seconds and try again.", retry_after=wait
    )


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


async def me_body(auth: WebAuth, session: LoginSession) -> dict[str, Any]:
    account = await auth.accounts.get(session.therapist)
    assert account is not None
    return {
        "csrf": session.csrf,
        "enrolment_required": not session.full,
        "idle_s": auth.policy.idle_s,
        "expires": session.created + auth.policy.absolute_s,
        "therapist": {
            "id": account.id,
            "username": account.username,
            "display_name": account.display_name,
            "totp_enabled": account.totp_enabled,
            "recovery_codes_left": account.recovery_codes_left,
            "passkeys": account.passkeys,
        },
        "passkeys_available": auth.relying_party is not None,
    }


async def api_me(request: web.Request) -> web.Response:
    session = await require_login(request, allow_partial=True)
    return web.json_response(await me_body(auth_of(request), session))


async def api_logout(request: web.Request) -> web.Response:
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
    # The second-factor routes build on this module; they are added here so that one call wires all.
    from broker.http.passkey_routes import setup_passkeys
    from broker.http.reauth import setup_reauth
    from broker.http.totp_routes import setup_totp

    setup_reauth(app)
    setup_totp(app)
    setup_passkeys(app)
