"""Therapist login over HTTP: cookies, CSRF, throttling and lockout, TOTP, expiry, logout, secrets.

Most tests drive a small app (the security middleware plus ``setup_auth``) with a fake clock
shared by the store, the throttle and the login sessions, so idle and absolute expiry are
checked without waiting. One test drives Debian's Chromium against a full broker on
http://127.0.0.1 to show the ``Secure`` ``__Host-`` cookie works on the loopback install.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import pytest_asyncio
from aiohttp import ClientResponse, ClientSession, DummyCookieJar, web
from cryptography.hazmat.primitives.hashes import SHA1
from cryptography.hazmat.primitives.twofactor.totp import TOTP

from broker.accounts.account_store import AccountStore
from broker.accounts.passwords import ScryptParams
from broker.accounts.throttle import Throttle
from broker.accounts.throttle_memory import LoginThrottle
from broker.accounts.throttle_redis import RedisLoginThrottle
from broker.accounts.totp import code_at
from broker.audit.log import AuditLog, verify
from broker.config import Config, Keys
from broker.http.app import Broker, build_app, create_broker
from broker.http.dashboard import DASHBOARD, setup_dashboard
from broker.http.login import setup_auth
from broker.http.login_sessions import AUTH, CSRF_HEADER, LOGIN_COOKIE, WebAuth, accounts_path, login_required
from broker.http.security_headers import PrivateAccessLogger, security_middleware
from broker.store.memory import MemoryStore
from broker.store.redis_store import redis_client
from tests.redis_server import redis_server  # noqa: F401 - the fixture

pytestmark = pytest.mark.asyncio(loop_scope="session")

ORIGIN = "http://broker.test"
PASSWORD = "lantern orchard quietly 4791"
FAST = ScryptParams(n=2**10)
LOCKOUT = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class PolicyConfig(Config):
    """Config with the login settings web_auth reads (until Config itself has them)."""

    login_idle_s: float = 15 * 60
    login_absolute_s: float = 12 * 3600
    require_second_factor: bool = False


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Reply:
    status: int
    body: bytes
    headers: dict[str, str]
    cookies: list[str]

    def json(self) -> Any:
        import json

        return json.loads(self.body)


@dataclass
class Harness:
    url: str
    clock: Clock
    store: MemoryStore
    accounts: AccountStore
    throttle: Throttle
    audit: AuditLog
    data_dir: Path
    http: ClientSession
    runner: web.AppRunner

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        cookie: str | None = None,
        csrf: str | None = None,
        origin: str | None = ORIGIN,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        sent = dict(headers or {})
        if origin is not None:
            sent["Origin"] = origin
        if cookie is not None:
            sent["Cookie"] = f"{LOGIN_COOKIE}={cookie}"
        if csrf is not None:
            sent[CSRF_HEADER] = csrf
        async with self.http.request(method, self.url + path, json=json, headers=sent, allow_redirects=False) as r:
            return await _reply(r)

    async def login(self, username: str, password: str = PASSWORD, code: str | None = None, **kw: Any) -> Reply:
        body: dict[str, Any] = {"username": username, "password": password}
        if code is not None:
            body["code"] = code
        return await self.request("POST", "/api/login", json=body, **kw)

    async def logged_in(self, username: str, password: str = PASSWORD, code: str | None = None) -> tuple[str, str]:
        reply = await self.login(username, password, code)
        assert reply.status == 200, reply.body
        return login_cookie(reply), reply.json()["csrf"]

    def audit_events(self) -> list[str]:
        import json

        return [json.loads(line)["event"] for line in self.audit.path.read_text().splitlines()]


async def _reply(r: ClientResponse) -> Reply:
    body = await r.read()
    headers = {k: v for k, v in r.headers.items() if k.lower() not in ("date", "set-cookie")}
    return Reply(r.status, body, headers, r.headers.getall("Set-Cookie", []))


def login_cookie(reply: Reply) -> str:
    for raw in reply.cookies:
        name, _, rest = raw.partition("=")
        if name == LOGIN_COOKIE:
            return rest.split(";", 1)[0]
    raise AssertionError(f"no login cookie in {reply.cookies}")


def totp_code(secret_b32: str, now: float) -> str:
    secret = base64.b32decode(secret_b32 + "=" * (-len(secret_b32) % 8))
    return TOTP(secret, 6, SHA1(), 30).generate(int(now)).decode()


async def _protected(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


@pytest_asyncio.fixture(loop_scope="session")
async def make_harness(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    made: list[Harness] = []

    async def make(
        *,
        throttle_redis: str | None = None,
        clock: Clock | None = None,
        scrypt_params: ScryptParams = FAST,
        **config_fields: Any,
    ) -> Harness:
        """A harness; with ``throttle_redis`` its login counters live in that Redis (shared by
        every harness given the same URL, as by broker processes), and ``clock`` may be shared too."""
        data_dir = tmp_path / f"h{len(made)}"
        clock = clock or Clock()
        config = PolicyConfig(data_dir=data_dir, allowed_origins=(ORIGIN,), **config_fields)
        keys = Keys(b"k" * 32)
        store = MemoryStore(clock=clock)
        accounts = AccountStore(
            accounts_path(config), keys.accounts, scrypt_params=scrypt_params, lockout_after=LOCKOUT, clock=clock
        )
        schedule: dict[str, Any] = {"free_failures": 2, "base_delay": 10.0, "max_delay": 60.0, "lockout_after": LOCKOUT}
        throttle: Throttle
        if throttle_redis is not None:
            throttle = RedisLoginThrottle(redis_client(throttle_redis), clock=clock, **schedule)
        else:
            throttle = LoginThrottle(clock=clock, **schedule)
        audit = AuditLog(data_dir / "audit.log", keys.audit, clock=clock)
        app = web.Application(middlewares=[security_middleware(False)])
        setup_auth(
            app, store=store, accounts=accounts, throttle=throttle, audit=audit, config=config, keys=keys, clock=clock
        )
        app.router.add_get("/api/protected", login_required(_protected))
        runner = web.AppRunner(app, access_log_class=PrivateAccessLogger)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        http = ClientSession(cookie_jar=DummyCookieJar())
        harness = Harness(f"http://127.0.0.1:{port}", clock, store, accounts, throttle, audit, data_dir, http, runner)
        made.append(harness)
        return harness

    yield make
    for h in made:
        await h.http.close()
        await h.runner.cleanup()
        await h.accounts.close()
        h.audit.close()
        if isinstance(h.throttle, RedisLoginThrottle):
            await h.throttle.redis.aclose(close_connection_pool=True)


# ---------------------------------------------------------------- cookies and sessions


async def test_login_sets_a_hardened_session_cookie(make_harness: Any) -> None:
    h = await make_harness()
    therapist = await h.accounts.add("robin", PASSWORD, "Robin Example")
    reply = await h.login("robin")
    assert reply.status == 200
    [raw] = reply.cookies
    name, _, rest = raw.partition("=")
    attributes = {a.strip().split("=")[0].lower(): a.strip() for a in rest.split(";")[1:]}
    assert name == "__Host-broker_login"
    assert {"httponly", "secure", "samesite", "path"} <= set(attributes)
    assert attributes["samesite"] == "SameSite=Strict" and attributes["path"] == "Path=/"
    assert "domain" not in attributes and "max-age" not in attributes  # __Host- rules; ends with the browser
    body = reply.json()
    assert body["therapist"]["id"] == therapist and body["enrolment_required"] is False
    assert len(body["csrf"]) >= 40

    me = await h.request("GET", "/api/me", cookie=login_cookie(reply))
    assert me.status == 200
    assert me.json()["csrf"] == body["csrf"] and me.json()["therapist"]["username"] == "robin"
    assert (await h.request("GET", "/api/me")).status == 401
    assert (await h.request("GET", "/api/me", cookie="forged-session-id")).status == 401
    assert h.audit_events() == ["login_success"]


async def test_every_login_gets_a_new_session_id_and_ends_the_old_one(make_harness: Any) -> None:
    h = await make_harness()
    await h.accounts.add("robin", PASSWORD)
    first, _ = await h.logged_in("robin")
    again = await h.login("robin", cookie=first)
    second = login_cookie(again)
    assert second != first
    assert (await h.request("GET", "/api/me", cookie=first)).status == 401
    assert (await h.request("GET", "/api/me", cookie=second)).status == 200


async def test_store_keeps_only_a_keyed_hash_of_the_session_id(make_harness: Any) -> None:
    h = await make_harness()
    await h.accounts.add("robin", PASSWORD)
    cookie, csrf = await h.logged_in("robin")
    keys = await h.store.keys("")
    assert keys and all(cookie not in k for k in keys)
    for k in keys:
        assert cookie.encode() not in (await h.store.get(k) or b"")


async def test_logout_invalidates_server_side(make_harness: Any) -> None:
    h = await make_harness()
    await h.accounts.add("robin", PASSWORD)
    cookie, csrf = await h.logged_in("robin")
    out = await h.request("POST", "/api/logout", json={}, cookie=cookie, csrf=csrf)
    assert out.status == 200
    assert any(c.partition("=")[0] == LOGIN_COOKIE and "Max-Age=0" in c and "Secure" in c for c in out.cookies)
    # A copy of the old cookie (say, kept by malware) is worthless now.
    assert (await h.request("GET", "/api/me", cookie=cookie)).status == 401
    assert (await h.request("POST", "/api/logout", json={}, cookie=cookie, csrf=csrf)).status == 401
    assert await h.store.keys("login:") == []
    assert h.audit_events() == ["login_success", "logout"]


async def test_idle_expiry_and_background_requests_do_not_extend_it(make_harness: Any) -> None:
    h = await make_harness(login_idle_s=600)
    await h.accounts.add("robin", PASSWORD)
    cookie, _ = await h.logged_in("robin")
    for _ in range(3):  # activity keeps it alive well past one idle period
        h.clock.advance(590)
        assert (await h.request("GET", "/api/me", cookie=cookie)).status == 200
    h.clock.advance(590)
    background = {"X-Broker-Background": "1"}
    assert (await h.request("GET", "/api/me", cookie=cookie, headers=background)).status == 200
    h.clock.advance(20)  # 610 s since the last real activity
    assert (await h.request("GET", "/api/me", cookie=cookie)).status == 401


async def test_absolute_expiry_despite_activity(make_harness: Any) -> None:
    h = await make_harness(login_idle_s=900, login_absolute_s=3600)
    await h.accounts.add("robin", PASSWORD)
    cookie, _ = await h.logged_in("robin")
    for _ in range(7):
        h.clock.advance(500)
        assert (await h.request("GET", "/api/me", cookie=cookie)).status == 200
    h.clock.advance(200)  # 3700 s after login
    assert (await h.request("GET", "/api/me", cookie=cookie)).status == 401


async def test_disabled_account_loses_its_open_login(make_harness: Any) -> None:
    h = await make_harness()
    therapist = await h.accounts.add("robin", PASSWORD)
    cookie, _ = await h.logged_in("robin")
    await h.accounts.disable(therapist)
    assert (await h.request("GET", "/api/me", cookie=cookie)).status == 401
    assert (await h.login("robin")).status == 401


#: Everything that must end a therapist's login sessions, done through AccountStore as the CLI
#: or another broker process does it.
ENDING_CHANGES = [
    "reset_password", "reset_2fa", "disable", "totp_confirmed", "passkey_added", "passkey_removed", "recovery_codes",
]  # fmt: skip


@pytest.mark.parametrize("change", ENDING_CHANGES)
async def test_a_change_made_elsewhere_ends_every_login_session(make_harness: Any, change: str) -> None:
    """Review finding 3: login sessions survived `broker therapist reset-password` and `reset-2fa`.
    Any change of password or second factors, or a disable, now ends every session of the account
    at its next request (the account's sessions epoch moved on), in whichever process it was made."""
    h = await make_harness()
    tid = await h.accounts.add("robin", PASSWORD)
    codes: list[str] = []
    if change in ("reset_2fa", "passkey_added", "passkey_removed", "recovery_codes"):
        enrolment = await h.accounts.enable_totp(tid, "Practice")
        codes = await h.accounts.confirm_totp(tid, code_at(enrolment.secret, h.clock())) or []
    if change == "passkey_removed":
        await h.accounts.add_passkey(tid, {"id": "cred-a", "public_key": "pk", "sign_count": 0})
    sessions = [await h.logged_in("robin", code=codes[i] if codes else None) for i in range(2)]
    for cookie, _ in sessions:
        assert (await h.request("GET", "/api/protected", cookie=cookie)).status == 200

    if change == "reset_password":
        await h.accounts.reset_password(tid, "a completely new passphrase 8812")
    elif change == "reset_2fa":
        await h.accounts.reset_2fa(tid)
    elif change == "disable":
        await h.accounts.disable(tid)
        await h.accounts.enable(tid)  # enabled again at once: the old sessions stay over
    elif change == "totp_confirmed":
        enrolment = await h.accounts.enable_totp(tid, "Practice")
        assert await h.accounts.confirm_totp(tid, code_at(enrolment.secret, h.clock()))
    elif change == "passkey_added":
        await h.accounts.add_passkey(tid, {"id": "cred-b", "public_key": "pk", "sign_count": 0})
    elif change == "passkey_removed":
        assert await h.accounts.remove_passkey(tid, "cred-a")
    else:
        await h.accounts.new_recovery_codes(tid)

    for cookie, csrf in sessions:
        assert (await h.request("GET", "/api/me", cookie=cookie)).status == 401
        assert (await h.request("GET", "/api/protected", cookie=cookie)).status == 401
        assert (await h.request("POST", "/api/logout", json={}, cookie=cookie, csrf=csrf)).status == 401
    assert await h.store.keys("login:") == []  # looked at once, gone from the store


async def test_a_session_made_before_a_racing_password_reset_does_not_survive_it(make_harness: Any) -> None:
    """The epoch a login session gets is the one read with the password it checked: a reset landing
    between the check and the session's creation still ends it."""
    h = await make_harness()
    tid = await h.accounts.add("robin", PASSWORD)
    checked = await h.accounts.verify_login("robin", PASSWORD, None, require_second_factor=False)
    await h.accounts.reset_password(tid, "a completely new passphrase 8812")
    auth: WebAuth = h.runner.app[AUTH]
    session = await auth.create(tid, full=True, epoch=checked.sessions_epoch)
    assert await auth.load(session.id) is None


# ---------------------------------------------------------------- CSRF


async def test_csrf_token_and_origin_are_required_on_state_changes(make_harness: Any) -> None:
    h = await make_harness()
    await h.accounts.add("robin", PASSWORD)
    cookie, csrf = await h.logged_in("robin")
    refused = [
        await h.request("POST", "/api/logout", json={}, cookie=cookie),  # no token
        await h.request("POST", "/api/logout", json={}, cookie=cookie, csrf="wrong" + csrf[5:]),
        await h.request("POST", "/api/logout", json={}, cookie=cookie, csrf=""),
        await h.request("POST", "/api/logout", json={}, cookie=cookie, csrf=csrf, origin="https://evil.example"),
        await h.request("POST", "/api/logout", json={}, cookie=cookie, csrf=csrf, origin=None),
        await h.request("POST", "/api/logout", json={}, cookie=cookie, csrf=csrf, origin="null"),
        await h.request("POST", "/api/logout", json={}, cookie=cookie, csrf=csrf, origin=ORIGIN + ".evil.example"),
        await h.request("POST", "/api/2fa/enrol", json={}, cookie=cookie, origin="https://evil.example"),
        await h.request("DELETE", "/api/me", cookie=cookie, csrf=csrf, origin="https://evil.example"),
    ]
    assert [r.status for r in refused] == [403] * len(refused)
    assert all(r.json()["error"] == "forbidden" for r in refused)
    # Nothing happened: the session is still there, and no enrolment was started.
    me = await h.request("GET", "/api/me", cookie=cookie)
    assert me.status == 200 and me.json()["therapist"]["totp_enabled"] is False
    # Another login session's token does not work for this one.
    _, other_csrf = await h.logged_in("robin")
    assert (await h.request("POST", "/api/logout", json={}, cookie=cookie, csrf=other_csrf)).status == 403
    assert (await h.request("POST", "/api/logout", json={}, cookie=cookie, csrf=csrf)).status == 200


async def test_login_itself_needs_an_allowed_origin(make_harness: Any) -> None:
    h = await make_harness()
    await h.accounts.add("robin", PASSWORD)
    for origin in ("https://evil.example", None, "null"):
        reply = await h.login("robin", origin=origin)
        assert reply.status == 403 and not reply.cookies
    assert h.audit_events() == []


async def test_malformed_login_bodies_are_plain_400s(make_harness: Any) -> None:
    h = await make_harness()
    bad = [
        await h.request("POST", "/api/login", json={"username": "robin"}),
        await h.request("POST", "/api/login", json={"username": "robin", "password": "x", "admin": True}),
        await h.request("POST", "/api/login", json={"username": "r" * 300, "password": "x"}),
        await h.request("POST", "/api/login", headers={"Content-Type": "text/plain"}, json=None),
    ]
    assert [r.status for r in bad] == [400] * 4
    assert all(r.json()["error"] == "bad_request" for r in bad)


# ---------------------------------------------------------------- failures, throttling, lockout


async def test_unknown_user_and_wrong_password_are_byte_identical(make_harness: Any) -> None:
    h = await make_harness()
    disabled = await h.accounts.add("dormant", PASSWORD)
    await h.accounts.disable(disabled)
    await h.accounts.add("robin", PASSWORD)
    unknown = await h.login("nobody-here", "whatever it is 123")
    wrong = await h.login("robin", "whatever it is 123")
    off = await h.login("dormant", PASSWORD)
    assert unknown.status == wrong.status == off.status == 401
    assert unknown.body == wrong.body == off.body
    assert unknown.headers == wrong.headers == off.headers
    assert unknown.cookies == wrong.cookies == off.cookies == []
    # The throttle counts both alike, so later answers stay identical too.
    for _ in range(2):
        unknown = await h.login("nobody-here", "whatever it is 123", headers={"X-Forwarded-For": "ignored"})
        wrong = await h.login("robin", "whatever it is 123")
    assert (unknown.status, unknown.body) == (wrong.status, wrong.body)


async def test_growing_delay_then_lockout_until_an_admin_unlocks(make_harness: Any) -> None:
    h = await make_harness()
    therapist = await h.accounts.add("robin", PASSWORD)
    # Two free failures, then each failure makes the next attempt wait longer.
    assert (await h.login("robin", "nope nope nope 1")).status == 401
    assert (await h.login("robin", "nope nope nope 2")).status == 401
    assert (await h.login("robin", "nope nope nope 3")).status == 401
    waits = []
    for attempt in range(4, LOCKOUT + 1):
        blocked = await h.login("robin", PASSWORD)  # even the right password must wait
        assert blocked.status == 429 and blocked.json()["error"] == "too_many_attempts"
        assert blocked.headers["Retry-After"] == str(blocked.json()["retry_after"])
        waits.append(blocked.json()["retry_after"])
        h.clock.advance(blocked.json()["retry_after"])
        assert (await h.login("robin", f"nope nope nope {attempt}")).status == 401
    assert waits == sorted(waits) and waits[0] < waits[-1]
    h.clock.advance(3600)
    locked = await h.login("robin", PASSWORD)
    assert locked.status == 429 and locked.json()["error"] == "locked"
    assert (await h.accounts.get(therapist)).locked  # type: ignore[union-attr]
    assert "login_locked" in h.audit_events()
    # broker therapist unlock (the durable record) lifts this process's lock too.
    await h.accounts.unlock(therapist)
    assert (await h.login("robin", PASSWORD)).status == 200


async def test_one_address_trying_many_names_is_slowed_down(make_harness: Any) -> None:
    h = await make_harness()
    await h.accounts.add("robin", PASSWORD)
    for i in range(3):
        assert (await h.login(f"guess{i}", "some password 1234")).status == 401
    # A name never tried before: the address's own count applies.
    slowed = await h.login("robin", PASSWORD)
    assert slowed.status == 429 and slowed.json()["error"] == "too_many_attempts"
    h.clock.advance(slowed.json()["retry_after"])
    assert (await h.login("robin", PASSWORD)).status == 200


GUESSING_DB = 11
#: A password check that takes a while (some 50 ms), as a real one does: guesses sent together are
#: then really in flight together, which is when checking before counting let them all through.
SLOWER = ScryptParams(n=2**15)


async def guessing_targets(kind: str, make_harness: Any, request: pytest.FixtureRequest) -> list[Harness]:
    """One broker ("memory"), one on a real Redis throttle ("redis"), or two on one Redis standing
    for two processes ("two-processes"); every one of them has the account "robin"."""
    if kind == "memory":
        targets = [await make_harness(scrypt_params=SLOWER)]
    else:
        server = request.getfixturevalue("redis_server")
        url = server.empty_database(GUESSING_DB)
        clock = Clock()
        count = 2 if kind == "two-processes" else 1
        targets = [await make_harness(throttle_redis=url, clock=clock, scrypt_params=SLOWER) for _ in range(count)]
    for h in targets:
        await h.accounts.add("robin", PASSWORD)
    return targets


@pytest.mark.parametrize("kind", ["memory", "redis", "two-processes"])
async def test_concurrent_guesses_for_one_name_beyond_the_schedule_get_429_unchecked(
    make_harness: Any, request: pytest.FixtureRequest, kind: str
) -> None:
    """Review finding 2: the throttle was checked before scrypt and counted after it, so 100
    simultaneous guesses were all evaluated. Now each attempt is counted before its password check:
    two free failures and the attempt after them run, every other one answers 429 unchecked."""
    targets = await guessing_targets(kind, make_harness, request)
    replies = await asyncio.gather(
        *(targets[i % len(targets)].login("robin", f"guess number {i} of many") for i in range(100))
    )
    statuses = sorted(r.status for r in replies)
    assert statuses == [401] * 3 + [429] * 97
    assert {r.json()["error"] for r in replies if r.status == 429} == {"too_many_attempts"}
    # Exactly three passwords were checked: the durable per-account counts say so.
    checked = 0
    for h in targets:
        account = await h.accounts.get_by_username("robin")
        row = await h.accounts.rows.by_id(account.id)  # type: ignore[union-attr]
        checked += row["failures"]  # type: ignore[index]
    assert checked == 3


@pytest.mark.parametrize("kind", ["memory", "redis", "two-processes"])
async def test_concurrent_guesses_from_one_address_during_a_due_delay_get_one_check(
    make_harness: Any, request: pytest.FixtureRequest, kind: str
) -> None:
    targets = await guessing_targets(kind, make_harness, request)
    first = targets[0]
    for i in range(3):
        assert (await first.login(f"warmup{i}", "some password 1234")).status == 401
    waiting = await first.login("robin", PASSWORD)
    assert waiting.status == 429
    first.clock.advance(waiting.json()["retry_after"])  # the delay is due: one attempt may run
    replies = await asyncio.gather(
        *(targets[i % len(targets)].login(f"name{i:02d}", "some password 1234") for i in range(40))
    )
    assert sorted(r.status for r in replies) == [401] + [429] * 39


# ---------------------------------------------------------------- second factor


async def _enrol(h: Harness, cookie: str, csrf: str) -> tuple[Reply, str]:
    started = await h.request("POST", "/api/2fa/enrol", json={}, cookie=cookie, csrf=csrf)
    assert started.status == 200, started.body
    data = started.json()
    assert data["qr_svg"].startswith("<svg") and data["qr_data_uri"].startswith("data:image/svg+xml")
    uri = urlsplit(data["uri"])
    assert uri.scheme == "otpauth" and parse_qs(uri.query)["secret"] == [data["secret"]]
    confirmed = await h.request(
        "POST", "/api/2fa/confirm", json={"code": totp_code(data["secret"], h.clock())}, cookie=cookie, csrf=csrf
    )
    return confirmed, data["secret"]


async def test_totp_enrolment_and_login(make_harness: Any) -> None:
    h = await make_harness()
    await h.accounts.add("robin", PASSWORD)
    cookie, csrf = await h.logged_in("robin")
    wrong = await h.request("POST", "/api/2fa/confirm", json={"code": "000000"}, cookie=cookie, csrf=csrf)
    assert wrong.status == 400 and wrong.json()["error"] in ("invalid_code", "bad_request")
    confirmed, secret = await _enrol(h, cookie, csrf)
    assert confirmed.status == 200
    codes = confirmed.json()["recovery_codes"]
    assert len(codes) == 10 and len(set(codes)) == 10
    fresh = login_cookie(confirmed)  # new privileges, new id
    assert fresh != cookie and (await h.request("GET", "/api/me", cookie=cookie)).status == 401
    me = await h.request("GET", "/api/me", cookie=fresh)
    assert me.json()["therapist"]["totp_enabled"] is True and me.json()["therapist"]["recovery_codes_left"] == 10
    again = await h.request("POST", "/api/2fa/enrol", json={}, cookie=fresh, csrf=confirmed.json()["csrf"])
    assert again.status == 409

    needs = await h.login("robin")
    assert needs.status == 401 and needs.json()["error"] == "second_factor_required" and not needs.cookies
    # The code spent on confirmation cannot be replayed within its window.
    replay = await h.login("robin", code=totp_code(secret, h.clock()))
    assert replay.status == 401 and replay.json()["error"] == "invalid_credentials"
    h.clock.advance(30)
    assert (await h.login("robin", code=totp_code(secret, h.clock()))).status == 200
    assert (await h.login("robin", "wrong password 12345", code=totp_code(secret, h.clock() + 30))).status == 401
    assert h.audit_events().count("second_factor_changed") == 1


async def test_a_change_through_the_web_renews_its_own_session_and_ends_the_others(make_harness: Any) -> None:
    """Finding 3 through the web: confirming an authenticator app, then asking for new recovery
    codes, each end every other session of the therapist; the session that made the change gets
    a fresh cookie and CSRF token and stays logged in."""
    h = await make_harness()
    await h.accounts.add("robin", PASSWORD)
    mine, my_csrf = await h.logged_in("robin")
    other, _ = await h.logged_in("robin")  # say, a browser left open at the office
    confirmed, secret = await _enrol(h, mine, my_csrf)
    assert confirmed.status == 200
    mine, my_csrf = login_cookie(confirmed), confirmed.json()["csrf"]
    assert (await h.request("GET", "/api/protected", cookie=mine)).status == 200
    assert (await h.request("GET", "/api/me", cookie=other)).status == 401

    old_codes = confirmed.json()["recovery_codes"]
    other, _ = await h.logged_in("robin", code=old_codes[0])
    renewed = await h.request("POST", "/api/recovery-codes", json={}, cookie=mine, csrf=my_csrf)
    assert renewed.status == 200, renewed.body
    new_codes = renewed.json()["recovery_codes"]
    assert len(new_codes) == 10 and not set(new_codes) & set(old_codes)
    assert login_cookie(renewed) != mine and renewed.json()["csrf"] != my_csrf
    assert (await h.request("GET", "/api/protected", cookie=login_cookie(renewed))).status == 200
    assert (await h.request("GET", "/api/me", cookie=mine)).status == 401
    assert (await h.request("GET", "/api/me", cookie=other)).status == 401
    assert (await h.login("robin", code=old_codes[1])).status == 401  # the old codes stopped working
    assert (await h.login("robin", code=new_codes[0])).status == 200


async def test_recovery_code_works_once(make_harness: Any) -> None:
    h = await make_harness()
    await h.accounts.add("robin", PASSWORD)
    cookie, csrf = await h.logged_in("robin")
    confirmed, _ = await _enrol(h, cookie, csrf)
    code = confirmed.json()["recovery_codes"][3]
    used = await h.login("robin", code=code.lower().replace("-", " "))
    assert used.status == 200 and used.json()["therapist"]["recovery_codes_left"] == 9
    assert "recovery_code_used" in h.audit_events()
    again = await h.login("robin", code=code)
    assert again.status == 401 and again.json()["error"] == "invalid_credentials"


async def test_policy_can_require_a_second_factor_for_everyone(make_harness: Any) -> None:
    h = await make_harness(require_second_factor=True)
    await h.accounts.add("robin", PASSWORD)
    partial = await h.login("robin")
    assert partial.status == 200 and partial.json()["enrolment_required"] is True
    cookie, csrf = login_cookie(partial), partial.json()["csrf"]
    # Until enrolment is done, only the enrolment routes work, and the refusal says why.
    refused = await h.request("GET", "/api/protected", cookie=cookie)
    assert refused.status == 401 and refused.json()["error"] == "login_required"
    assert refused.json()["enrolment_required"] is True
    assert "requires a second factor" in refused.json()["message"]
    assert (await h.request("GET", "/api/me", cookie=cookie)).status == 200
    assert "login_success" not in h.audit_events()
    confirmed, _ = await _enrol(h, cookie, csrf)
    assert confirmed.status == 200 and confirmed.json()["enrolment_required"] is False
    full = login_cookie(confirmed)
    assert (await h.request("GET", "/api/protected", cookie=full)).status == 200
    assert (await h.request("GET", "/api/me", cookie=cookie)).status == 401
    assert h.audit_events() == ["second_factor_changed", "login_success"]


async def test_guessing_enrolment_codes_locks_the_account_until_an_admin_unlocks_it(make_harness: Any) -> None:
    """Someone with the password cannot guess confirmation codes forever: the guesses count towards
    the durable lockout, and the administrator's unlock lifts the confirmation lock as well."""
    h = await make_harness(require_second_factor=True)
    tid = await h.accounts.add("robin", PASSWORD)
    partial = await h.login("robin")
    cookie, csrf = login_cookie(partial), partial.json()["csrf"]
    enrolled = await h.request("POST", "/api/2fa/enrol", json={}, cookie=cookie, csrf=csrf)
    assert enrolled.status == 200
    answers = []
    for _ in range(LOCKOUT):
        h.clock.advance(61)  # wait out the growing delay: only the count matters here
        reply = await h.request("POST", "/api/2fa/confirm", json={"code": "000000"}, cookie=cookie, csrf=csrf)
        answers.append(reply.status)
    assert answers == [400] * LOCKOUT
    h.clock.advance(61)
    locked = await h.request("POST", "/api/2fa/confirm", json={"code": "000000"}, cookie=cookie, csrf=csrf)
    assert locked.status == 429 and locked.json()["error"] == "locked"
    assert (await h.accounts.get(tid)).locked  # type: ignore[union-attr]
    assert (await h.login("robin")).status in (401, 429)  # the password alone no longer gets in either

    await h.accounts.unlock(tid)  # what `broker therapist unlock` does
    retry = await h.request("POST", "/api/2fa/confirm", json={"code": "000000"}, cookie=cookie, csrf=csrf)
    assert retry.status == 400 and retry.json()["error"] == "invalid_code"
    assert (await h.accounts.rows.by_id(tid))["failures"] == 1  # type: ignore[index]
    # The right code at last: the count of consecutive failures starts again.
    h.clock.advance(61)
    code = totp_code(enrolled.json()["secret"], h.clock())
    done = await h.request("POST", "/api/2fa/confirm", json={"code": code}, cookie=cookie, csrf=csrf)
    assert done.status == 200
    assert (await h.accounts.rows.by_id(tid))["failures"] == 0  # type: ignore[index]


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_concurrent_confirmation_codes_beyond_the_schedule_get_429_unchecked(
    make_harness: Any, request: pytest.FixtureRequest, kind: str
) -> None:
    """Finding 2 for the second-factor confirmation: guesses sent at once are counted before they
    are checked, so three are checked and the rest wait."""
    throttle_redis = request.getfixturevalue("redis_server").empty_database(GUESSING_DB) if kind == "redis" else None
    h = await make_harness(require_second_factor=True, throttle_redis=throttle_redis)
    tid = await h.accounts.add("robin", PASSWORD)
    partial = await h.login("robin")
    cookie, csrf = login_cookie(partial), partial.json()["csrf"]
    enrolled = await h.request("POST", "/api/2fa/enrol", json={}, cookie=cookie, csrf=csrf)
    right = totp_code(enrolled.json()["secret"], h.clock())
    wrong = [f"{(int(right) + i) % 1_000_000:06d}" for i in range(500_000, 500_030)]
    replies = await asyncio.gather(
        *(h.request("POST", "/api/2fa/confirm", json={"code": c}, cookie=cookie, csrf=csrf) for c in wrong)
    )
    assert sorted(r.status for r in replies) == [400] * 3 + [429] * 27
    assert (await h.accounts.rows.by_id(tid))["failures"] == 3  # type: ignore[index]


# ---------------------------------------------------------------- nothing secret is kept


async def test_canary_password_and_address_never_logged_or_stored(
    make_harness: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    canary = "Canary-Pw-7f3a9c1e-never-store"
    name = "canaryuser7f3a"
    h = await make_harness()
    await h.accounts.add(name, canary)
    cookie, csrf = await h.logged_in(name, canary)
    await _enrol(h, cookie, csrf)
    await h.login(name, canary + "-typo")
    await h.login("canary-unknown-7f3a", canary)
    await h.login(name, canary)  # second factor required now

    assert canary not in caplog.text and name not in caplog.text and "127.0.0.1" not in caplog.text
    stored = b"".join([k.encode() + (await h.store.get(k) or b"") for k in await h.store.keys("")])
    files = b"".join(p.read_bytes() for p in h.data_dir.rglob("*") if p.is_file())
    for blob in (stored, files):
        assert canary.encode() not in blob and canary.encode("utf-16-le") not in blob
        assert name.encode() not in blob and b"127.0.0.1" not in blob
    # Including whatever SQLite still has in free pages.
    with sqlite3.connect(accounts_path_of(h)) as db:
        dump = "\n".join(db.iterdump())
    assert canary not in dump and name not in dump
    assert verify(h.audit.path, Keys(b"k" * 32).audit).ok


def accounts_path_of(h: Harness) -> Path:
    return h.data_dir / "accounts.sqlite3"


# ---------------------------------------------------------------- bodies nested too deeply

#: Every API route that reads a JSON body, with a field of it a decoder would walk into.
JSON_ROUTES = [
    ("/api/login", "passkey"),
    ("/api/login", "username"),
    ("/api/2fa/enrol", "x"),
    ("/api/2fa/confirm", "code"),
    ("/api/recovery-codes", "x"),
    ("/api/reauth", "passkey"),
    ("/api/passkeys/options", "x"),
    ("/api/passkeys", "credential"),
    ("/api/passkeys/remove", "id"),
    ("/api/sessions", "clients"),
]


def nested(depth: int, kind: str) -> str:
    return '{"a":' * depth + "1" + "}" * depth if kind == "object" else "[" * depth + "]" * depth


async def test_bodies_nested_2000_deep_are_400_on_every_json_route(tmp_path: Path) -> None:
    """Review finding 10: a login body nested 2,000 deep answered 500 (RecursionError). Every route
    reading JSON now refuses nesting past 32 levels with 400 ``bad_request``, and keeps serving."""
    full = await start_full_broker(tmp_path / "data")
    try:
        await full.auth.accounts.add("robin", PASSWORD)
        async with ClientSession(cookie_jar=DummyCookieJar()) as http:
            origin = {"Origin": full.url, "Content-Type": "application/json"}
            async with http.post(
                full.url + "/api/login", json={"username": "robin", "password": PASSWORD}, headers={"Origin": full.url}
            ) as r:
                assert r.status == 200
                headers = {**origin, "Cookie": f"{LOGIN_COOKIE}={r.cookies[LOGIN_COOKIE].value}",
                           CSRF_HEADER: (await r.json())["csrf"]}  # fmt: skip
            for path, field in JSON_ROUTES:
                for kind in ("object", "array"):
                    for body in (f'{{"{field}":{nested(2000, kind)}}}', nested(2000, kind)):
                        async with http.post(full.url + path, data=body, headers=headers) as r:
                            assert r.status == 400, (path, field, kind, r.status, await r.text())
                            answer = await r.json()
                            assert answer["error"] == "bad_request" and "too deeply" in answer["message"]
            # 31 levels inside the body (32 with it) pass the depth check, to be refused for what they say
            # (here: no passkeys on an IP address).
            async with http.post(full.url + "/api/passkeys", data=f'{{"credential":{nested(31, "object")}}}',
                                 headers=headers) as r:  # fmt: skip
                assert r.status == 409 and (await r.json())["error"] == "passkeys_unavailable"
            async with http.post(full.url + "/api/passkeys", data=f'{{"credential":{nested(32, "object")}}}',
                                 headers=headers) as r:  # fmt: skip
                assert r.status == 400 and "too deeply" in (await r.json())["message"]
            # Brackets inside strings are text, not nesting.
            async with http.post(full.url + "/api/login", json={"username": "robin", "password": "[{" * 300},
                                 headers=origin) as r:  # fmt: skip
                assert r.status == 401 and (await r.json())["error"] == "invalid_credentials"
            async with http.get(full.url + "/api/me", headers=headers) as r:
                assert r.status == 200  # the process still serves, the login session still works
    finally:
        await full.stop()


# ---------------------------------------------------------------- the real thing, in Chromium


@dataclass
class FullBroker:
    """A real broker with the login and dashboard wired in, on a free loopback port."""

    url: str
    broker: Broker
    app: web.Application
    runner: web.AppRunner
    owned: list[Any] = field(default_factory=list)

    @property
    def auth(self) -> WebAuth:
        return self.app[AUTH]

    async def stop(self) -> None:
        await self.broker.hub.shutdown(after_ms=0)
        await self.runner.cleanup()
        await self.broker.close()
        for thing in self.owned:
            thing.close()


def wire(app: web.Application, broker: Broker, *, throttle: LoginThrottle | None = None) -> list[Any]:
    """Call our setup functions unless build_app already did; returns what we opened."""
    owned: list[Any] = []
    if AUTH not in app:
        config = broker.config
        accounts = AccountStore(accounts_path(config), broker.keys.accounts, scrypt_params=FAST)
        audit = AuditLog(Path(config.data_dir) / "audit.log", broker.keys.audit)
        owned += [accounts, audit]
        setup_auth(
            app,
            store=broker.store,
            accounts=accounts,
            throttle=throttle or LoginThrottle(),
            audit=audit,
            config=config,
            keys=broker.keys,
        )
    if DASHBOARD not in app:
        setup_dashboard(app, hub=broker.hub, store=broker.store)
    return owned


async def start_full_broker(data_dir: Path, *, config_class: type[Config] = Config, **overrides: Any) -> FullBroker:
    port = free_port()
    settings: dict[str, Any] = {"data_dir": data_dir, "host": "127.0.0.1", "port": port}
    settings.update(overrides)
    config = dataclasses.replace(config_class(), **settings)
    broker = await create_broker(config)
    app = build_app(broker)
    owned = wire(app, broker)
    runner = web.AppRunner(app, access_log_class=PrivateAccessLogger)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return FullBroker(f"http://127.0.0.1:{port}", broker, app, runner, owned)


CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.mark.browser
async def test_chromium_keeps_the_secure_host_cookie_on_plain_http_loopback(tmp_path: Path) -> None:
    from playwright.async_api import async_playwright

    full = await start_full_broker(tmp_path / "data")
    await full.auth.accounts.add("robin", PASSWORD, "Robin Example")
    try:
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS)
            page = await browser.new_page()
            await page.goto(full.url + "/login")
            await page.get_by_label("Login name").fill("robin")
            await page.get_by_label("Password").fill("not the password 123")
            await page.get_by_role("button", name="Log in").click()
            await page.get_by_role("alert").filter(has_text="not right").wait_for()
            await page.get_by_label("Password").fill(PASSWORD)
            await page.keyboard.press("Enter")
            # No second factor yet: one is offered first, and can be left for later.
            await page.get_by_role("heading", name="Protect your account with a second factor").wait_for()
            await page.get_by_role("button", name="Not now").click()
            await page.wait_for_url(full.url + "/dashboard")
            await page.get_by_text("Logged in as Robin Example").wait_for()
            [cookie] = await page.context.cookies()
            assert cookie["name"] == LOGIN_COOKIE and cookie["secure"] and cookie["httpOnly"]
            assert cookie["sameSite"] == "Strict" and cookie["path"] == "/"
            assert await page.evaluate("document.cookie") == ""  # out of reach of scripts
            await page.get_by_role("button", name="Log out").click()
            await page.wait_for_url(full.url + "/login?reason=logout")
            await page.get_by_text("You have logged out.").wait_for()
            await page.goto(full.url + "/dashboard")
            assert urlsplit(page.url).path == "/login"
            await browser.close()
    finally:
        await full.stop()


@pytest.mark.browser
async def test_chromium_second_factor_enrolment_when_the_policy_requires_it(tmp_path: Path) -> None:
    from playwright.async_api import async_playwright

    full = await start_full_broker(tmp_path / "data", config_class=PolicyConfig, require_second_factor=True)
    await full.auth.accounts.add("robin", PASSWORD)
    try:
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS)
            page = await browser.new_page()
            await page.goto(full.url + "/login")
            await page.get_by_label("Login name").fill("robin")
            await page.get_by_label("Password").fill(PASSWORD)
            await page.get_by_role("button", name="Log in").click()
            await page.get_by_role("heading", name="Set up your second factor").wait_for()
            await page.get_by_role("img", name="QR code for your authenticator app").wait_for()
            # No dashboard before the second factor is set up.
            async with page.expect_navigation():
                await page.evaluate("location.href = '/dashboard'")
            assert urlsplit(page.url).path == "/login"
            await page.get_by_role("heading", name="Set up your second factor").wait_for()
            await page.get_by_text("Cannot scan?").click()
            secret = (await page.locator("#enrol-secret").text_content() or "").replace(" ", "")
            await page.get_by_label("Code shown by the app").fill("123")
            await page.get_by_role("button", name="Confirm").click()
            await page.get_by_role("alert").filter(has_text="six digits").wait_for()
            await page.get_by_label("Code shown by the app").fill(totp_code(secret, time.time()))
            await page.get_by_role("button", name="Confirm").click()
            await page.get_by_role("heading", name="Your recovery codes").wait_for()
            assert await page.locator("#recovery-codes li").count() == 10
            await page.get_by_role("button", name="I have stored them").click()
            await page.wait_for_url(full.url + "/dashboard")
            await page.locator("body[data-ready=true]").wait_for()
            assert await page.locator("#setup-2fa").is_hidden()
            await browser.close()
    finally:
        await full.stop()


