"""The dashboard API on a full broker: only a logged-in therapist, only their own sessions.

The browser tests show the link key is made in the page and never reaches the broker, and
that the page's own QR encoder draws exactly the symbol segno draws for the same link.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import pytest_asyncio
import segno
from aiohttp import ClientSession, DummyCookieJar
from playwright.async_api import expect

from broker.client.broker_client import BrokerClient
from broker.crypto.link_key import b64url_encode, decode_link_key, new_link_key
from broker.crypto.seat_keys import group_key, seat_key
from broker.signaling.protocol import ErrorCode, ProtocolError
from tests.browser.kit import BOOT_RETRIED, refuse_module
from tests.http.test_web_auth import CHROMIUM_ARGS, PASSWORD, FullBroker, PolicyConfig, start_full_broker

pytestmark = pytest.mark.asyncio(loop_scope="session")

WEB = Path(__file__).resolve().parents[2] / "web"
EN = json.loads((WEB / "i18n" / "en.json").read_text(encoding="utf-8"))
ES = json.loads((WEB / "i18n" / "es.json").read_text(encoding="utf-8"))


class Therapist:
    """One logged-in therapist talking to the dashboard API."""

    def __init__(self, full: FullBroker, http: ClientSession, cookie: str, csrf: str) -> None:
        self.full, self.http, self.cookie, self.csrf = full, http, cookie, csrf

    def headers(self) -> dict[str, str]:
        return {"Cookie": f"__Host-broker_login={self.cookie}", "X-CSRF-Token": self.csrf, "Origin": self.full.url}

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with self.http.request(
            method, self.full.url + path, json=body, headers=self.headers(), allow_redirects=False
        ) as r:
            return r.status, (await r.json() if r.content_type == "application/json" else await r.text())


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def full(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[FullBroker]:
    running = await start_full_broker(tmp_path_factory.mktemp("dashboard"))
    for name in ("alex", "blair"):
        await running.auth.accounts.add(name, PASSWORD)
    yield running
    await running.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def http() -> AsyncIterator[ClientSession]:
    async with ClientSession(cookie_jar=DummyCookieJar()) as session:
        yield session


async def login(full: FullBroker, http: ClientSession, name: str) -> Therapist:
    async with http.post(
        full.url + "/api/login", json={"username": name, "password": PASSWORD}, headers={"Origin": full.url}
    ) as r:
        assert r.status == 200
        cookie = r.cookies["__Host-broker_login"].value
        return Therapist(full, http, cookie, (await r.json())["csrf"])


async def test_nothing_without_login(full: FullBroker, http: ClientSession) -> None:
    async with http.get(full.url + "/dashboard", allow_redirects=False) as r:
        assert r.status == 303 and r.headers["Location"] == "/login"
    async with http.get(full.url + "/api/sessions") as r:
        assert r.status == 401 and (await r.json())["error"] == "login_required"
    async with http.post(full.url + "/api/sessions", json={}, headers={"Origin": full.url}) as r:
        assert r.status == 401
    before = set(await full.broker.store.keys("s:"))
    async with http.post(full.url + "/api/sessions", json={"clients": 1}, headers={"Origin": full.url}) as r:
        assert r.status == 401
    assert set(await full.broker.store.keys("s:")) == before


async def test_dashboard_page_for_a_logged_in_therapist(full: FullBroker, http: ClientSession) -> None:
    alex = await login(full, http, "alex")
    status, text = await alex.call("GET", "/dashboard")
    assert status == 200 and 'src="/static/js/dashboard.js"' in text


async def test_create_list_revoke_and_reissue(full: FullBroker, http: ClientSession) -> None:
    alex = await login(full, http, "alex")
    hub = full.broker.hub
    status, created = await alex.call("POST", "/api/sessions", {"clients": 2, "minors": 1, "duration_min": 60})
    assert status == 200, created
    seats = {s["peer"]: s for s in created["seats"]}
    assert [s["role"] for s in created["seats"]] == ["therapist", "client", "client"]
    assert [s["minor"] for s in created["seats"]] == [False, True, False]
    for seat in created["seats"]:
        session, opened = await hub.resolve_token(seat["token"])
        assert (session.id, opened.id) == (created["session"], seat["peer"])

    status, listed = await alex.call("GET", "/api/sessions")
    [mine] = [s for s in listed["sessions"] if s["session"] == created["session"]]
    assert {s["peer"]: s["token"] for s in mine["seats"]} == {p: s["token"] for p, s in seats.items()}
    assert mine["state"] == "scheduled" and mine["expires"] == created["expires"]

    first, second = [s for s in created["seats"] if s["role"] == "client"]
    status, revoked = await alex.call("POST", f"/api/sessions/{created['session']}/seats/{first['peer']}/revoke", {})
    assert status == 200 and revoked["token"] is None
    with pytest.raises(ProtocolError) as refused:
        await hub.resolve_token(first["token"])
    assert refused.value.code is ErrorCode.INVALID_TOKEN

    path = f"/api/sessions/{created['session']}/seats/{second['peer']}/reissue"
    status, reissued = await alex.call("POST", path, {})
    assert status == 200 and reissued["token"] not in (None, second["token"])
    with pytest.raises(ProtocolError):
        await hub.resolve_token(second["token"])
    assert (await hub.resolve_token(reissued["token"]))[1].id == second["peer"]

    status, listed = await alex.call("GET", "/api/sessions")
    [mine] = [s for s in listed["sessions"] if s["session"] == created["session"]]
    tokens = {s["peer"]: s["token"] for s in mine["seats"]}
    assert tokens[first["peer"]] is None and tokens[second["peer"]] == reissued["token"]

    therapist_seat = created["seats"][0]["peer"]
    status, body = await alex.call("POST", f"/api/sessions/{created['session']}/seats/{therapist_seat}/revoke", {})
    assert status == 400 and body["error"] == "not_allowed"


async def test_another_therapist_cannot_see_or_touch_my_sessions(full: FullBroker, http: ClientSession) -> None:
    alex = await login(full, http, "alex")
    blair = await login(full, http, "blair")
    _, created = await alex.call("POST", "/api/sessions", {"clients": 1})
    client = created["seats"][1]
    status, listed = await blair.call("GET", "/api/sessions")
    assert status == 200 and created["session"] not in {s["session"] for s in listed["sessions"]}
    theirs = await blair.call("POST", f"/api/sessions/{created['session']}/seats/{client['peer']}/revoke", {})
    reissue = await blair.call("POST", f"/api/sessions/{created['session']}/seats/{client['peer']}/reissue", {})
    nowhere = await blair.call("POST", f"/api/sessions/AAAAAAAAAAAAAAAAAAAAAA/seats/{client['peer']}/revoke", {})
    assert theirs == reissue == nowhere  # "not yours" looks exactly like "does not exist"
    assert theirs[0] == 404
    assert (await full.broker.hub.resolve_token(client["token"]))[1].id == client["peer"]
    # Blair's CSRF token does not pass with Alex's login either.
    mixed = Therapist(full, http, alex.cookie, blair.csrf)
    assert (await mixed.call("POST", "/api/sessions", {"clients": 1}))[0] == 403


async def test_ended_session_leaves_the_list(full: FullBroker, http: ClientSession) -> None:
    alex = await login(full, http, "alex")
    _, created = await alex.call("POST", "/api/sessions", {"clients": 1})
    therapist_token = created["seats"][0]["token"]
    client = BrokerClient(f"{full.url}/t/{therapist_token}#{new_link_key()}")
    await client.connect()
    try:
        await client.end()
    finally:
        await client.close()
    _, listed = await alex.call("GET", "/api/sessions")
    assert created["session"] not in {s["session"] for s in listed["sessions"]}


async def test_an_ended_session_leaves_its_owners_index_at_once(full: FullBroker, http: ClientSession) -> None:
    """Review (issue 25): the ``owner:`` entry naming an ended session stayed in the store until its
    window closed. It now goes as the session ends, before anyone lists the dashboard again."""
    blair = await login(full, http, "blair")
    _, created = await blair.call("POST", "/api/sessions", {"clients": 1})
    _, me = await blair.call("GET", "/api/me")
    owner = "owner:" + me["therapist"]["id"]
    session_id = created["session"]

    async def indexed() -> bool:
        raw = await full.broker.store.get(owner)
        return raw is not None and session_id.encode() in raw

    assert await indexed()
    therapist = BrokerClient(f"{full.url}/t/{created['seats'][0]['token']}#{new_link_key()}")
    await therapist.connect()
    try:
        await therapist.end()
    finally:
        await therapist.close()
    assert not await indexed()


async def test_invalid_requests_are_refused_plainly(full: FullBroker, http: ClientSession) -> None:
    alex = await login(full, http, "alex")
    for body in (
        {"clients": 1, "minors": 2},
        {"clients": 0},
        {"clients": 16},
        {"duration_min": 2},
        {"clients": 1, "owner": "someone"},
        {"starts": 1000},  # long over
        {"clients": "two"},
    ):
        status, answer = await alex.call("POST", "/api/sessions", body)
        assert status == 400 and answer["error"] == "bad_request", body
    async with http.post(full.url + "/api/sessions", data="clients=1", headers=alex.headers()) as r:
        assert r.status == 400
    for action in ("delete", "revoke-all"):
        status, _ = await alex.call("POST", f"/api/sessions/x/seats/y/{action}", {})
        assert status in (404, 405)


async def test_a_start_beyond_a_year_is_refused_and_nothing_is_saved(full: FullBroker, http: ClientSession) -> None:
    """Finding 11: a start near 2^32 answered 500 after saving a record no list showed, with a 79-year TTL."""
    alex = await login(full, http, "alex")
    now = int(time.time())
    for starts in (2**32 - 1, now + 366 * 24 * 3600 + 60):
        before = set(await full.broker.store.keys(""))
        status, answer = await alex.call("POST", "/api/sessions", {"starts": starts, "duration_min": 720})
        assert status == 400 and answer["error"] == "bad_request", answer
        assert "at most a year" in answer["message"]
        assert set(await full.broker.store.keys("")) - before == set()  # no session, no owner-index entry
    status, answer = await alex.call("POST", "/api/sessions", {"starts": now + 300 * 24 * 3600})
    assert status == 200 and answer["starts"] == now + 300 * 24 * 3600


# ---------------------------------------------------------------- in the browser


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def browser() -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        chromium = await p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS)
        yield chromium
        await chromium.close()


async def browser_login(browser: Any, full: FullBroker, name: str) -> Any:
    context = await browser.new_context()
    page = await context.new_page()
    await page.goto(full.url + "/login")
    await page.get_by_label("Login name").fill(name)
    await page.get_by_label("Password").fill(PASSWORD)
    await page.get_by_role("button", name="Log in").click()
    await page.get_by_role("button", name="Not now").click()  # the second factor offered after login
    await page.wait_for_url(full.url + "/dashboard")
    await page.locator("body[data-ready=true]").wait_for()
    return page


async def schedule_in_page(page: Any) -> Any:
    """Click Schedule; returns the new session's card."""
    async with page.expect_response(lambda r: r.url.endswith("/api/sessions") and r.request.method == "POST") as info:
        await page.get_by_role("button", name="Schedule").click()
    created = await (await info.value).json()
    await page.get_by_role("status").filter(has_text="Session scheduled").wait_for()
    return page.locator(f'li.session[data-session="{created["session"]}"]')


