"""``broker therapist ...`` in real processes on a real data dir.

Until the lead hooks ``register``/``run`` into ``broker.cli.main`` the commands run through the
module's own entry point (``python -m broker.cli.therapist``), which builds the same parser;
change COMMAND to ``[sys.executable, "-m", "broker"]`` then.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from broker.accounts.account_store import AccountStore, open_accounts
from broker.accounts.totp import code_at
from broker.audit.log import verify
from broker.cli import therapist as cli_therapist
from broker.config import Config, Keys, load_or_create_secret
from broker.http.login_sessions import accounts_path, audit_path
from tests.redis_server import RedisServer, redis_server  # noqa: F401 - the fixture

REPO = Path(__file__).resolve().parents[2]
COMMAND = [sys.executable, "-m", "broker"]
CANARY = "Canary-cli-5b8e21d4-do-not-echo"
OTHER = "second canary 9d0f7a63 passphrase"


def cli(data_dir: Path, *args: str, stdin: str = "", **env_extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")} | env_extra
    return subprocess.run(
        [*COMMAND, "therapist", *args, "--data-dir", str(data_dir)],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )


def store_for(data_dir: Path, **kwargs: Any) -> AccountStore:
    config = Config(data_dir=data_dir)
    return AccountStore(accounts_path(config), Keys(load_or_create_secret(config)).accounts, **kwargs)


def login_ok(data_dir: Path, username: str, password: str) -> bool:
    async def check() -> bool:
        store = store_for(data_dir)
        try:
            result = await store.verify_login(username, password, None, require_second_factor=False)
            return result.ok
        finally:
            await store.close()

    return asyncio.run(check())


def audit_events(data_dir: Path) -> list[str]:
    path = audit_path(Config(data_dir=data_dir))
    config = Config(data_dir=data_dir)
    assert verify(path, Keys(load_or_create_secret(config)).audit).ok
    return [json.loads(line)["event"] for line in path.read_text().splitlines()]


def test_add_list_disable_enable_and_reset_password(tmp_path: Path) -> None:
    data = tmp_path / "data"
    added = cli(data, "add", "alice", "--display-name", "Alice Example", "--password-stdin", stdin=CANARY + "\n")
    assert added.returncode == 0, added.stderr
    assert "Added therapist account" in added.stdout
    assert login_ok(data, "alice", CANARY)

    listed = cli(data, "list", "--json")
    [row] = json.loads(listed.stdout)
    assert row["username"] == "alice" and row["display_name"] == "Alice Example"
    assert row["disabled"] is False and row["second_factor"] is False
    text = cli(data, "list").stdout
    assert "alice (Alice Example)" in text and "2FA off" in text

    assert cli(data, "disable", "alice").returncode == 0
    assert not login_ok(data, "alice", CANARY)
    assert "[disabled]" in cli(data, "list").stdout
    assert cli(data, "enable", row["id"]).returncode == 0  # by id works too
    assert login_ok(data, "alice", CANARY)

    reset = cli(data, "reset-password", "alice", "--password-stdin", stdin=OTHER + "\r\n")
    assert reset.returncode == 0, reset.stderr
    assert "labels and notes they gave their sessions" in reset.stdout and "cannot be read any more" in reset.stdout
    assert login_ok(data, "alice", OTHER) and not login_ok(data, "alice", CANARY)

    assert audit_events(data) == ["account_added", "account_disabled", "account_enabled", "password_reset"]
    everything = added.stdout + added.stderr + listed.stdout + text + reset.stdout + reset.stderr
    assert CANARY not in everything and OTHER not in everything and "scrypt$" not in everything


def test_unlock_and_reset_2fa(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert cli(data, "add", "blake", "--password-stdin", stdin=CANARY).returncode == 0

    async def lock_and_enrol() -> None:
        store = store_for(data, lockout_after=1)
        try:
            therapist = (await store.get_by_username("blake")).id  # type: ignore[union-attr]
            enrolment = await store.enable_totp(therapist, "Practice")
            assert await store.confirm_totp(therapist, code_at(enrolment.secret, time.time()))
            await store.verify_login("blake", "a wrong password here", None, require_second_factor=False)
        finally:
            await store.close()

    asyncio.run(lock_and_enrol())
    [row] = json.loads(cli(data, "list", "--json").stdout)
    assert row["locked"] is True and row["second_factor"] is True and row["recovery_codes_left"] == 10

    assert cli(data, "unlock", "blake").returncode == 0
    assert cli(data, "reset-2fa", "blake").returncode == 0
    [row] = json.loads(cli(data, "list", "--json").stdout)
    assert row["locked"] is False and row["second_factor"] is False and row["recovery_codes_left"] == 0
    assert login_ok(data, "blake", CANARY)  # no second factor asked any more
    assert audit_events(data) == ["account_added", "account_unlocked", "second_factor_changed"]


def test_refusals_are_clear_and_change_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    weak = cli(data, "add", "casey", "--password-stdin", stdin="short\n")
    assert weak.returncode == 1 and "at least 15 characters" in weak.stderr and "short" not in weak.stdout
    common = cli(data, "add", "casey", "--password-stdin", stdin="password1234567890\n")
    assert common.returncode == 1 and "common" in common.stderr
    assert "No therapist accounts yet" in cli(data, "list").stdout
    assert cli(data, "add", "casey", "--password-stdin", stdin=CANARY).returncode == 0
    taken = cli(data, "add", "CASEY", "--password-stdin", stdin=OTHER)
    assert taken.returncode == 1 and "already in use" in taken.stderr
    missing = cli(data, "disable", "nobody")
    assert missing.returncode == 1 and "No therapist account" in missing.stderr
    usage = cli(data, "frobnicate")
    assert usage.returncode == 2
    assert len(json.loads(cli(data, "list", "--json").stdout)) == 1


def test_typed_password_is_never_echoed(tmp_path: Path) -> None:
    """getpass on a real terminal: the password typed twice never comes back on the screen."""
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    pid, fd = pty.fork()
    if pid == 0:  # the child: a terminal session of its own
        os.chdir(REPO)
        os.execve(sys.executable, [*COMMAND, "therapist", "add", "dana", "--data-dir", str(data)], env)
    screen = b""

    def read_until(marker: bytes) -> None:
        nonlocal screen
        while marker not in screen:
            ready, _, _ = select.select([fd], [], [], 60)
            assert ready, f"no {marker!r} on screen: {screen!r}"
            try:
                chunk = os.read(fd, 1024)
            except OSError:
                chunk = b""
            assert chunk, f"process ended before {marker!r}: {screen!r}"
            screen += chunk

    read_until(b"New password:")
    os.write(fd, CANARY.encode() + b"\n")
    read_until(b"again:")
    os.write(fd, CANARY.encode() + b"\n")
    read_until(b"Added therapist account")
    _, status = os.waitpid(pid, 0)
    try:
        while True:
            chunk = os.read(fd, 1024)
            if not chunk:
                break
            screen += chunk
    except OSError:
        pass
    os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
    assert CANARY.encode() not in screen
    assert login_ok(data, "dana", CANARY)


def test_run_directly_with_mismatched_typed_passwords(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parser = argparse.ArgumentParser(prog="broker")
    cli_therapist.register(parser.add_subparsers(dest="command", required=True))
    typed = iter([CANARY, CANARY + "x"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(typed))
    args = parser.parse_args(["therapist", "add", "erin", "--data-dir", str(tmp_path / "data")])
    out = io.StringIO()
    assert cli_therapist.run(args, out=out) == 1
    listed = io.StringIO()
    args = parser.parse_args(["therapist", "list", "--data-dir", str(tmp_path / "data")])
    assert cli_therapist.run(args, out=listed) == 0
    assert "No therapist accounts yet" in listed.getvalue()
    args = parser.parse_args(["therapist", "add", "erin", "--password-stdin", "--data-dir", str(tmp_path / "data")])
    assert cli_therapist.run(args, stdin=io.StringIO(CANARY + "\n"), out=out) == 0
    assert CANARY not in out.getvalue()
    assert login_ok(tmp_path / "data", "erin", CANARY)


def test_with_redis_configured_accounts_go_to_redis(tmp_path: Path, redis_server: RedisServer) -> None:  # noqa: F811
    """The admin's commands reach the accounts every broker process uses, not a local file."""
    url = redis_server.empty_database(10)
    data_one, data_two = tmp_path / "one", tmp_path / "two"
    data_one.mkdir()
    data_two.mkdir()
    secret = tmp_path / "server.secret"
    secret.write_text(os.urandom(32).hex())
    secret.chmod(0o600)
    env = {"BROKER_REDIS_URL": url, "BROKER_SECRET_FILE": str(secret)}
    added = cli(data_one, "add", "robin", "--password-stdin", stdin=CANARY + "\n", **env)
    assert added.returncode == 0, added.stderr
    listed = cli(data_two, "list", "--json", **env)  # another machine's data dir, same Redis
    assert [r["username"] for r in json.loads(listed.stdout)] == ["robin"]
    assert not (data_one / "accounts.sqlite3").exists() and not (data_two / "accounts.sqlite3").exists()

    # A passkey registered through the web (here: stored the way web_passkeys stores one) shows in the list.
    async def add_passkey() -> None:
        config = Config(data_dir=data_one, redis_url=url, secret_file=str(secret))
        store = await open_accounts(config, Keys(load_or_create_secret(config)))
        try:
            account = await store.get_by_username("robin")
            assert account is not None
            await store.add_passkey(account.id, {"id": "cred-a", "public_key": "pk", "sign_count": 0})
        finally:
            await store.close()

    asyncio.run(add_passkey())
    [row] = json.loads(cli(data_two, "list", "--json", **env).stdout)
    assert row["second_factor"] is True and row["passkeys"] == 1 and row["totp"] is False
    assert "2FA on (1 passkey(s))" in cli(data_two, "list", **env).stdout
    assert json.loads(cli(data_one, "list", "--json").stdout) == []  # without Redis: the local file


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("accounts_in", ["sqlite", "redis"])
async def test_cli_changes_end_the_web_logins_of_a_running_broker(
    tmp_path: Path, accounts_in: str, request: pytest.FixtureRequest
) -> None:
    """Review finding 3: after `broker therapist reset-password` (or `reset-2fa`) in another process,
    the old cookie still read /api/me and scheduled sessions. Now the running broker ends those
    logins at their next request, with the accounts in its SQLite file or in Redis."""
    from aiohttp import ClientSession, DummyCookieJar

    from broker.http.login_sessions import CSRF_HEADER, LOGIN_COOKIE
    from tests.conftest import start_broker

    data = tmp_path / "data"
    env: dict[str, str] = {}
    overrides: dict[str, Any] = {}
    if accounts_in == "redis":
        url = request.getfixturevalue("redis_server").empty_database(12)
        secret = tmp_path / "server.secret"
        secret.write_text(os.urandom(32).hex())
        secret.chmod(0o600)
        env = {"BROKER_REDIS_URL": url, "BROKER_SECRET_FILE": str(secret)}
        overrides = {"redis_url": url, "secret_file": str(secret)}
    running = await start_broker(data, **overrides)
    try:
        await running.broker.accounts.add("robin", CANARY)
        async with ClientSession(cookie_jar=DummyCookieJar()) as http:

            async def log_in(password: str) -> dict[str, str]:
                async with http.post(
                    running.url + "/api/login",
                    json={"username": "robin", "password": password},
                    headers={"Origin": running.url},
                ) as r:
                    assert r.status == 200, await r.text()
                    cookie = r.cookies[LOGIN_COOKIE].value
                    return {"Cookie": f"{LOGIN_COOKIE}={cookie}", CSRF_HEADER: (await r.json())["csrf"],
                            "Origin": running.url}  # fmt: skip

            async def can_work(headers: dict[str, str]) -> bool:
                async with http.get(running.url + "/api/me", headers=headers) as me:
                    pass
                async with http.post(running.url + "/api/sessions", json={"clients": 1}, headers=headers) as made:
                    pass
                assert me.status == made.status, (me.status, made.status)
                return me.status == 200

            async def admin(*args: str, stdin: str = "") -> None:
                done = await asyncio.to_thread(cli, data, *args, stdin=stdin, **env)
                assert done.returncode == 0, done.stderr

            logins = [await log_in(CANARY), await log_in(CANARY)]
            assert all([await can_work(h) for h in logins])
            await admin("reset-password", "robin", "--password-stdin", stdin=OTHER + "\n")
            assert not any([await can_work(h) for h in logins])

            login = await log_in(OTHER)
            assert await can_work(login)
            await admin("reset-2fa", "robin")
            assert not await can_work(login)

            login = await log_in(OTHER)
            await admin("disable", "robin")
            await admin("enable", "robin")
            assert not await can_work(login)  # enabled again, but that login stays over
            assert await can_work(await log_in(OTHER))
    finally:
        await running.stop()