#: Fills the login form as a person would and asks the browser to send it; whether it was held back.
SUBMIT_LOGIN_FORM = """() => {
  const form = document.getElementById('login-form');
  form.elements.username.value = 'robin';
  form.elements.password.value = 'typed while the page could not work';
  let held = null;
  window.addEventListener('submit', (event) => { held = event.defaultPrevented; }, { once: true });
  form.requestSubmit();
  return held;
}"""


@pytest.mark.browser
async def test_chromium_login_page_whose_modules_did_not_arrive_tries_again_then_says_reload(tmp_path: Path) -> None:
    """A module lost on the way (here: i18n.js refused once, as a network change fails requests in
    flight) leaves login.js unrun; the boot guard reloads the page once (a GET: the page is never
    the answer to a form, so nothing is sent again) and it works. Lost every time, the page says to
    reload instead of showing a form that does nothing, leaves no flag behind, and the browser
    does not send the form itself: a GET would put the password in the address."""
    from playwright.async_api import async_playwright, expect

    from tests.browser.kit import BOOT_RETRIED, refuse_module

    full = await start_full_broker(tmp_path / "data")
    await full.auth.accounts.add("robin", PASSWORD)
    try:
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS)
            once = await browser.new_page()
            refused = await refuse_module(once, "i18n.js", times=1)
            await once.goto(full.url + "/login?reason=logout")
            await once.get_by_text("You have logged out.").wait_for()  # login.js ran, after the reload
            assert refused and await once.evaluate(BOOT_RETRIED) is None
            await once.get_by_label("Login name").fill("robin")
            await once.get_by_label("Password").fill(PASSWORD)
            await once.get_by_role("button", name="Log in").click()
            await once.get_by_role("heading", name="Protect your account with a second factor").wait_for()

            always = await browser.new_page()
            documents: list[tuple[str, str]] = []
            always.on(
                "request",
                lambda r: documents.append((r.method, urlsplit(r.url).path)) if r.resource_type == "document" else None,
            )
            await refuse_module(always, "i18n.js")
            await always.goto(full.url + "/login")
            await expect(always.locator("#boot-failed")).to_be_visible()
            await expect(always.locator("#login-form")).to_be_hidden()
            assert documents == [("GET", "/login"), ("GET", "/login")], "one reload, a plain GET"
            assert await always.evaluate(BOOT_RETRIED) is None  # nothing left behind
            assert await always.evaluate(SUBMIT_LOGIN_FORM) is True, "the browser sent the form itself"
            assert always.url == full.url + "/login"
            await browser.close()
    finally:
        await full.stop()
