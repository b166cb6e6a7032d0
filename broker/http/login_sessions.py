"""Therapist login sessions: the cookie, the record behind it, CSRF, and the login throttle's use.

A login session is a random id in an ``HttpOnly; Secure; SameSite=Strict`` cookie named
``__Host-broker_login``. The store never holds that id, only an HMAC of it, so a dump of the
store (or of Redis) cannot be replayed as a cookie. A fresh id is made at every login and every
change of how the therapist logs in (a second factor set up, added or removed, new recovery
codes); an id is never reused or extended past its absolute lifetime. Each record carries its own
CSRF token, the account's sessions epoch it was made under (a password reset, a second-factor
change or a disable anywhere moves the epoch on and so ends it, see accounts/account_store.py), and
when the therapist last proved who they are (http/reauth.py).

The ``Secure`` attribute and the ``__Host-`` prefix need a secure origin. Browsers treat
``http://127.0.0.1`` and ``http://localhost`` as secure (Chromium accepts and sends such cookies
over plain http there), so the zero-setup loopback install works; anywhere else the broker must
sit behind TLS, which ``check_config`` already insists on.

Every state-changing request under ``/api/`` needs an allowed ``Origin``; every one except
``/api/login`` (which has no login session yet) also needs ``X-CSRF-Token`` equal to its login
session's token.
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
from typing import Any

import msgspec
from aiohttp import web
from aiohttp.typedefs import Middleware
from redis.exceptions import RedisError

from broker.accounts import account as acc
from broker.accounts.account_store import AccountStore
from broker.accounts.passkeys import RelyingParty
from broker.accounts.throttle import Decision, Throttle
from broker.audit.log import AuditEvent, AuditLog, AuditOutcome
from broker.config import Config, Keys
from broker.http.client_address import request_address_key
from broker.http.json_api import BadRequest, json_error
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


ENROLMENT_REQUIRED_MESSAGE = (
    "Your practice requires a second factor: set up an authenticator app or a passkey on the login page first."
)


class LoginRequired(web.HTTPUnauthorized):
    """No (full) login session: a JSON 401 that the pages turn into the login screen. For a partial
    session (the practice requires a second factor the account does not have yet) it says so, with
    ``enrolment_required``, instead of "Please log in."."""

    def __init__(self, *, enrolment: bool = False) -> None:
        answer: dict[str, Any] = {"error": "login_required", "message": "Please log in."}
        if enrolment:
            answer.update(message=ENROLMENT_REQUIRED_MESSAGE, enrolment_required=True)
        super().__init__(text=json.dumps(answer), content_type="application/json")


async def require_login(request: web.Request, *, allow_partial: bool = False) -> LoginSession:
    """The caller's login session, or a 401. Partial sessions (2FA enrolment pending) only if allowed."""
    session = await auth_of(request).session_of(request)
    if session is None:
        raise LoginRequired()
    if not session.full and not allow_partial:
        raise LoginRequired(enrolment=True)
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
    def middleware(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
        if not request.path.startswith("/api/"):
            return handler(request)  # without a frame of its own, which a WebSocket would keep all its life
        return api(request, handler)

    async def api(request: web.Request, handler: Handler) -> web.StreamResponse:
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
