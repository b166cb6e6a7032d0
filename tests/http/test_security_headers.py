"""Every route of a fully built broker answers with the hardening headers, errors included.

The app is ``build_app`` plus ``setup_auth`` and ``setup_dashboard`` (whichever of them
``build_app`` does not call yet), and the test walks ``app.router`` so a route added later is
checked without anyone remembering to list it here.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import ClientSession, DummyCookieJar, web
from aiohttp.web_urldispatcher import DynamicResource, PlainResource, StaticResource

from broker.config import Config
from broker.http.app import build_app, create_broker
from broker.http.pages import web_root
from broker.http.security_headers import PrivateAccessLogger
from broker.webmanifest.pins import import_map_hash
from tests.http.test_web_auth import PASSWORD, free_port, wire

pytestmark = pytest.mark.asyncio(loop_scope="session")


@dataclass
class Site:
    url: str
    app: web.Application
    tokens: dict[str, str]
    session: str
    client_peer: str
    cleanup: Any


async def _crash(request: web.Request) -> web.Response:
    raise RuntimeError("an unexpected bug in some handler")


async def start_site(data_dir: Path, **overrides: Any) -> Site:
    port = free_port()
    config = replace(Config(), data_dir=data_dir, host="127.0.0.1", port=port, **overrides)
    broker = await create_broker(config)
    app = build_app(broker)
    owned = wire(app, broker)
    # Not a real route: stands for any handler with a bug, to see what an unexpected error looks like.
    app.router.add_get("/__test__/crash", _crash)
    runner = web.AppRunner(app, access_log_class=PrivateAccessLogger)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    from broker.http.login_sessions import AUTH

    await app[AUTH].accounts.add("headers-check", PASSWORD)
    session, tokens = await broker.hub.create_session(clients=1)

    async def cleanup() -> None:
        await broker.hub.shutdown(after_ms=0)
        await runner.cleanup()
        await broker.close()
        for thing in owned:
            thing.close()

    return Site(f"http://127.0.0.1:{port}", app, tokens, session.id, session.clients()[0].id, cleanup)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def site(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Site]:
    running = await start_site(tmp_path_factory.mktemp("headers"))
    yield running
    await running.cleanup()


@pytest_asyncio.fixture(loop_scope="session")
async def http() -> AsyncIterator[ClientSession]:
    async with ClientSession(cookie_jar=DummyCookieJar()) as session:
        yield session


async def logged_in(site: Site, http: ClientSession) -> dict[str, str]:
    async with http.post(
        site.url + "/api/login", json={"username": "headers-check", "password": PASSWORD}, headers={"Origin": site.url}
    ) as r:
        assert r.status == 200
        body = await r.json()
        return {
            "Cookie": f"__Host-broker_login={r.cookies['__Host-broker_login'].value}",
            "X-CSRF-Token": body["csrf"],
            "Origin": site.url,
        }


def concrete_paths(site: Site, resource: Any) -> list[str]:
    """Real paths for a route: tokens, session and peer ids that exist, a real static file."""
    if isinstance(resource, StaticResource):
        return ["/static/css/dashboard.css", "/static/js/login.js", "/static/no-such-file.js"]
    if isinstance(resource, PlainResource):
        return [resource.canonical]
    assert isinstance(resource, DynamicResource), resource
    therapist = next(t for p, t in site.tokens.items() if p != site.client_peer)
    values = {
        "session": site.session,
        "peer": site.client_peer,
        "action": "reissue",
        "token": site.tokens[site.client_peer],
    }
    path = re.sub(r"\{(\w+)(?::[^}]*)?\}", lambda m: values.get(m.group(1), "x"), resource.canonical)
    paths = [path]
    if "{token}" in resource.canonical:
        paths.append(re.sub(r"\{token\}", therapist, resource.canonical))
        paths.append(re.sub(r"\{token\}", "not-a-token", resource.canonical))
    return paths


def check_headers(headers: Any, what: str, *, tls: bool = False) -> None:
    csp = headers.get("Content-Security-Policy", "")
    directives = {d.split()[0]: d.split()[1:] for d in (p.strip() for p in csp.split(";")) if d}
    assert directives, f"{what}: no CSP"
    assert "'unsafe-inline'" not in csp and "'unsafe-eval'" not in csp, what
    assert directives.get("frame-ancestors") == ["'none'"], what
    assert directives.get("default-src") in (["'none'"], ["'self'"]), what
    # Scripts from our origin, and the one inline script: the pages' import map, by its hash.
    assert directives.get("script-src") == ["'self'", f"'{import_map_hash(web_root())}'"], what
    assert directives.get("require-trusted-types-for") == ["'script'"], what
    # One Trusted Types policy: the frame encryption's, for its worker's blob: URLs (web/js/frame_crypto.js).
    assert directives.get("trusted-types") == ["frame-crypto"], what
    assert headers.get("Integrity-Policy") == "blocked-destinations=(script)", what
    assert directives.get("object-src") == ["'none'"] and directives.get("base-uri") == ["'none'"], what
    # Workers from blob: URLs only (the frame encryption's pinned bytes): never a service worker,
    # which must come from an http(s) URL, so none outlives a page.
    assert directives.get("worker-src") == ["blob:"], f"{what}: a worker from blob: only"
    assert not any(s in ("*", "http:", "https:") for sources in directives.values() for s in sources), what
    assert headers.get("X-Frame-Options") == "DENY", what
    assert headers.get("X-Content-Type-Options") == "nosniff", what
    assert headers.get("Referrer-Policy") == "no-referrer", what
    features = dict(f.strip().split("=", 1) for f in headers.get("Permissions-Policy", "").split(",") if f.strip())
    assert features.get("camera") == "(self)" and features.get("microphone") == "(self)", what
    # Screen sharing in the call (issue 34): getDisplayMedia on our own pages, nowhere else.
    assert features.get("display-capture") == "(self)", what
    assert all(v in ("()", "(self)") for v in features.values()), what
    assert headers.get("Cross-Origin-Opener-Policy") == "same-origin", what
    if tls:
        hsts = headers.get("Strict-Transport-Security", "")
        assert int(re.search(r"max-age=(\d+)", hsts).group(1)) >= 31536000, what  # type: ignore[union-attr]
    else:
        assert "Strict-Transport-Security" not in headers, what


def check_caching(status: int, headers: Any, what: str) -> None:
    """Every answer, files included: the browser keeps no copy of anything of ours on the device."""
    assert headers.get("Cache-Control") == "no-store", f"{what}: {status} {headers.get('Content-Type', '')}"


async def test_every_route_has_the_headers(site: Site, http: ClientSession) -> None:
    seen = []
    login: dict[str, str] = {}  # one login for every POST (a password check is slow), new after a logout
    for route in site.app.router.routes():
        if route.resource is None or route.resource.canonical.startswith("/__test__"):
            continue
        method = "GET" if route.method == "*" else route.method
        for path in concrete_paths(site, route.resource):
            if method == "POST" and not login:
                login = await logged_in(site, http)
            headers = login if method == "POST" else {}
            body = {} if method == "POST" else None
            async with http.request(method, site.url + path, json=body, headers=headers, allow_redirects=False) as r:
                what = f"{method} {path} -> {r.status}"
                check_headers(r.headers, what)
                check_caching(r.status, r.headers, what)
                seen.append((method, route.resource.canonical, r.status))
            if path in ("/api/logout", "/api/login"):
                login = {}
    canonicals = {c for _, c, _ in seen}
    for expected in ("/login", "/dashboard", "/api/login", "/api/me", "/api/sessions", "/ws", "/j/{token}", "/healthz"):
        assert expected in canonicals
    assert {s for _, _, s in seen} >= {200, 404}


async def test_error_pages_have_the_headers_too(site: Site, http: ClientSession) -> None:
    auth = await logged_in(site, http)
    cases = [
        ("GET", "/no/such/page", {}, None),
        ("GET", "/api/nothing-here", {}, None),
        ("GET", "/api/login", {}, None),  # 405
        ("PUT", "/api/sessions", auth, {}),
        ("POST", "/api/sessions", {"Origin": "https://evil.example"}, {}),  # 403
        ("POST", "/api/sessions", {"Origin": site.url}, {}),  # 401
        ("POST", "/api/login", {"Origin": site.url}, {"username": "x"}),  # 400
        ("POST", "/api/login", {"Origin": site.url}, {"username": "x", "password": "y" * 300_000}),  # 413
        ("GET", "/j/" + "A" * 68, {}, None),  # a link that does not work: the notice page
        ("GET", "/ws", {"Origin": "https://evil.example"}, None),
        ("GET", "/ws", {"Origin": site.url}, None),  # not an upgrade request
    ]
    statuses = []
    for method, path, headers, body in cases:
        async with http.request(method, site.url + path, json=body, headers=headers, allow_redirects=False) as r:
            what = f"{method} {path} -> {r.status}"
            assert r.status >= 400, what
            check_headers(r.headers, what)
            check_caching(r.status, r.headers, what)
            statuses.append(r.status)
    assert {400, 401, 403, 404, 405, 413} <= set(statuses)


async def test_unexpected_errors_get_the_headers_and_no_details(site: Site, http: ClientSession) -> None:
    async with http.get(site.url + "/__test__/crash") as r:
        assert r.status == 500
        text = await r.text()
        assert "RuntimeError" not in text and "Traceback" not in text
        check_headers(r.headers, "GET crash -> 500")
        check_caching(r.status, r.headers, "GET crash -> 500")


async def test_hsts_only_behind_tls(tmp_path: Path, http: ClientSession) -> None:
    proxied = await start_site(tmp_path / "proxied", trust_proxy=True)
    direct = await start_site(tmp_path / "direct", trust_proxy=False)
    try:
        tls = {"X-Forwarded-Proto": "https"}
        for path in ("/login", "/api/me", "/no/such/page", "/static/css/dashboard.css"):
            async with http.get(proxied.url + path, headers=tls) as r:
                check_caching(r.status, r.headers, f"proxied {path}")
                check_headers(r.headers, f"proxied {path}", tls=True)
            async with http.get(proxied.url + path) as r:
                check_headers(r.headers, f"proxied without TLS {path}")
            # A client cannot switch HSTS on by sending the header to a broker that trusts no proxy.
            async with http.get(direct.url + path, headers=tls) as r:
                check_headers(r.headers, f"direct {path}")
    finally:
        await proxied.cleanup()
        await direct.cleanup()
