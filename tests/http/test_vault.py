"""The vault routes on a full broker: a wrapped vault key stored once, sealed items per session and
slot, strict shapes and limits, the password change that re-wraps, and the admin reset that drops it.

The sealing itself happens in the browser (web/js/vault.js); here a Python port of the same
construction (PBKDF2-SHA256 wrap, AES-GCM items bound to account, session and slot) plays the
browser, so the test also pins the construction docs/protocol.md 15.21 describes.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import ClientSession, DummyCookieJar
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from broker.http.vault_routes import SEALED_MAX
from tests.http.test_dashboard import Therapist, login
from tests.http.test_web_auth import PASSWORD, FullBroker, start_full_broker

pytestmark = pytest.mark.asyncio(loop_scope="session")

ITERATIONS = 100_000  # the lowest the broker takes; the page uses 600,000
NEW_PASSWORD = "harbour willow steadily 8352"
LABEL_CANARY = "canary-label Sam & Alex 6c1e"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def wrap(vault_key: bytes, password: str, therapist: str) -> dict[str, Any]:
    """What the page sends: the vault key wrapped under PBKDF2(password) (docs/protocol.md 15.21)."""
    salt = os.urandom(16)
    kek = PBKDF2HMAC(SHA256(), 32, salt, ITERATIONS).derive(password.encode())
    nonce = os.urandom(12)
    aad = b"\0".join([b"broker vault key v1", b"password", therapist.encode()])
    wrapped = AESGCM(kek).encrypt(nonce, vault_key, aad)
    return {
        "v": 1,
        "kdf": "pbkdf2-sha256",
        "iterations": ITERATIONS,
        "salt": b64(salt),
        "wrapped": b64(nonce + wrapped),
    }


def unwrap(record: dict[str, Any], password: str, therapist: str) -> bytes:
    kek = PBKDF2HMAC(SHA256(), 32, unb64(record["salt"]), record["iterations"]).derive(password.encode())
    blob = unb64(record["wrapped"])
    aad = b"\0".join([b"broker vault key v1", b"password", therapist.encode()])
    return AESGCM(kek).decrypt(blob[:12], blob[12:], aad)


def seal(vault_key: bytes, therapist: str, session: str, slot: str, value: Any) -> str:
    nonce = os.urandom(12)
    aad = b"\0".join([b"broker vault item v1", therapist.encode(), session.encode(), slot.encode()])
    return b64(nonce + AESGCM(vault_key).encrypt(nonce, json.dumps(value).encode(), aad))


@pytest_asyncio.fixture(loop_scope="session")
async def full(tmp_path: Path) -> AsyncIterator[FullBroker]:
    running = await start_full_broker(tmp_path / "data")
    for name in ("alex", "blair"):
        await running.auth.accounts.add(name, PASSWORD)
    yield running
    await running.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def http() -> AsyncIterator[ClientSession]:
    async with ClientSession(cookie_jar=DummyCookieJar()) as session:
        yield session


async def therapist_id(t: Therapist) -> str:
    status, me = await t.call("GET", "/api/me")
    assert status == 200
    return str(me["therapist"]["id"])


async def scheduled(t: Therapist, clients: int = 2) -> dict[str, Any]:
    status, created = await t.call("POST", "/api/sessions", {"clients": clients})
    assert status == 200, created
    return dict(created)


async def test_the_wrapped_vault_key_is_stored_once_and_read_back(full: FullBroker, http: ClientSession) -> None:
    alex = await login(full, http, "alex")
    me = await therapist_id(alex)
    assert await alex.call("GET", "/api/vault") == (200, {"vault": None, "items": {}})
    key = os.urandom(32)
    record = wrap(key, PASSWORD, me)
    assert (await alex.call("POST", "/api/vault", record))[0] == 200
    status, answer = await alex.call("GET", "/api/vault")
    assert status == 200 and answer["vault"] == record
    assert unwrap(answer["vault"], PASSWORD, me) == key
    # A second vault would make every label unreadable: refused, the first one stays.
    status, answer = await alex.call("POST", "/api/vault", wrap(os.urandom(32), PASSWORD, me))
    assert (status, answer["error"]) == (409, "vault_exists")
    assert (await alex.call("GET", "/api/vault"))[1]["vault"] == record
    # Another therapist has their own (none yet).
    blair = await login(full, http, "blair")
    assert (await blair.call("GET", "/api/vault"))[1]["vault"] is None


@pytest.mark.parametrize(
    "change",
    [
        {"iterations": 99_999},
        {"iterations": 10_000_001},
        {"kdf": "sha1"},
        {"v": 2},
        {"salt": "A" * 21},
        {"wrapped": "A" * 79 + "="},
        {"wrapped": "A" * 81},
        {"extra": "field"},
    ],
)
async def test_wrong_vault_records_are_refused_and_nothing_is_stored(
    full: FullBroker, http: ClientSession, change: dict[str, Any]
) -> None:
    alex = await login(full, http, "alex")
    record = {**wrap(os.urandom(32), PASSWORD, await therapist_id(alex)), **change}
    status, answer = await alex.call("POST", "/api/vault", record)
    assert (status, answer["error"]) == (400, "bad_request"), answer
    assert (await alex.call("GET", "/api/vault"))[1]["vault"] is None


async def test_sealed_items_per_session_and_slot(full: FullBroker, http: ClientSession) -> None:
    alex = await login(full, http, "alex")
    me = await therapist_id(alex)
    key = os.urandom(32)
    created = await scheduled(alex)
    sid = created["session"]
    clients = [s["peer"] for s in created["seats"] if s["role"] == "client"]
    therapist_seat = next(s["peer"] for s in created["seats"] if s["role"] == "therapist")
    items = {
        "session": seal(key, me, sid, "session", {"label": LABEL_CANARY, "note": "second session"}),
        clients[0]: seal(key, me, sid, clients[0], {"label": "Sam", "note": ""}),
        "secret": seal(key, me, sid, "secret", {"key": "k" * 43, "group": None}),
    }
    for slot, sealed in items.items():
        status, answer = await alex.call("POST", "/api/vault/items", {"session": sid, "slot": slot, "sealed": sealed})
        assert status == 200, answer
    status, answer = await alex.call("GET", "/api/vault")
    assert status == 200 and answer["items"] == {sid: items}
    # Null removes one item.
    assert (await alex.call("POST", "/api/vault/items", {"session": sid, "slot": clients[0], "sealed": None}))[0] == 200
    assert set((await alex.call("GET", "/api/vault"))[1]["items"][sid]) == {"session", "secret"}

    # Not a client seat of this session, not one's own session, or no session: 404, nothing stored.
    blair = await login(full, http, "blair")
    refused = [
        (alex, {"session": sid, "slot": therapist_seat, "sealed": items["session"]}),
        (alex, {"session": sid, "slot": "nobody", "sealed": items["session"]}),
        (alex, {"session": "nosuchsession", "slot": "session", "sealed": items["session"]}),
        (blair, {"session": sid, "slot": "session", "sealed": items["session"]}),
    ]
    for who, body in refused:
        status, answer = await who.call("POST", "/api/vault/items", body)
        assert (status, answer["error"]) == (404, "not_found"), body
    assert (await blair.call("GET", "/api/vault"))[1]["items"] == {}
    assert set((await alex.call("GET", "/api/vault"))[1]["items"][sid]) == {"session", "secret"}


async def test_item_shapes_and_limits(full: FullBroker, http: ClientSession) -> None:
    alex = await login(full, http, "alex")
    sid = (await scheduled(alex, 1))["session"]
    biggest = "A" * SEALED_MAX
    status, _ = await alex.call("POST", "/api/vault/items", {"session": sid, "slot": "session", "sealed": biggest})
    assert status == 200
    bad = [
        {"session": sid, "slot": "session", "sealed": biggest + "A"},  # too long
        {"session": sid, "slot": "session", "sealed": "not base64url!" * 4},
        {"session": sid, "slot": "session", "sealed": "A" * 37},  # shorter than a nonce and a tag
        {"session": sid, "slot": "../session", "sealed": "A" * 64},
        {"session": sid, "slot": "session"},  # sealed missing
        {"session": sid, "slot": "session", "sealed": "A" * 64, "label": "in clear"},
        {"session": sid, "slot": "session", "sealed": 5},
    ]
    for body in bad:
        status, answer = await alex.call("POST", "/api/vault/items", body)
        assert (status, answer["error"]) == (400, "bad_request"), body
    assert (await alex.call("GET", "/api/vault"))[1]["items"][sid] == {"session": biggest}


async def test_nothing_of_the_vault_is_stored_in_clear(full: FullBroker, http: ClientSession, tmp_path: Path) -> None:
    """The wrapped key is sealed again at rest in the account store and the items in the store's
    journal, so not even the ciphertext texts the page sent appear in the data directory."""
    alex = await login(full, http, "alex")
    me = await therapist_id(alex)
    record = wrap(os.urandom(32), PASSWORD, me)
    assert (await alex.call("POST", "/api/vault", record))[0] == 200
    sid = (await scheduled(alex, 1))["session"]
    sealed = seal(os.urandom(32), me, sid, "session", {"label": LABEL_CANARY})
    status, _ = await alex.call("POST", "/api/vault/items", {"session": sid, "slot": "session", "sealed": sealed})
    assert status == 200
    data = b"".join(p.read_bytes() for p in (tmp_path / "data").rglob("*") if p.is_file())
    for text in (record["wrapped"], record["salt"], sealed, LABEL_CANARY):
        assert text.encode() not in data


async def test_a_password_change_re_wraps_the_vault_key(full: FullBroker, http: ClientSession) -> None:
    alex = await login(full, http, "alex")
    other = await login(full, http, "alex")
    me = await therapist_id(alex)
    key = os.urandom(32)
    record = wrap(key, PASSWORD, me)
    assert (await alex.call("POST", "/api/vault", record))[0] == 200
    rewrapped = wrap(key, NEW_PASSWORD, me)

    wrong = {"password": "not the password 42", "new_password": NEW_PASSWORD, "vault": rewrapped}
    status, answer = await alex.call("POST", "/api/password", wrong)
    assert (status, answer["error"]) == (403, "reauth_failed")
    status, answer = await alex.call("POST", "/api/password", {"password": PASSWORD, "new_password": NEW_PASSWORD})
    assert (status, answer["error"]) == (400, "vault_required")
    weak = {"password": PASSWORD, "new_password": "short", "vault": rewrapped}
    status, answer = await alex.call("POST", "/api/password", weak)
    assert (status, answer["error"]) == (400, "password_rejected")
    assert (await alex.call("GET", "/api/vault"))[1]["vault"] == record  # nothing changed so far

    good = {"password": PASSWORD, "new_password": NEW_PASSWORD, "vault": rewrapped}
    async with http.post(full.url + "/api/password", json=good, headers=alex.headers()) as r:
        assert r.status == 200, await r.text()
        renewed = Therapist(full, http, r.cookies["__Host-broker_login"].value, (await r.json())["csrf"])
    status, answer = await renewed.call("GET", "/api/vault")
    assert status == 200 and unwrap(answer["vault"], NEW_PASSWORD, me) == key
    assert (await other.call("GET", "/api/vault"))[0] == 401  # every other login ended
    async with http.post(
        full.url + "/api/login", json={"username": "alex", "password": PASSWORD}, headers={"Origin": full.url}
    ) as r:
        assert r.status == 401


async def test_an_admin_password_reset_drops_the_wrapped_vault_key(full: FullBroker, http: ClientSession) -> None:
    alex = await login(full, http, "alex")
    me = await therapist_id(alex)
    assert (await alex.call("POST", "/api/vault", wrap(os.urandom(32), PASSWORD, me)))[0] == 200
    await full.auth.accounts.reset_password(me, NEW_PASSWORD)
    async with http.post(
        full.url + "/api/login", json={"username": "alex", "password": NEW_PASSWORD}, headers={"Origin": full.url}
    ) as r:
        assert r.status == 200
        fresh = Therapist(full, http, r.cookies["__Host-broker_login"].value, (await r.json())["csrf"])
    assert (await fresh.call("GET", "/api/vault"))[1]["vault"] is None
    assert (await fresh.call("POST", "/api/vault", wrap(os.urandom(32), NEW_PASSWORD, me)))[0] == 200


async def test_the_vault_needs_a_full_login(full: FullBroker, http: ClientSession) -> None:
    async with http.get(full.url + "/api/vault") as r:
        assert r.status == 401
    headers = {"Origin": full.url, "X-CSRF-Token": "x"}
    async with http.post(full.url + "/api/vault/items", json={}, headers=headers) as r:
        assert r.status in (401, 403)