@pytest.mark.browser
async def test_link_key_is_made_in_the_browser_and_never_sent(full: FullBroker, browser: Any) -> None:
    page = await browser_login(browser, full, "alex")
    sent: list[str] = []
    page.on("request", lambda r: sent.append(f"{r.method} {r.url}\n{r.headers}\n{r.post_data or ''}"))
    await page.get_by_role("spinbutton", name="Clients").fill("2")
    card = await schedule_in_page(page)
    href = await card.get_by_role("link", name="Open session").get_attribute("href")
    assert href is not None
    session_id = await card.get_attribute("data-session")
    token, _, key = href.removeprefix(full.url + "/t/").partition("#")
    assert len(key) == 43 and token
    # Every request the page made after the therapist clicked Schedule: the key is in none.
    assert sent and not any(key in request for request in sent)
    _, seat = await full.broker.hub.resolve_token(token)
    assert seat.role.value == "therapist"

    # The QR code shown holds the full client link, drawn in the page.
    await card.get_by_role("button", name="Show QR code for Client 1").click()
    dialog = page.get_by_role("dialog")
    await dialog.get_by_role("img", name="QR code of the link for Client 1").wait_for()
    link = await page.evaluate(
        """async (session) => {
            const d = await import('/static/js/dashboard.js');
            return await d.loadLinkKey(session);
        }""",
        await card.get_attribute("data-session"),
    )
    assert link == key
    await dialog.get_by_role("button", name="Close").click()
    assert not any(key in request for request in sent)
    # The therapist's link carries the session secret; each client's link only its own seat key,
    # derived in the page (docs/protocol.md 7.1): every fragment differs.
    await page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=full.url)
    fragments = []
    for name in ("Client 1", "Client 2"):
        await card.get_by_role("button", name=f"Copy link for {name}").click()
        copied = await page.evaluate("navigator.clipboard.readText()")
        client_token, _, fragment = copied.removeprefix(full.url + "/j/").partition("#")
        _, client_seat = await full.broker.hub.resolve_token(client_token)
        assert fragment == b64url_encode(seat_key(decode_link_key(key), str(session_id), client_seat.id))
        fragments.append(fragment)
    assert len({key, *fragments}) == 3
    assert not any(fragment in request for request in sent for fragment in fragments)
    # After a reload the key is still there (IndexedDB), and still not sent.
    await page.reload()
    await page.locator("body[data-ready=true]").wait_for()
    again = (
        await page.locator(f'li.session[data-session="{session_id}"]')
        .get_by_role("link", name="Open session")
        .get_attribute("href")
    )
    assert again == href
    assert not any(key in request for request in sent)
    await page.context.close()


