"""Therapist accounts: storage without clear identities, login answers, TOTP, lockout.

Every test runs against both backends: the SQLite file of the embedded default and a real
redis-server (where accounts live when the broker runs on Redis).
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from broker.accounts import totp
from broker.accounts.account import (
    INVALID_CREDENTIALS,
    OK,
    RECOVERY_CODE_USED,
    SECOND_FACTOR_ENROLMENT_REQUIRED,
    SECOND_FACTOR_REQUIRED,
    AccountNotFound,
    InvalidUsername,
    LoginResult,
    UsernameTaken,
)
from broker.accounts.account_store import AccountStore
from broker.accounts.passwords import PasswordRejected, ScryptParams
from broker.accounts.rows_redis import RedisAccountRows, warn_if_not_persistent
from broker.store.redis_store import redis_client
from tests.redis_server import RedisServer, redis_server  # noqa: F401 - the fixture

# Accounts tests use their own Redis database, emptied before each test.
ACCOUNTS_DB = 7

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


@dataclass
class Backend:
    """Opens account stores on one backend and reads back every byte it holds."""

    kind: str
    db_path: Path
    redis_url: str = ""

    def open(self, key: bytes = KEY, **options: Any) -> AccountStore:
        if self.kind == "sqlite":
            return AccountStore(self.db_path, key, **options)
        return AccountStore(RedisAccountRows(redis_client(self.redis_url)), key, **options)

    async def raw(self) -> bytes:
        """Everything stored, as bytes: the SQLite files, or every Redis key and value."""
        if self.kind == "sqlite":
            return b"".join(p.read_bytes() for p in self.db_path.parent.iterdir() if p.is_file())
        client = aioredis.Redis.from_url(self.redis_url)
        try:
            parts = []
            async for key in client.scan_iter():
                parts.append(key)
                kind = await client.type(key)
                if kind == b"hash":
                    parts += [b for pair in (await client.hgetall(key)).items() for b in pair]
                elif kind == b"set":
                    parts += list(await client.smembers(key))
                else:
                    parts.append(await client.get(key))
            return b"\n".join(parts)
        finally:
            await client.aclose()


@pytest.fixture(params=["sqlite", "redis"])
async def backend(request: pytest.FixtureRequest, db_path: Path) -> AsyncIterator[Backend]:
    if request.param == "sqlite":
        yield Backend("sqlite", db_path)
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    yield Backend("redis", db_path, server.empty_database(ACCOUNTS_DB))


@pytest.fixture
async def store(backend: Backend, clock: Clock) -> AsyncIterator[AccountStore]:
    s = backend.open(scrypt_params=CHEAP, clock=clock)
    yield s
    await s.close()


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


async def test_storage_holds_no_identity_in_clear(store: AccountStore, backend: Backend, clock: Clock) -> None:
    tid = await store.add(USERNAME, PASSWORD, DISPLAY)
    await store.add("second.canary.zz", NEW_PASSWORD, "Ms Otherperson Yellowhammer")
    await enrol(store, tid, clock)
    await store.reset_password(tid, NEW_PASSWORD)
    await login(store, USERNAME, NEW_PASSWORD)
    await store.close()
    raw = await backend.raw()
    assert len(raw) > 200, "the accounts should be stored"
    for canary in (USERNAME, DISPLAY, "Canaryname", "second.canary.zz", "Yellowhammer", PASSWORD, NEW_PASSWORD):
        for form in (canary, canary.lower(), canary.upper()):
            assert form.encode("utf-8") not in raw
            assert form.encode("utf-16-le") not in raw


async def test_file_is_private(db_path: Path) -> None:
    store = AccountStore(db_path, KEY, scrypt_params=CHEAP)
    await store.add(USERNAME, PASSWORD)
    await store.close()
    assert stat.S_IMODE(os.stat(db_path).st_mode) == 0o600


async def test_wrong_key_is_detected(store: AccountStore, backend: Backend) -> None:
    await store.add(USERNAME, PASSWORD)
    with pytest.raises(ValueError, match="different key"):
        wrong = backend.open(bytes(32), scrypt_params=CHEAP)
        try:
            await wrong.list()
        finally:
            await wrong.close()
    with pytest.raises(ValueError):
        backend.open(b"short", scrypt_params=CHEAP)


async def test_accounts_survive_reopening(store: AccountStore, backend: Backend) -> None:
    tid = await store.add(USERNAME, PASSWORD, DISPLAY)
    await store.close()
    again = backend.open(scrypt_params=CHEAP)
    try:
        assert (await again.get(tid)) is not None
        assert (await login(again, USERNAME, PASSWORD)).ok
    finally:
        await again.close()


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


async def test_success_resets_failure_count(backend: Backend) -> None:
    s = backend.open(scrypt_params=CHEAP, lockout_after=5)
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
        await s.close()


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


async def test_login_upgrades_hash_when_cost_is_raised(store: AccountStore, backend: Backend) -> None:
    tid = await store.add(USERNAME, PASSWORD)
    await store.close()
    stronger = ScryptParams(n=2**11, r=8, p=1)
    upgraded = backend.open(scrypt_params=stronger)
    try:
        assert (await login(upgraded, USERNAME, PASSWORD)).ok
        row = await upgraded.rows.by_id(tid)
        assert row is not None
        assert row["password_hash"].startswith("scrypt$2048$8$1$")
        assert (await login(upgraded, USERNAME, PASSWORD)).ok
    finally:
        await upgraded.close()


async def test_two_processes_share_accounts_and_spend_a_totp_step_once(backend: Backend, clock: Clock) -> None:
    """Two stores on one backend stand for two broker processes: one code, 20 logins, one success."""
    one = backend.open(scrypt_params=CHEAP, clock=clock)
    two = backend.open(scrypt_params=CHEAP, clock=clock)
    try:
        tid = await one.add(USERNAME, PASSWORD)
        assert (await two.get_by_username(USERNAME)) is not None
        secret, _codes = await enrol(one, tid, clock)
        clock.now += 60
        code = totp.code_at(secret, clock.now)
        results = await asyncio.gather(*(login(one if i % 2 else two, USERNAME, PASSWORD, code) for i in range(20)))
        assert sum(r.ok for r in results) == 1
    finally:
        await one.close()
        await two.close()


async def test_sqlite_file_from_before_passkeys_is_upgraded_in_place(db_path: Path) -> None:
    old = AccountStore(db_path, KEY, scrypt_params=CHEAP)
    tid = await old.add(USERNAME, PASSWORD)
    await old.close()
    import sqlite3

    with sqlite3.connect(db_path) as conn:
        conn.execute("ALTER TABLE therapist DROP COLUMN passkeys_enc")
        conn.execute("ALTER TABLE therapist DROP COLUMN sessions_epoch")
    upgraded = AccountStore(db_path, KEY, scrypt_params=CHEAP)
    try:
        assert (await upgraded.get(tid)).sessions_epoch == ""  # type: ignore[union-attr]
        assert await upgraded.add_passkey(tid, {"id": "cred-1", "public_key": "pk", "sign_count": 0})
        assert (await upgraded.get(tid)).passkeys == 1  # type: ignore[union-attr]
        assert (await upgraded.get(tid)).sessions_epoch != ""  # type: ignore[union-attr]
    finally:
        await upgraded.close()


async def test_a_redis_without_persistence_is_reported(redis_server: RedisServer, caplog: Any) -> None:  # noqa: F811
    redis_server.ensure_running()
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        with caplog.at_level("WARNING", logger="broker.accounts"):
            assert not await warn_if_not_persistent(client)
        assert "event=accounts_redis_not_persistent" in caplog.text
        await client.config_set("appendonly", "yes")
        caplog.clear()
        assert await warn_if_not_persistent(client)
        assert "accounts_redis_not_persistent" not in caplog.text
    finally:
        await client.config_set("appendonly", "no")
        await client.aclose()


async def test_open_accounts_uses_redis_when_configured(redis_server: RedisServer, tmp_path: Path) -> None:  # noqa: F811
    from broker.accounts.account_store import open_accounts
    from broker.config import Config, Keys

    url = redis_server.empty_database(ACCOUNTS_DB)
    keys = Keys(bytes(range(32)))
    on_redis = await open_accounts(Config(data_dir=tmp_path, redis_url=url), keys, scrypt_params=CHEAP)
    split = await open_accounts(
        Config(data_dir=tmp_path / "b", redis_url="redis://127.0.0.1:1/0", accounts_redis_url=url),
        keys,
        scrypt_params=CHEAP,
    )
    local = await open_accounts(Config(data_dir=tmp_path / "c"), keys, scrypt_params=CHEAP)
    try:
        name = "shared.name." + os.urandom(3).hex()
        await on_redis.add(name, PASSWORD)
        assert await split.get_by_username(name) is not None
        assert await local.get_by_username(name) is None
        assert isinstance(on_redis.rows, RedisAccountRows)
        assert (tmp_path / "c" / "accounts.sqlite3").exists()
        assert not (tmp_path / "accounts.sqlite3").exists()
    finally:
        for s in (on_redis, split, local):
            await s.close()


def test_therapist_ids_never_look_like_command_line_options() -> None:
    from broker.accounts.account import new_therapist_id

    ids = [new_therapist_id() for _ in range(2000)]  # about 30 would start with "-" otherwise
    assert not [i for i in ids if i.startswith("-")]
    assert len(set(ids)) == 2000 and all(len(i) == 22 for i in ids)


async def test_the_sessions_epoch_moves_on_with_every_credential_change(store: AccountStore, clock: Clock) -> None:
    """What ends login sessions (web_auth compares a session's epoch with this one), on both
    backends: each change of password, second factors or the disabled flag gives a new epoch, and a
    change passed its own epoch writes exactly that one."""
    tid = await store.add(USERNAME, PASSWORD)
    seen = [await epoch_of(store, tid)]

    async def moved() -> None:
        now = await epoch_of(store, tid)
        assert now not in seen
        seen.append(now)

    await store.reset_password(tid, NEW_PASSWORD)
    await moved()
    assert (await login(store, USERNAME, NEW_PASSWORD)).sessions_epoch == seen[-1]
    secret, _ = await enrol(store, tid, clock)
    await moved()
    clock.now += 30
    await store.add_passkey(tid, {"id": "cred-a", "public_key": "pk", "sign_count": 0}, epoch="mine-1")
    assert await epoch_of(store, tid) == "mine-1"
    seen.append("mine-1")
    await store.new_recovery_codes(tid)
    await moved()
    assert await store.remove_passkey(tid, "cred-a")
    await moved()
    await store.reset_2fa(tid)
    await moved()
    await store.disable(tid)
    await moved()
    # Neither re-enabling, unlocking nor logging in starts a new epoch (or revives an old one).
    await store.enable(tid)
    await store.unlock(tid)
    assert (await login(store, USERNAME, NEW_PASSWORD)).ok
    assert await epoch_of(store, tid) == seen[-1]


async def epoch_of(store: AccountStore, therapist_id: str) -> str:
    account = await store.get(therapist_id)
    assert account is not None
    return account.sessions_epoch
