"""Running the day from the dashboard API (issue 28, items 2 and 4): a session's kind, moving it to
another time without breaking the links already sent, cancelling it (its links then say so), the
30-day history of signed records, and relaying only where a TURN server is configured.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import pytest_asyncio
from aiohttp import ClientSession
from playwright.async_api import expect

from broker.client.broker_client import BrokerClient
from broker.config import Config
from broker.config_check import unavailable_choices
from broker.crypto.link_key import new_link_key
from broker.signaling.history import KEEP_S, MAX_RECORDS, SessionHistory, SignedRecord
from broker.signaling.protocol import SessionEnded
from broker.signaling.record import verify_record
from broker.store.base import is_durable
from broker.store.memory import MemoryStore
from broker.store.redis_store import RedisStore, redis_client
from broker.store.sealing import Sealer
from broker.store.session_file import open_session_store
from tests.browser.kit import check_axe, fetch_axe
from tests.http.test_dashboard import browser, browser_login, http, login, schedule_in_page  # noqa: F401 - fixtures
from tests.http.test_web_auth import PASSWORD, FullBroker, start_full_broker
from tests.redis_server import RedisServer, redis_server  # noqa: F401 - the fixture
from tests.signaling.test_hub import RawPeer

pytestmark = pytest.mark.asyncio(loop_scope="session")

HOUR = 3600


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def full(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[FullBroker]:
    running = await start_full_broker(tmp_path_factory.mktemp("working-day"))
    for name in ("casey", "drew"):
        await running.auth.accounts.add(name, PASSWORD)
    yield running
    await running.stop()


async def page_code(full: FullBroker, http: ClientSession, token: str) -> tuple[int, str]:  # noqa: F811
    async with http.get(f"{full.url}/j/{token}") as r:
        text = await r.text()
    marker = 'data-code="'
    code = text[text.index(marker) + len(marker) :].split('"', 1)[0] if marker in text else ""
    return r.status, code


async def join_answer(full: FullBroker, token: str) -> dict[str, Any]:
    peer = await RawPeer.open(full)  # type: ignore[arg-type]
    try:
        return await peer.join(token)
    finally:
        await peer.close()


def client_token(created: dict[str, Any]) -> str:
    return str(next(s["token"] for s in created["seats"] if s["role"] == "client"))


# ---------------------------------------------------------------- kinds


async def test_the_kind_is_stored_with_the_session_and_listed(full: FullBroker, http: ClientSession) -> None:  # noqa: F811
    casey = await login(full, http, "casey")
    status, created = await casey.call("POST", "/api/sessions", {"clients": 2, "kind": "couple"})
    assert status == 200 and created["kind"] == "couple"
    _, solo = await casey.call("POST", "/api/sessions", {"clients": 1})
    assert solo["kind"] == "individual"
    _, listed = await casey.call("GET", "/api/sessions")
    kinds = {s["session"]: s["kind"] for s in listed["sessions"]}
    assert kinds[created["session"]] == "couple" and kinds[solo["session"]] == "individual"
    record = await full.broker.hub.get_session(created["session"])
    assert record is not None and record.kind == "couple"


@pytest.mark.parametrize(
    "body",
    [
        {"clients": 3, "kind": "couple"},
        {"clients": 2, "kind": "individual"},
        {"clients": 1, "kind": "family"},
        {"clients": 3, "kind": "family", "group_link": True},
        {"clients": 2, "kind": "friends"},
    ],
)
async def test_a_kind_that_does_not_fit_is_refused_and_nothing_saved(
    full: FullBroker,
    http: ClientSession,  # noqa: F811
    body: dict[str, Any],
) -> None:
    casey = await login(full, http, "casey")
    before = set(await full.broker.store.keys("s:"))
    status, answer = await casey.call("POST", "/api/sessions", body)
    assert status == 400 and answer["error"] == "bad_request", answer
    assert set(await full.broker.store.keys("s:")) == before


async def test_a_group_may_add_the_group_link(full: FullBroker, http: ClientSession) -> None:  # noqa: F811
    casey = await login(full, http, "casey")
    status, created = await casey.call("POST", "/api/sessions", {"clients": 3, "kind": "group", "group_link": True})
    assert status == 200 and created["group_token"] and created["kind"] == "group"


# ---------------------------------------------------------------- relaying only where TURN is set up


async def test_relay_only_is_refused_without_turn_and_the_list_says_so(full: FullBroker, http: ClientSession) -> None:  # noqa: F811
    casey = await login(full, http, "casey")
    before = set(await full.broker.store.keys("s:"))
    status, answer = await casey.call("POST", "/api/sessions", {"clients": 1, "relay_only": True})
    assert status == 400 and answer["error"] == "relay_unavailable"
    assert "TURN" in answer["message"]
    assert set(await full.broker.store.keys("s:")) == before
    _, listed = await casey.call("GET", "/api/sessions")
    assert listed["relay_available"] is False


async def test_relay_only_is_offered_and_accepted_with_turn(tmp_path: Path, http: ClientSession) -> None:  # noqa: F811
    with_turn = await start_full_broker(
        tmp_path / "data", turn_urls=("turn:127.0.0.1:3478?transport=udp",), turn_secret="s" * 40
    )
    try:
        await with_turn.auth.accounts.add("erin", PASSWORD)
        erin = await login(with_turn, http, "erin")
        status, created = await erin.call("POST", "/api/sessions", {"clients": 1, "relay_only": True})
        assert status == 200 and created["relay_only"] is True
        _, listed = await erin.call("GET", "/api/sessions")
        assert listed["relay_available"] is True
    finally:
        await with_turn.stop()


async def test_check_config_names_the_choices_that_cannot_work(tmp_path: Path) -> None:
    bare = Config(data_dir=tmp_path)
    choices = unavailable_choices(bare)
    assert any(c.startswith("relay-only sessions") for c in choices)
    assert any(c.startswith("passkeys") for c in choices)
    ready = Config(
        data_dir=tmp_path,
        public_url="https://therapy.example",
        turn_urls=("turn:turn.example:3478",),
        turn_secret="s" * 40,
        janus_url="http://127.0.0.1:8088/janus",
    )
    assert unavailable_choices(ready) == []


# ---------------------------------------------------------------- moving a session


async def test_moving_a_session_keeps_the_links_already_sent_working(full: FullBroker, http: ClientSession) -> None:  # noqa: F811
    casey = await login(full, http, "casey")
    later = int(time.time()) + 5 * HOUR
    _, created = await casey.call("POST", "/api/sessions", {"clients": 1, "starts": later})
    token = client_token(created)
    assert await page_code(full, http, token) == (425, "token_not_yet_valid")
    status, moved = await casey.call(
        "POST", f"/api/sessions/{created['session']}/reschedule", {"starts": int(time.time()), "duration_min": 30}
    )
    assert status == 200 and moved["ok"] is True
    assert moved["session"]["starts"] <= int(time.time()) and moved["session"]["expires"] < later
    # The very token sent before the move (it carries the old window) opens the page and the seat now.
    async with http.get(f"{full.url}/j/{token}") as r:
        assert r.status == 200
    joined = await join_answer(full, token)
    assert joined["type"] == "joined", joined
    _, listed = await casey.call("GET", "/api/sessions")
    view = next(s for s in listed["sessions"] if s["session"] == created["session"])
    assert view["expires"] == moved["session"]["expires"]


async def test_a_session_moved_later_closes_its_old_links_until_the_new_window(
    full: FullBroker,
    http: ClientSession,  # noqa: F811
) -> None:
    casey = await login(full, http, "casey")
    _, created = await casey.call("POST", "/api/sessions", {"clients": 1})
    token = client_token(created)
    status, _ = await casey.call(
        "POST", f"/api/sessions/{created['session']}/reschedule", {"starts": int(time.time()) + 5 * HOUR}
    )
    assert status == 200
    assert await page_code(full, http, token) == (425, "token_not_yet_valid")
    answer = await join_answer(full, token)
    assert answer["type"] == "error" and answer["code"] == "token_not_yet_valid"


async def test_moving_is_refused_while_someone_is_in_and_for_others_sessions(
    full: FullBroker,
    http: ClientSession,  # noqa: F811
) -> None:
    casey = await login(full, http, "casey")
    drew = await login(full, http, "drew")
    _, created = await casey.call("POST", "/api/sessions", {"clients": 1})
    path = f"/api/sessions/{created['session']}/reschedule"
    body = {"starts": int(time.time()) + HOUR}
    status, answer = await drew.call("POST", path, body)
    assert status == 404 and answer["error"] == "not_found"
    status, answer = await casey.call("POST", path, {"starts": 0})
    assert status == 400 and answer["error"] == "bad_request"
    client = BrokerClient(f"{full.url}/j/{client_token(created)}#{new_link_key()}")
    await client.connect()
    try:
        status, answer = await casey.call("POST", path, body)
        assert status == 409 and answer["error"] == "session_in_use"
    finally:
        await client.close()
    record = await full.broker.hub.get_session(created["session"])
    assert record is not None and record.starts == created["starts"]


# ---------------------------------------------------------------- cancelling


async def test_cancelling_stops_the_links_and_tells_everyone(full: FullBroker, http: ClientSession) -> None:  # noqa: F811
    casey = await login(full, http, "casey")
    drew = await login(full, http, "drew")
    _, created = await casey.call("POST", "/api/sessions", {"clients": 1})
    session_id, token = created["session"], client_token(created)
    status, answer = await drew.call("POST", f"/api/sessions/{session_id}/cancel", {})
    assert status == 404 and answer["error"] == "not_found"
    client = BrokerClient(f"{full.url}/j/{token}#{new_link_key()}")
    await client.connect()
    try:
        status, answer = await casey.call("POST", f"/api/sessions/{session_id}/cancel", {})
        assert status == 200 and answer == {"ok": True, "session": session_id}
        ended = await client.expect(SessionEnded, timeout=5)
        assert isinstance(ended, SessionEnded) and ended.reason == "cancelled"
    finally:
        await client.close()
    assert await page_code(full, http, token) == (410, "session_cancelled")
    answer = await join_answer(full, token)
    assert answer["type"] == "error" and answer["code"] == "session_cancelled"
    assert "cancelled" in answer["message"]
    _, listed = await casey.call("GET", "/api/sessions")
    assert session_id not in {s["session"] for s in listed["sessions"]}
    assert await full.broker.store.keys(f"s:{{{session_id}}}") == []
    status, answer = await casey.call("POST", f"/api/sessions/{session_id}/cancel", {})
    assert status == 404


async def test_a_forged_token_is_told_nothing_about_cancellations(
    full: FullBroker,
    http: ClientSession,  # noqa: F811
) -> None:
    """Another session's unknown token is not told anything about cancellations: the mark is per session."""
    casey = await login(full, http, "casey")
    _, kept = await casey.call("POST", "/api/sessions", {"clients": 1})
    forged = client_token(kept)[:-2] + ("AA" if not client_token(kept).endswith("AA") else "BB")
    assert (await page_code(full, http, forged))[1] == "invalid_token"