@pytest.mark.browser
async def test_group_link_is_chosen_with_its_warning(full: FullBroker, browser: Any) -> None:
    """One link for everyone only when chosen, said plainly where it is chosen and where it is
    shown; its fragment is the group key, which the seats' own links do not share."""
    page = await browser_login(browser, full, "alex")
    await page.get_by_role("spinbutton", name="Clients").fill("3")
    group = page.get_by_role("checkbox", name="Also make one link for everyone (group)")
    assert not await group.is_checked()  # a link per seat is the default
    hint = await page.locator("#" + str(await group.get_attribute("aria-describedby"))).text_content()
    assert hint and "shares one key" in hint and "Couples and families should use a link per person" in hint
    await group.check()
    bodies: list[Any] = []
    page.on("request", lambda r: bodies.append(r.post_data_json) if r.url.endswith("/api/sessions") else None)
    card = await schedule_in_page(page)
    assert [b for b in bodies if b] and [b for b in bodies if b][-1]["group_link"] is True
    block = card.get_by_test_id("group-link")
    await expect(block).to_contain_text("all who use it share one key")
    await page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=full.url)
    await block.get_by_role("button", name="Copy group link").click()
    copied = await page.evaluate("navigator.clipboard.readText()")
    token, _, fragment = copied.removeprefix(full.url + "/j/").partition("#")
    href = await card.get_by_role("link", name="Open session").get_attribute("href")
    secret = str(href).partition("#")[2]
    session_id = str(await card.get_attribute("data-session"))
    assert fragment == b64url_encode(group_key(decode_link_key(secret), session_id))
    session, _ = await full.broker.hub.resolve_token(token)  # the group token of this session
    assert session.id == session_id
    await page.context.close()


