"""Passkeys as a second factor over HTTP, answered by a software authenticator with real signatures.

The harness is the one of test_web_auth.py (a small app with ``setup_auth`` and a fake clock);
here its public address is a host name, since browsers refuse passkeys on an IP address.
"""

from __future__ import annotations

from typing import Any

import pytest

from broker.audit.log import verify
from broker.config import Keys
from tests.http.test_web_auth import ORIGIN, PASSWORD, Harness, login_cookie, make_harness  # noqa: F401 - the fixture
from tests.soft_authenticator import SoftAuthenticator

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def harness(make: Any, **fields: Any) -> Harness:
    h: Harness = await make(public_url=ORIGIN, **fields)
    return h


async def register(h: Harness, cookie: str, csrf: str, key: SoftAuthenticator) -> Any:
    options = await h.request("POST", "/api/passkeys/options", json={}, cookie=cookie, csrf=csrf)
    assert options.status == 200, options.body
    credential = key.create(options.json())
    return await h.request("POST", "/api/passkeys", json={"credential": credential}, cookie=cookie, csrf=csrf)


async def passkey_login(h: Harness, key: SoftAuthenticator, **get_options: Any) -> Any:
    first = await h.login("robin")
    assert first.status == 401 and first.json()["error"] == "second_factor_required", first.body
    assertion = key.get(first.json()["passkey"], **get_options)
    body = {"username": "robin", "password": PASSWORD, "passkey": assertion}
    return await h.request("POST", "/api/login", json=body)


async def enrolled(make: Any, **fields: Any) -> tuple[Harness, SoftAuthenticator]:
    h = await harness(make, **fields)
    await h.accounts.add("robin", PASSWORD)
    cookie, csrf = await h.logged_in("robin")
    key = SoftAuthenticator(ORIGIN)
    reply = await register(h, cookie, csrf, key)
    assert reply.status == 200, reply.body
    return h, key


async def test_register_then_log_in_with_the_passkey(make_harness: Any) -> None:
    h = await harness(make_harness)
    tid = await h.accounts.add("robin", PASSWORD)
    cookie, csrf = await h.logged_in("robin")
    key = SoftAuthenticator(ORIGIN)
    reply = await register(h, cookie, csrf, key)
    assert reply.status == 200, reply.body
    body = reply.json()
    assert body["therapist"]["passkeys"] == 1 and body["passkeys_available"] is True
    assert len(body["recovery_codes"]) >= 8  # the first second factor comes with recovery codes
    assert (await h.request("GET", "/api/me", cookie=cookie)).status == 401  # a new factor, a new cookie
    cookie = login_cookie(reply)
    listed = await h.request("GET", "/api/passkeys", cookie=cookie)
    assert [p["id"] for p in listed.json()["passkeys"]] == [reply_id(key)]

    first = await h.login("robin")
    assert first.status == 401
    assert first.json()["factors"] == ["passkey", "code"]
    assert first.json()["passkey"]["publicKey"]["allowCredentials"][0]["id"] == reply_id(key)
    assertion = key.get(first.json()["passkey"])
    done = await h.request("POST", "/api/login", json={"username": "robin", "password": PASSWORD, "passkey": assertion})
    assert done.status == 200, done.body
    assert done.json()["therapist"]["id"] == tid
    assert (await h.request("GET", "/api/me", cookie=login_cookie(done))).status == 200
    stored = await h.accounts.passkeys(tid)
    assert stored[0]["sign_count"] == 1
    assert "second_factor_changed" in h.audit_events() and h.audit_events()[-1] == "login_success"
    assert verify(h.audit.path, Keys(b"k" * 32).audit).ok


def reply_id(key: SoftAuthenticator) -> str:
    from tests.soft_authenticator import b64url

    return b64url(key.credentials[-1].id)


async def test_password_alone_is_not_enough_once_a_passkey_exists(make_harness: Any) -> None:
    h, _ = await enrolled(make_harness)
    reply = await h.login("robin")
    assert reply.status == 401 and "login_cookie" not in reply.body.decode()
    assert not reply.cookies


async def test_a_replayed_assertion_is_refused(make_harness: Any) -> None:
    h, key = await enrolled(make_harness)
    first = await h.login("robin")
    assertion = key.get(first.json()["passkey"])
    body = {"username": "robin", "password": PASSWORD, "passkey": assertion}
    assert (await h.request("POST", "/api/login", json=body)).status == 200
    again = await h.request("POST", "/api/login", json=body)
    assert again.status == 401 and again.json()["error"] == "invalid_credentials"