# ---------------------------------------------------------------- history


async def test_ended_and_cancelled_sessions_are_in_their_therapists_history_signed(
    full: FullBroker,
    http: ClientSession,  # noqa: F811
) -> None:
    casey = await login(full, http, "casey")
    drew = await login(full, http, "drew")
    _, ended = await casey.call("POST", "/api/sessions", {"clients": 1})
    therapist = BrokerClient(f"{full.url}/t/{ended['seats'][0]['token']}#{new_link_key()}")
    await therapist.connect()
    try:
        await therapist.end()
    finally:
        await therapist.close()
    _, cancelled = await casey.call("POST", "/api/sessions", {"clients": 2, "kind": "couple"})
    await casey.call("POST", f"/api/sessions/{cancelled['session']}/cancel", {})
    status, history = await casey.call("GET", "/api/history")
    assert status == 200
    by_session = {e["record"]["session"]: e for e in history["records"]}
    assert by_session[ended["session"]]["record"]["end_reason"] == "ended"
    assert by_session[cancelled["session"]]["record"]["end_reason"] == "cancelled"
    public = full.broker.signer.public_jwk()
    for entry in (by_session[ended["session"]], by_session[cancelled["session"]]):
        assert entry["key_id"] == public["kid"]
        assert verify_record(entry["record"], entry["signature"], public["x"])
    ends = [e["record"]["ended"] for e in history["records"]]
    assert ends == sorted(ends, reverse=True)
    _, others = await drew.call("GET", "/api/history")
    assert not {e["record"]["session"] for e in others["records"]} & set(by_session)