@pytest.mark.browser
async def test_a_clients_language_goes_in_their_link_and_their_page_opens_in_it(full: FullBroker, browser: Any) -> None:
    """Issue 33: the therapist chooses the clients' language when scheduling, and per client after;
    the link the page copies carries it (?lang=), the client's page opens in it whatever the
    client's browser prefers, and nothing of the choice reaches the broker before the link is opened."""
    page = await browser_login(browser, full, "alex")
    sent: list[str] = []
    page.on("request", lambda r: sent.append(f"{r.url}\n{r.post_data or ''}"))
    choice = page.get_by_label("Clients’ language")
    # The practice's languages (BROKER_LANGUAGES), each named in itself, or the client's browser.
    assert await choice.locator("option").all_text_contents() == [
        EN["dashboard.language_browser"],
        EN["language.name"],
        ES["language.name"],
    ]
    await page.get_by_role("spinbutton", name="Clients").fill("2")
    await choice.select_option("es")
    card = await schedule_in_page(page)
    await page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=full.url)

    async def copy(name: str) -> str:
        await card.get_by_role("button", name=f"Copy link for {name}").click()
        return str(await page.evaluate("navigator.clipboard.readText()"))

    first = await copy("Client 1")
    assert first.startswith(full.url + "/j/") and "?lang=es#" in first
    assert "?lang=es#" in await copy("Client 2")
    # One client reads English: only their link changes.
    await card.get_by_label("Link language for Client 2").select_option("en")
    await expect(card.get_by_label("Link language for Client 2")).to_have_value("en")
    assert "?lang=en#" in await copy("Client 2")
    assert await copy("Client 1") == first
    await card.get_by_label("Link language for Client 2").select_option("")
    await expect(card.get_by_label("Link language for Client 2")).to_have_value("")
    assert "?lang=" not in await copy("Client 2")
    assert not any("lang=" in request for request in sent), "the choice stays on this device"
    # The email the page prepares for that client is in their link's language, with that link.
    await card.get_by_role("button", name="Send by email: link for Client 1").click()
    await expect(page.locator("#email-body")).to_have_value(
        re.compile("^" + re.escape(ES["dashboard.email_body"].split("{date}")[0]))
    )
    assert first in await page.locator("#email-body").input_value()
    assert "subject=" + quote(ES["dashboard.email_subject"]) in str(
        await page.locator("#email-open").get_attribute("href")
    )
    await page.get_by_role("dialog").get_by_role("button", name="Close").click()
    # The client's browser prefers English; their page opens in Spanish, as the therapist chose.
    client = await browser.new_context(locale="en-US")
    client_page = await client.new_page()
    await client_page.goto(first)
    await expect(client_page.locator("html")).to_have_attribute("lang", "es")
    await expect(client_page.locator("#welcome-title")).to_have_text(ES["welcome.title"])
    await client.close()
    await page.context.close()