@pytest.mark.parametrize(
    "tamper",
    ["wrong_origin", "wrong_rp", "bad_signature", "counter_went_back", "wrong_password", "unknown_credential"],
)
async def test_a_bad_assertion_is_refused_and_counted(make_harness: Any, tamper: str) -> None:
    h, key = await enrolled(make_harness)
    if tamper == "counter_went_back":
        assert (await passkey_login(h, key)).status == 200
        assert (await passkey_login(h, key, count_step=3)).status == 200
        key.credentials[-1].sign_count = 1  # a cloned authenticator lags behind
    first = await h.login("robin")
    options = first.json()["passkey"]
    get: dict[str, Any] = {}
    if tamper == "wrong_origin":
        get["origin"] = "https://evil.example"
    if tamper == "wrong_rp":
        get["rp_id"] = "evil.example"
    assertion = key.get(options, **get)
    if tamper == "bad_signature":
        from tests.soft_authenticator import b64url, unb64url

        sig = bytearray(unb64url(assertion["response"]["signature"]))
        sig[-1] ^= 1
        assertion["response"]["signature"] = b64url(bytes(sig))
    if tamper == "unknown_credential":
        other = SoftAuthenticator(ORIGIN)
        other.create({"publicKey": {"rp": {"id": "broker.test"}, "challenge": "AA"}})
        assertion = other.get({"publicKey": {"rpId": "broker.test", "challenge": options["publicKey"]["challenge"]}})
    password = "not the right password at all" if tamper == "wrong_password" else PASSWORD
    reply = await h.request(
        "POST", "/api/login", json={"username": "robin", "password": password, "passkey": assertion}
    )
    assert reply.status == 401 and reply.json()["error"] == "invalid_credentials"
    assert not reply.cookies
    account = await h.accounts.get_by_username("robin")
    row = await h.accounts.rows.by_id(account.id)  # type: ignore[union-attr]
    assert row is not None and row["failures"] == 1


async def test_unknown_user_with_a_passkey_answers_like_a_wrong_password(make_harness: Any) -> None:
    h, key = await enrolled(make_harness)
    first = await h.login("robin")
    assertion = key.get(first.json()["passkey"])
    unknown = await h.request(
        "POST", "/api/login", json={"username": "nobody-here", "password": PASSWORD, "passkey": assertion}
    )
    wrong = await h.request(
        "POST", "/api/login", json={"username": "robin", "password": "a wrong password 123", "passkey": assertion}
    )
    assert unknown.status == wrong.status == 401
    assert unknown.body == wrong.body


async def test_required_second_factor_can_be_a_passkey(make_harness: Any) -> None:
    h = await harness(make_harness, require_second_factor=True)
    await h.accounts.add("robin", PASSWORD)
    partial = await h.login("robin")
    assert partial.status == 200 and partial.json()["enrolment_required"] is True
    cookie, csrf = login_cookie(partial), partial.json()["csrf"]
    assert (await h.request("GET", "/api/protected", cookie=cookie)).status == 401
    key = SoftAuthenticator(ORIGIN)
    reply = await register(h, cookie, csrf, key)
    assert reply.status == 200 and reply.json()["enrolment_required"] is False
    full = login_cookie(reply)
    assert full != cookie  # new privileges, new session id
    assert (await h.request("GET", "/api/me", cookie=cookie)).status == 401
    assert (await h.request("GET", "/api/protected", cookie=full)).status == 200
    unknown = await h.request(
        "POST", "/api/passkeys/remove", json={"id": "not-a-passkey"}, cookie=full, csrf=reply.json()["csrf"]
    )
    assert unknown.status == 404  # an unknown id is "not found", whatever the policy
    # The only second factor cannot be removed while the practice requires one.
    removal = await h.request(
        "POST", "/api/passkeys/remove", json={"id": reply_id(key)}, cookie=full, csrf=reply.json()["csrf"]
    )
    assert removal.status == 409
    assert (await passkey_login(h, key)).status == 200


async def test_registration_needs_a_fresh_challenge_and_a_matching_origin(make_harness: Any) -> None:
    h = await harness(make_harness)
    await h.accounts.add("robin", PASSWORD)
    cookie, csrf = await h.logged_in("robin")
    key = SoftAuthenticator(ORIGIN)
    options = (await h.request("POST", "/api/passkeys/options", json={}, cookie=cookie, csrf=csrf)).json()
    forged = key.create(options, origin="https://evil.example")
    refused = await h.request("POST", "/api/passkeys", json={"credential": forged}, cookie=cookie, csrf=csrf)
    assert refused.status == 400 and refused.json()["error"] == "passkey_refused"
    # The challenge was spent by that attempt: the same options cannot be used again.
    again = await h.request("POST", "/api/passkeys", json={"credential": key.create(options)}, cookie=cookie, csrf=csrf)
    assert again.status == 400 and again.json()["error"] == "passkey_expired"
    me = await h.request("GET", "/api/me", cookie=cookie)
    assert me.json()["therapist"]["passkeys"] == 0


async def test_the_same_authenticator_cannot_register_twice(make_harness: Any) -> None:
    h = await harness(make_harness)
    await h.accounts.add("robin", PASSWORD)
    cookie, csrf = await h.logged_in("robin")
    key = SoftAuthenticator(ORIGIN)
    reply = await register(h, cookie, csrf, key)
    assert reply.status == 200
    cookie, csrf = login_cookie(reply), reply.json()["csrf"]
    options = (await h.request("POST", "/api/passkeys/options", json={}, cookie=cookie, csrf=csrf)).json()
    with pytest.raises(ValueError, match="InvalidStateError"):
        key.create(options)  # excludeCredentials lists it, so the authenticator refuses