async def test_the_history_is_durable_and_sealed_on_disk(full: FullBroker, http: ClientSession) -> None:  # noqa: F811
    casey = await login(full, http, "casey")
    _, me = await casey.call("GET", "/api/me")
    _, created = await casey.call("POST", "/api/sessions", {"clients": 1})
    await casey.call("POST", f"/api/sessions/{created['session']}/cancel", {})
    key = "history:" + me["therapist"]["id"]
    assert is_durable(key) and is_durable("cancelled:" + created["session"])
    # What a restart reads back: the file alone (opened anew, as a new process would) holds both.
    reopened = await open_session_store(full.broker.config.sessions_path, full.broker.keys.sessions)
    try:
        kept = await reopened.get(key)
        assert kept is not None and created["session"].encode() in kept
        assert await reopened.get("cancelled:" + created["session"]) is not None
    finally:
        await reopened.close()
    with sqlite3.connect(full.broker.config.sessions_path) as db:
        rows = db.execute("SELECT id, sealed FROM entry").fetchall()
    raw = b"".join(bytes(r[0]) + bytes(r[1]) for r in rows)
    assert created["session"].encode() not in raw
    assert me["therapist"]["id"].encode() not in raw


# ---------------------------------------------------------------- in the browser


@pytest.mark.browser
async def test_the_day_from_the_page(full: FullBroker, browser: Any) -> None:  # noqa: F811
    """Kind, copy feedback by the button, whose QR code, email, change time, cancel, history."""
    page = await browser_login(browser, full, "drew")
    assert await page.locator("#relay-field").is_hidden()  # no TURN on this broker
    await page.get_by_label("Type of session").select_option("couple")
    assert await page.get_by_role("spinbutton", name="Clients").input_value() == "2"
    assert await page.locator("#group-link-field").is_hidden()  # couples get a link per person
    card = await schedule_in_page(page)
    session_id = str(await card.get_attribute("data-session"))
    await expect(card.locator(".facts")).to_contain_text("Couple")
    axe = fetch_axe()
    await check_axe(page, axe, "dashboard with a couple session")

    await page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=full.url)
    copy = card.get_by_role("button", name="Copy link for Client 2")
    await copy.click()
    beside = card.locator('[data-peer] .copy-link[aria-label="Copy link for Client 2"] + .copied')
    await expect(beside).to_have_text("Copied")
    assert await card.locator(".copied").count() == 1  # only next to the button pressed
    link = await page.evaluate("navigator.clipboard.readText()")

    await card.get_by_role("button", name="Show QR code for Client 2").click()
    qr = page.locator("#qr-dialog")
    await expect(qr.get_by_role("heading")).to_have_text("Link for Client 2 as a QR code")
    await qr.get_by_role("button", name="Close").click()

    await card.get_by_role("button", name="Send by email: link for Client 2").click()
    mail = page.locator("#email-dialog")
    await expect(mail.locator("#email-whose")).to_contain_text("Client 2")
    assert link in await mail.get_by_label("Message").input_value()
    await check_axe(page, axe, "send by email")
    await mail.get_by_label("To").fill("someone@example.org")
    await mail.get_by_label("Message").fill(f"See you soon: {link}")
    href = str(await mail.get_by_role("link", name="Open in my mail program").get_attribute("href"))
    assert href.startswith("mailto:someone%40example.org?subject=")
    assert quote(f"See you soon: {link}", safe="") in href
    await mail.get_by_role("button", name="Close").click()

    await card.get_by_role("button", name="Change time").click()
    edit = page.locator("#edit-dialog")
    later = datetime.now() + timedelta(hours=3)
    await edit.get_by_label("Date").fill(later.strftime("%Y-%m-%d"))
    await edit.get_by_label("Start time").fill(later.strftime("%H:%M"))
    await edit.get_by_role("button", name="Save the new time").click()
    await page.get_by_role("status").filter(has_text="Session moved").wait_for()
    record = await full.broker.hub.get_session(session_id)
    assert record is not None and abs(record.starts - int(later.replace(second=0).timestamp())) < 60

    page.once("dialog", lambda d: d.accept())
    await page.locator(f'li.session[data-session="{session_id}"]').get_by_role("button", name="Cancel session").click()
    await page.get_by_role("status").filter(has_text="was cancelled").wait_for()
    await expect(
        page.locator(f'#today [data-session="{session_id}"], #later [data-session="{session_id}"]')
    ).to_have_count(0)
    ended = page.locator(f'#history [data-session="{session_id}"]')
    await expect(ended.locator(".facts")).to_contain_text("Cancelled")
    await ended.get_by_role("button", name="Check signature").click()
    await expect(ended.locator(".verify-result")).to_have_text("Signature valid: unaltered")
    await check_axe(page, axe, "dashboard history")
    async with page.expect_download() as info:
        await ended.get_by_role("button", name="Download record").click()
    saved = json.loads(Path(await (await info.value).path()).read_text(encoding="utf-8"))
    assert saved["record"]["session"] == session_id and saved["record"]["end_reason"] == "cancelled"
    assert verify_record(saved["record"], saved["signature"], full.broker.signer.public_jwk()["x"])
    await page.context.close()