@pytest.mark.browser
async def test_the_therapists_pages_speak_the_browsers_language_with_a_switch(full: FullBroker, browser: Any) -> None:
    """Issue 33: the login page and the dashboard start in the browser's language (Spanish here),
    and the switch under the header changes it in place."""
    context = await browser.new_context(locale="es-ES")
    page = await context.new_page()
    await page.goto(full.url + "/login")
    await expect(page.locator("html")).to_have_attribute("lang", "es")
    await expect(page.locator("#login-title")).to_have_text(ES["login.login_title"])
    await page.get_by_label(ES["login.login_name"]).fill("alex")
    # The broker refuses in English; the page says it in its own language, by the refusal's code.
    await page.get_by_label(ES["login.password"]).fill(PASSWORD + "-wrong")
    await page.get_by_role("button", name=ES["login.login_submit"]).click()
    await expect(page.locator("#login-error")).to_have_text(ES["api.invalid_credentials"])
    await page.get_by_label(ES["login.password"]).fill(PASSWORD)
    await page.get_by_role("button", name=ES["login.login_submit"]).click()
    await page.get_by_role("button", name=ES["login.offer_later"]).click()
    await page.wait_for_url(full.url + "/dashboard")
    await page.locator("body[data-ready=true]").wait_for()
    await expect(page.locator("#title")).to_have_text(ES["dashboard.title"])
    await expect(page.locator("#create-submit")).to_have_text(ES["dashboard.create_submit"])
    await page.get_by_test_id("language-switch").select_option("en")
    await expect(page.locator("#title")).to_have_text(EN["dashboard.title"])
    await expect(page.locator("html")).to_have_attribute("lang", "en")
    await context.close()


