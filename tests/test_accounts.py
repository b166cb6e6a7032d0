"""Therapist accounts: storage without clear identities, login answers, TOTP, lockout."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker import totp
from broker.accounts import (
    INVALID_CREDENTIALS,
    OK,
    RECOVERY_CODE_USED,
    SECOND_FACTOR_ENROLMENT_REQUIRED,
    SECOND_FACTOR_REQUIRED,
    AccountNotFound,
    AccountStore,
    InvalidUsername,
    LoginResult,
    UsernameTaken,
)
from broker.passwords import PasswordRejected, ScryptParams

CHEAP = ScryptParams(n=2**10, r=8, p=1)
KEY = bytes(range(32))
USERNAME = "canary.user.q7x"
DISPLAY = "Dr Canaryname Quixotic"
PASSWORD = "tqvmzkrwjphxbnlcg fd"
NEW_PASSWORD = "plover umbra gantry 77"
T0 = 1_800_000_015.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "accounts.sqlite3"


@pytest.fixture
def store(db_path: Path, clock: Clock) -> Iterator[AccountStore]:
    s = AccountStore(db_path, KEY, scrypt_params=CHEAP, clock=clock)
    yield s
    s.close()


async def login(
    store: AccountStore, username: str, password: str, code: str | None = None, *, require: bool = False
) -> LoginResult:
    return await store.verify_login(username, password, code, require_second_factor=require)


async def enrol(store: AccountStore, therapist_id: str, clock: Clock) -> tuple[bytes, list[str]]:
    enrolment = await store.enable_totp(therapist_id, "Harbour Counselling")
    codes = await store.confirm_totp(therapist_id, totp.code_at(enrolment.secret, clock.now))
    assert codes is not None
    clock.now += 30  # the confirmation spent this step
    return enrolment.secret, codes


async def test_add_and_look_up(store: AccountStore) -> None:
    tid = await store.add(USERNAME, PASSWORD, DISPLAY)
    assert len(tid) >= 16 and USERNAME not in tid
    account = await store.get(tid)
    assert account is not None
    assert (account.username, account.display_name, account.disabled, account.locked) == (
        USERNAME,
        DISPLAY,
        False,
        False,
    )
    assert not account.totp_enabled and account.recovery_codes_left == 0
    assert account.created_at.endswith("Z")
    by_name = await store.get_by_username(USERNAME.upper())
    assert by_name == account
    assert [a.id for a in await store.list()] == [tid]
    assert await store.get("no-such-id-00000000") is None
    assert await store.get_by_username("nobody.here") is None


async def test_username_is_unique_case_insensitively(store: AccountStore) -> None:
    await store.add(USERNAME, PASSWORD)
    with pytest.raises(UsernameTaken):
        await store.add(USERNAME.upper(), NEW_PASSWORD)


async def test_bad_usernames_are_refused(store: AccountStore) -> None:
    for bad in ("ab", "has space", "x" * 65, "tab\there"):
        with pytest.raises(InvalidUsername):
            await store.add(bad, PASSWORD)


async def test_password_policy_applies(store: AccountStore) -> None:
    with pytest.raises(PasswordRejected, match="at least 15"):
        await store.add(USERNAME, "short but ok?")
    with pytest.raises(PasswordRejected, match="login name"):
        await store.add(USERNAME, f"my name is {USERNAME} ok")
    # With a second factor required, 8 characters are enough.
    assert await store.add(USERNAME, "zq7vmkrw", second_factor=True)


async def test_file_holds_no_identity_in_clear(store: AccountStore, db_path: Path, clock: Clock) -> None:
    tid = await store.add(USERNAME, PASSWORD, DISPLAY)
    await store.add("second.canary.zz", NEW_PASSWORD, "Ms Otherperson Yellowhammer")
    await enrol(store, tid, clock)
    await store.reset_password(tid, NEW_PASSWORD)
    await login(store, USERNAME, NEW_PASSWORD)
    store.close()
    raw = b"".join(p.read_bytes() for p in db_path.parent.iterdir() if p.is_file())
    assert raw, "the accounts file should exist"
    for canary in (USERNAME, DISPLAY, "Canaryname", "second.canary.zz", "Yellowhammer", PASSWORD, NEW_PASSWORD):
        for form in (canary, canary.lower(), canary.upper()):
            assert form.encode("utf-8") not in raw
            assert form.encode("utf-16-le") not in raw


async def test_file_is_private(store: AccountStore, db_path: Path) -> None:
    await store.add(USERNAME, PASSWORD)
    assert stat.S_IMODE(os.stat(db_path).st_mode) == 0o600


async def test_wrong_key_is_detected(store: AccountStore, db_path: Path) -> None:
    await store.add(USERNAME, PASSWORD)
    with pytest.raises(ValueError, match="different key"):
        AccountStore(db_path, bytes(32), scrypt_params=CHEAP)
    with pytest.raises(ValueError):
        AccountStore(db_path, b"short", scrypt_params=CHEAP)


async def test_accounts_survive_reopening(store: AccountStore, db_path: Path) -> None:
    tid = await store.add(USERNAME, PASSWORD, DISPLAY)
    store.close()
    again = AccountStore(db_path, KEY, scrypt_params=CHEAP)
    try:
        assert (await again.get(tid)) is not None
        assert (await login(again, USERNAME, PASSWORD)).ok
    finally:
        again.close()


async def test_login_without_second_factor(store: AccountStore) -> None:
    tid = await store.add(USERNAME, PASSWORD)
    assert await login(store, USERNAME, PASSWORD) == LoginResult(True, tid, OK)
    assert await login(store, f"  {USERNAME.upper()} ", PASSWORD) == LoginResult(True, tid, OK)


async def test_unknown_user_and_wrong_password_look_identical(store: AccountStore) -> None:
    tid = await store.add(USERNAME, PASSWORD)
    unknown = await login(store, "nobody.at.all", PASSWORD)
    wrong = await login(store, USERNAME, NEW_PASSWORD)
    invalid_name = await login(store, "x", PASSWORD)
    assert unknown == wrong == invalid_name == LoginResult(False, None, INVALID_CREDENTIALS)
    await store.disable(tid)
    assert await login(store, USERNAME, PASSWORD) == unknown


async def test_unknown_user_still_costs_a_password_hash(store: AccountStore) -> None:
    # The dummy hash for unknown names uses the same cost as real ones.
    await login(store, "nobody.at.all", PASSWORD)
    assert store._dummy_hash is not None
    assert store._dummy_hash.startswith(f"scrypt${CHEAP.n}${CHEAP.r}${CHEAP.p}$")


async def test_second_factor_enrolment_required(store: AccountStore) -> None:
    tid = await store.add(USERNAME, PASSWORD)
    result = await login(store, USERNAME, PASSWORD, require=True)
    assert result == LoginResult(False, tid, SECOND_FACTOR_ENROLMENT_REQUIRED)
    assert await login(store, USERNAME, NEW_PASSWORD, require=True) == LoginResult(False, None, INVALID_CREDENTIALS)


async def test_totp_enrol_verify_and_replay_refused(store: AccountStore, clock: Clock) -> None:
    tid = await store.add(USERNAME, PASSWORD)
    enrolment = await store.enable_totp(tid, "Harbour Counselling")
    assert "Harbour%20Counselling" in enrolment.uri and enrolment.qr_svg.startswith("<svg")
    assert not (await store.get(tid)).totp_enabled  # type: ignore[union-attr]
    assert (
        await store.confirm_totp(tid, "000000" if totp.code_at(enrolment.secret, T0) != "000000" else "111111") is None
    )
    codes = await store.confirm_totp(tid, totp.code_at(enrolment.secret, T0))
    assert codes is not None and len(codes) == 10
    account = await store.get(tid)
    assert account is not None and account.totp_enabled and account.recovery_codes_left == 10

    # The step used to confirm cannot log in again.
    assert await login(store, USERNAME, PASSWORD, totp.code_at(enrolment.secret, T0)) == LoginResult(
        False, None, INVALID_CREDENTIALS
    )
    assert await login(store, USERNAME, PASSWORD) == LoginResult(False, None, SECOND_FACTOR_REQUIRED)
    clock.now += 30
    code = totp.code_at(enrolment.secret, clock.now)
    assert await login(store, USERNAME, PASSWORD, code, require=True) == LoginResult(True, tid, OK)
    assert await login(store, USERNAME, PASSWORD, code, require=True) == LoginResult(False, None, INVALID_CREDENTIALS)
    # A right code with a wrong password is the generic answer too.
    clock.now += 30
    code = totp.code_at(enrolment.secret, clock.now)
    assert await login(store, USERNAME, NEW_PASSWORD, code) == LoginResult(False, None, INVALID_CREDENTIALS)


async def test_concurrent_logins_cannot_spend_one_step_twice(store: AccountStore, clock: Clock) -> None:
    tid = await store.add(USERNAME, PASSWORD)
    secret, _ = await enrol(store, tid, clock)
    code = totp.code_at(secret, clock.now)
    results = await asyncio.gather(*(login(store, USERNAME, PASSWORD, code) for _ in range(4)))
    assert sum(r.ok for r in results) == 1


async def test_recovery_code_works_once(store: AccountStore, clock: Clock) -> None:
    tid = await store.add(USERNAME, PASSWORD)
    _, codes = await enrol(store, tid, clock)
    assert await login(store, USERNAME, PASSWORD, codes[0].lower()) == LoginResult(True, tid, RECOVERY_CODE_USED)
    assert await login(store, USERNAME, PASSWORD, codes[0]) == LoginResult(False, None, INVALID_CREDENTIALS)
    assert (await store.get(tid)).recovery_codes_left == 9  # type: ignore[union-attr]
    fresh = await store.new_recovery_codes(tid)
    assert await login(store, USERNAME, PASSWORD, codes[1]) == LoginResult(False, None, INVALID_CREDENTIALS)
    assert (await login(store, USERNAME, PASSWORD, fresh[1])).ok


async def test_reset_2fa(store: AccountStore, clock: Clock) -> None:
    tid = await store.add(USERNAME, PASSWORD)
    await enrol(store, tid, clock)
    await store.reset_2fa(tid)
    account = await store.get(tid)
    assert account is not None and not account.totp_enabled and account.recovery_codes_left == 0
    assert await login(store, USERNAME, PASSWORD) == LoginResult(True, tid, OK)


async def test_lockout_after_100_failures_and_admin_unlock(store: AccountStore) -> None:
    tid = await store.add(USERNAME, PASSWORD)
    for _ in range(99):
        assert not (await login(store, USERNAME, NEW_PASSWORD)).ok
    assert not (await store.get(tid)).locked  # type: ignore[union-attr]
    await login(store, USERNAME, NEW_PASSWORD)
    assert (await store.get(tid)).locked  # type: ignore[union-attr]
    # Even the right password is now refused, with the same generic answer.
    assert await login(store, USERNAME, PASSWORD) == LoginResult(False, None, INVALID_CREDENTIALS)
    await store.unlock(tid)
    assert await login(store, USERNAME, PASSWORD) == LoginResult(True, tid, OK)


async def test_success_resets_failure_count(db_path: Path) -> None:
    s = AccountStore(db_path, KEY, scrypt_params=CHEAP, lockout_after=5)
    try:
        tid = await s.add(USERNAME, PASSWORD)
        for _ in range(4):
            await login(s, USERNAME, NEW_PASSWORD)
        assert (await login(s, USERNAME, PASSWORD)).ok
        for _ in range(4):
            await login(s, USERNAME, NEW_PASSWORD)
        assert not (await s.get(tid)).locked  # type: ignore[union-attr]
        await login(s, USERNAME, NEW_PASSWORD)
        assert (await s.get(tid)).locked  # type: ignore[union-attr]
    finally:
        s.close()


async def test_disable_and_enable(store: AccountStore) -> None:
    tid = await store.add(USERNAME, PASSWORD)
    await store.disable(tid)
    assert (await store.get(tid)).disabled  # type: ignore[union-attr]
    assert not (await login(store, USERNAME, PASSWORD)).ok
    await store.enable(tid)
    assert (await login(store, USERNAME, PASSWORD)).ok


async def test_reset_password(store: AccountStore) -> None:
    tid = await store.add(USERNAME, PASSWORD)
    with pytest.raises(PasswordRejected):
        await store.reset_password(tid, "passwordpassword")
    await store.reset_password(tid, NEW_PASSWORD)
    assert not (await login(store, USERNAME, PASSWORD)).ok
    assert await login(store, USERNAME, NEW_PASSWORD) == LoginResult(True, tid, OK)


async def test_unknown_id_raises(store: AccountStore) -> None:
    for call in (store.disable, store.enable, store.unlock, store.reset_2fa):
        with pytest.raises(AccountNotFound):
            await call("no-such-id-00000000")
    with pytest.raises(AccountNotFound):
        await store.reset_password("no-such-id-00000000", NEW_PASSWORD)


async def test_login_upgrades_hash_when_cost_is_raised(store: AccountStore, db_path: Path) -> None:
    tid = await store.add(USERNAME, PASSWORD)
    store.close()
    stronger = ScryptParams(n=2**11, r=8, p=1)
    upgraded = AccountStore(db_path, KEY, scrypt_params=stronger)
    try:
        assert (await login(upgraded, USERNAME, PASSWORD)).ok
        with sqlite3.connect(db_path) as conn:
            (stored,) = conn.execute("SELECT password_hash FROM therapist WHERE id = ?", (tid,)).fetchone()
        assert stored.startswith("scrypt$2048$8$1$")
        assert (await login(upgraded, USERNAME, PASSWORD)).ok
    finally:
        upgraded.close()