async def test_removing_a_passkey(make_harness: Any) -> None:
    h, key = await enrolled(make_harness)
    cookie, csrf = login_cookie(await passkey_login(h, key)), None
    me = (await h.request("GET", "/api/me", cookie=cookie)).json()
    csrf = me["csrf"]
    missing = await h.request("POST", "/api/passkeys/remove", json={"id": "nope"}, cookie=cookie, csrf=csrf)
    assert missing.status == 404
    body = {"id": reply_id(key), "confirm_password_only": True}  # the last second factor: said so
    gone = await h.request("POST", "/api/passkeys/remove", json=body, cookie=cookie, csrf=csrf)
    assert gone.status == 200 and gone.json()["therapist"]["passkeys"] == 0
    assert (await h.login("robin")).status == 200  # back to password only


async def test_no_passkeys_on_an_ip_address(make_harness: Any) -> None:
    h = await make_harness()  # public address http://127.0.0.1:8080
    await h.accounts.add("robin", PASSWORD)
    cookie, csrf = await h.logged_in("robin")
    reply = await h.request("POST", "/api/passkeys/options", json={}, cookie=cookie, csrf=csrf)
    assert reply.status == 409 and reply.json()["error"] == "passkeys_unavailable"
    assert "IP address" in reply.json()["message"]
    assert (await h.request("GET", "/api/me", cookie=cookie)).json()["passkeys_available"] is False


async def test_passkey_routes_need_login_and_csrf(make_harness: Any) -> None:
    h = await harness(make_harness)
    await h.accounts.add("robin", PASSWORD)
    cookie, csrf = await h.logged_in("robin")
    assert (await h.request("POST", "/api/passkeys/options", json={})).status == 401
    assert (await h.request("POST", "/api/passkeys/options", json={}, cookie=cookie)).status == 403
    assert (await h.request("GET", "/api/passkeys")).status == 401
    odd = await h.request("POST", "/api/passkeys", json={"credential": {"id": 5}}, cookie=cookie, csrf=csrf)
    assert odd.status == 400


async def test_a_credential_of_the_wrong_shape_is_refused_not_a_500(make_harness: Any) -> None:
    """Part of review finding 10 (never a 500 for a bad body): the webauthn package reports a
    credential missing its parts with its own exception, which used to escape as a 500."""
    h = await harness(make_harness)
    await h.accounts.add("robin", PASSWORD)
    cookie, csrf = await h.logged_in("robin")
    shapes = ({}, {"id": "AAAA", "rawId": [], "response": []}, {"id": "AAAA", "rawId": "AAAA", "response": {}})
    for credential in shapes:
        options = await h.request("POST", "/api/passkeys/options", json={}, cookie=cookie, csrf=csrf)
        assert options.status == 200
        reply = await h.request("POST", "/api/passkeys", json={"credential": credential}, cookie=cookie, csrf=csrf)
        assert reply.status == 400 and reply.json()["error"] == "passkey_refused", reply.body

    key = SoftAuthenticator(ORIGIN)
    assert (await register(h, cookie, csrf, key)).status == 200
    first = await h.login("robin")
    odd = {"id": reply_id(key), "rawId": [], "response": []}  # names the real passkey, says nothing
    reply = await h.request("POST", "/api/login", json={"username": "robin", "password": PASSWORD, "passkey": odd})
    assert first.status == 401 and reply.status == 401 and reply.json()["error"] == "invalid_credentials"


async def test_adding_or_removing_a_passkey_ends_the_other_sessions(make_harness: Any) -> None:
    """Finding 3 for passkeys: the session that adds or removes one carries on under a fresh
    cookie; every other session of the therapist ends."""
    h = await harness(make_harness)
    await h.accounts.add("robin", PASSWORD)
    mine, my_csrf = await h.logged_in("robin")
    other, _ = await h.logged_in("robin")
    first_key = SoftAuthenticator(ORIGIN)
    added = await register(h, mine, my_csrf, first_key)
    assert added.status == 200
    assert (await h.request("GET", "/api/me", cookie=other)).status == 401
    assert (await h.request("GET", "/api/me", cookie=mine)).status == 401
    mine, my_csrf = login_cookie(added), added.json()["csrf"]
    assert (await h.request("GET", "/api/protected", cookie=mine)).status == 200

    second_key = SoftAuthenticator(ORIGIN)
    added = await register(h, mine, my_csrf, second_key)  # a second one: the login was just now
    assert added.status == 200 and added.json()["recovery_codes"] is None
    mine, my_csrf = login_cookie(added), added.json()["csrf"]
    other = login_cookie(await passkey_login(h, first_key))
    body = {"id": reply_id(first_key)}
    removed = await h.request("POST", "/api/passkeys/remove", json=body, cookie=mine, csrf=my_csrf)
    assert removed.status == 200 and removed.json()["password_only"] is False
    assert removed.json()["therapist"]["passkeys"] == 1
    assert (await h.request("GET", "/api/me", cookie=other)).status == 401
    assert (await h.request("GET", "/api/protected", cookie=login_cookie(removed))).status == 200