@pytest.mark.browser
async def test_a_dashboard_whose_modules_did_not_arrive_tries_again_then_says_reload(
    full: FullBroker, browser: Any
) -> None:
    """A module lost on the way (here: i18n.js refused once, as a network change fails requests in
    flight) leaves dashboard.js unrun; the boot guard reloads the page once and it opens. Lost
    every time, the page says to reload rather than show a dashboard that does nothing, and
    leaves no flag behind."""
    context = (await browser_login(browser, full, "alex")).context
    once = await context.new_page()
    refused = await refuse_module(once, "i18n.js", times=1)
    await once.goto(full.url + "/dashboard")
    await once.locator("body[data-ready=true]").wait_for()
    assert refused and await once.evaluate(BOOT_RETRIED) is None

    always = await context.new_page()
    refused = await refuse_module(always, "i18n.js")
    await always.goto(full.url + "/dashboard")
    await expect(always.locator("#boot-failed")).to_be_visible()
    await expect(always.locator("#boot-failed")).to_have_text(EN["loading.failed_reload"])
    assert len(refused) == 2, "tried twice: the first load and one reload"
    assert await always.evaluate("document.body.dataset.ready ?? null") is None, "no module of the page ran"
    assert await always.evaluate(BOOT_RETRIED) is None  # nothing left behind
    await context.close()


@pytest.mark.browser
async def test_revoke_from_the_page(full: FullBroker, browser: Any) -> None:
    page = await browser_login(browser, full, "blair")
    card = await schedule_in_page(page)
    session_id = await card.get_attribute("data-session")
    page.once("dialog", lambda d: d.accept())
    await card.get_by_role("button", name="Revoke link for Client").click()
    await page.get_by_role("status").filter(has_text="was revoked").wait_for()
    session = await full.broker.hub.get_session(session_id or "")
    assert session is not None and session.clients()[0].token_id is None
    assert await card.get_by_text("Link revoked").is_visible()
    await page.context.close()


@pytest.mark.browser
async def test_auto_logoff_after_idle(tmp_path: Path, browser: Any) -> None:
    running = await start_full_broker(tmp_path / "idle", config_class=PolicyConfig, login_idle_s=2.0)
    try:
        await running.auth.accounts.add("casey", PASSWORD)
        page = await browser_login(browser, running, "casey")
        heading = page.get_by_role("heading", name="You have been logged off")
        await heading.wait_for(timeout=20_000)
        assert await page.locator("#dashboard").is_hidden()
        assert await page.locator("li.session").count() == 0
        async with ClientSession() as http:
            cookies = {c["name"]: c["value"] for c in await page.context.cookies()}
            async with http.get(
                running.url + "/api/me",
                headers={"Cookie": f"__Host-broker_login={cookies.get('__Host-broker_login', '')}"},
            ) as r:
                assert r.status == 401
        await page.context.close()
    finally:
        await running.stop()