@pytest.mark.browser
async def test_a_tampered_record_does_not_check_out_in_the_page(full: FullBroker, browser: Any) -> None:  # noqa: F811
    page = await browser_login(browser, full, "drew")
    casey = await login(full, http_session := ClientSession(), "casey")
    try:
        _, created = await casey.call("POST", "/api/sessions", {"clients": 1})
        await casey.call("POST", f"/api/sessions/{created['session']}/cancel", {})
        _, history = await casey.call("GET", "/api/history")
    finally:
        await http_session.close()
    entry = next(e for e in history["records"] if e["record"]["session"] == created["session"])
    checks = await page.evaluate(
        """async (entry) => {
            const d = await import('/static/js/dashboard.js');
            const tampered = structuredClone(entry);
            tampered.record.end_reason = "ended";
            return [await d.verifySignedRecord(entry), await d.verifySignedRecord(tampered)];
        }""",
        entry,
    )
    assert checks == [True, False]
    await page.context.close()


@pytest.mark.browser
async def test_the_relay_choice_appears_when_turn_is_configured(tmp_path: Path, browser: Any) -> None:  # noqa: F811
    with_turn = await start_full_broker(tmp_path / "data", turn_urls=("turn:127.0.0.1:3478",), turn_secret="s" * 40)
    try:
        await with_turn.auth.accounts.add("finley", PASSWORD)
        page = await browser_login(browser, with_turn, "finley")
        relay = page.get_by_role("checkbox", name="Relay the call through the practice's TURN server")
        await expect(relay).to_be_visible()
        await relay.check()
        card = await schedule_in_page(page)
        await expect(card.locator(".facts")).to_contain_text("relayed")
        await page.context.close()
    finally:
        await with_turn.stop()