QR_SAMPLES = [
    "x",
    "https://therapy.example.org/j/" + "A" * 68 + "#" + "b" * 43,
    "http://127.0.0.1:8080/t/AeheujsDD-r12HKNRAYkjMjLSaz6IlOdPUDoawEo-msBQsL-TtT-M8G5hDMJdLYyHqHR#"
    "0123456789abcdefghijABCDEFGHIJ-_0123456789a",
    "https://a-rather-long-practice-domain-name.example.com:8443/j/" + "Z" * 68 + "#" + "k" * 43,
    "q" * 300,
]


@pytest.mark.browser
async def test_page_qr_encoder_matches_segno(full: FullBroker, browser: Any) -> None:
    """Placement, masks, format and version bits equal segno's; our data stream decodes to the link.

    segno writes a zero byte before the pad codewords where the standard (and we) write none,
    so the symbols are compared from segno's own data codewords.
    """
    page = await browser.new_page()
    await page.goto(full.url + "/login")
    for text in QR_SAMPLES:
        ours = await page.evaluate(
            """async ([text, theirs]) => {
                const d = await import('/static/js/dashboard.js');
                const auto = d.qrMatrix(text);
                const bytes = Array.from(new TextEncoder().encode(text));
                const forced = [];
                for (let m = 0; m < 8; m++) forced.push(d.qrFromData(theirs, auto.version, m).modules);
                const own = d.qrFromData(d.dataCodewords(bytes, auto.version), auto.version, auto.mask).modules;
                return { version: auto.version, mask: auto.mask, auto: auto.modules, forced, own,
                         data: d.dataCodewords(bytes, auto.version) };
            }""",
            [text, _segno_data(text, segno.make(text, error="m", mode="byte", micro=False, boost_error=False).version)],
        )
        smallest = segno.make(text, error="m", mode="byte", micro=False, boost_error=False)
        assert ours["version"] == smallest.version, text
        for mask, matrix in enumerate(ours["forced"]):
            expected = segno.make(text, error="m", mode="byte", version=ours["version"], mask=mask, boost_error=False)
            assert matrix == _rows(expected), (text, mask)
        assert _decode_byte_mode(ours["data"], ours["version"]) == text
        assert ours["auto"] == ours["own"]
    await page.close()


def _rows(qr: segno.QRCode) -> list[list[bool]]:
    return [[bool(v) for v in row] for row in qr.matrix]


def _segno_data(text: str, version: int) -> list[int]:
    """segno's padded data codewords for ``text`` (byte mode, level M)."""
    from segno import consts, encoder

    buff = encoder.Buffer()
    for segment in encoder.prepare_data(text, consts.MODE_BYTE, None):
        encoder.write_segment(buff, segment, None, encoder.version_range(version), None)
    capacity = consts.SYMBOL_CAPACITY[version][consts.ERROR_LEVEL_M]
    encoder.write_terminator(buff, capacity, None, len(buff))
    encoder.write_padding_bits(buff, version, len(buff))
    encoder.write_pad_codewords(buff, version, capacity, len(buff))
    bits = "".join(map(str, buff.getbits()))
    return [int(bits[i : i + 8], 2) for i in range(0, len(bits), 8)]


def _decode_byte_mode(data: list[int], version: int) -> str:
    """Read a byte-mode segment back, and check the terminator and pad codewords the standard asks for."""
    bits = "".join(f"{b:08b}" for b in data)
    assert bits[:4] == "0100"
    width = 8 if version < 10 else 16
    count = int(bits[4 : 4 + width], 2)
    start = 4 + width
    payload = bytes(int(bits[start + 8 * i : start + 8 * i + 8], 2) for i in range(count))
    end = start + 8 * count
    assert set(bits[end : end + 4]) <= {"0"}
    tail = data[(end + 4 + 7) // 8 :]
    assert tail == [(0xEC, 0x11)[i % 2] for i in range(len(tail))]
    return payload.decode("utf-8")