async def test_a_session_that_expires_with_someone_in_is_in_the_history(full: FullBroker, http: ClientSession) -> None:  # noqa: F811
    casey = await login(full, http, "casey")
    _, me = await casey.call("GET", "/api/me")
    _, created = await casey.call("POST", "/api/sessions", {"clients": 1})
    hub = full.broker.hub

    def window_over(session: Any) -> None:
        session.expires = int(time.time()) - 1

    await hub.records.mutate(created["session"], window_over)
    await hub.expire_due(created["session"])
    entries = await hub.history.records(me["therapist"]["id"])
    assert [e.record["end_reason"] for e in entries if e.record["session"] == created["session"]] == ["expired"]


async def test_the_history_keeps_30_days_and_a_bounded_number() -> None:
    now = [1_800_000_000.0]
    history = SessionHistory(MemoryStore(lambda: now[0]), lambda: now[0])

    def entry(session: str, ended: float) -> SignedRecord:
        return SignedRecord({"session": session, "ended": int(ended)}, "sig", "kid")

    await history.add("t", entry("old", now[0] - KEEP_S - 10))
    await history.add("t", entry("recent", now[0] - 3600))
    await history.add("t", entry("newest", now[0]))
    assert [e.record["session"] for e in await history.records("t")] == ["newest", "recent"]
    now[0] += KEEP_S - 1800  # "recent" is now over 30 days old
    assert [e.record["session"] for e in await history.records("t")] == ["newest"]
    assert await history.records("someone else") == []
    for i in range(MAX_RECORDS + 5):
        await history.add("bounded", entry(f"s{i}", now[0] - 60 + i / 1000))
    kept = await history.records("bounded")
    assert len(kept) == MAX_RECORDS and kept[0].record["session"] == f"s{MAX_RECORDS + 4}"


@pytest.mark.redis
async def test_the_history_on_redis_is_sealed_and_kept_30_days(redis_server: RedisServer) -> None:  # noqa: F811
    redis_server.ensure_running()
    store = RedisStore(redis_client(redis_server.url), Sealer(b"k" * 32))
    try:
        history = SessionHistory(store)
        session = "Sess" + secrets.token_hex(8)
        therapist = "ther" + secrets.token_hex(8)
        await history.add(therapist, SignedRecord({"session": session, "ended": int(time.time())}, "sig", "kid"))
        assert [e.record["session"] for e in await SessionHistory(store).records(therapist)] == [session]
        raw_key = [k async for k in store.redis.scan_iter(match=f"*{therapist}*")][0]
        raw = await store.redis.get(raw_key)
        assert raw is not None and session.encode() not in raw
        ttl = await store.redis.ttl(raw_key)
        assert KEEP_S - 60 <= ttl <= KEEP_S
    finally:
        await store.close()
