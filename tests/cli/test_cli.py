"""The ``broker`` command as a practice admin uses it: real processes, real sockets."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import signal
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from broker.client.broker_client import BrokerClient
from broker.http.admin_socket import admin_app, start_admin_site
from broker.signaling.protocol import SeatState, WaitingRoom
from tests.conftest import free_port, start_broker

BROKER = [sys.executable, "-m", "broker"]


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BROKER, *args], capture_output=True, text=True, timeout=timeout, env=env)


class Served:
    def __init__(self, data_dir: Path, port: int, process: subprocess.Popen[str], banner: str) -> None:
        self.data_dir, self.port, self.process, self.banner = data_dir, port, process, banner
        self.url = f"http://127.0.0.1:{port}"


def start_serve(data_dir: Path, env: dict[str, str] | None = None, *extra: str) -> Served:
    port = free_port()
    process = subprocess.Popen(
        [*BROKER, "serve", "--data-dir", str(data_dir), "--port", str(port), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    assert process.stdout is not None
    banner = ""
    deadline = time.monotonic() + 30
    while "broker session create" not in banner:
        line = process.stdout.readline()
        if not line or time.monotonic() > deadline:
            process.kill()
            raise AssertionError("broker serve did not start:\n" + banner)
        banner += line
    # Keep draining output so the process never blocks on a full pipe.
    import threading

    threading.Thread(target=process.stdout.read, daemon=True).start()
    return Served(data_dir, port, process, banner)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    server = start_serve(tmp_path_factory.mktemp("cli-data"))
    yield server
    server.process.terminate()
    server.process.wait(10)


def test_serve_prints_where_to_go_and_how_to_start(served: Served) -> None:
    assert f"127.0.0.1:{served.port}" in served.banner
    assert "broker session create" in served.banner
    secret = served.data_dir / "server.secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600


def test_session_create_works_while_serving_and_its_links_open(served: Served) -> None:
    result = run("session", "create", "--data-dir", str(served.data_dir), "--seats", "2", "--json")
    assert result.returncode == 0, result.stderr
    created = json.loads(result.stdout)
    links = [seat["link"] for seat in created["seats"]]
    assert len(links) == 3
    assert all(link.startswith(served.url) and "#" in link for link in links)
    keys = {link.split("#")[1] for link in links}
    assert len(keys) == 3 and {len(k) for k in keys} == {43}  # a 256-bit key per link: no two alike

    async def fetch() -> list[int]:
        async with aiohttp.ClientSession() as http:
            statuses = []
            for link in links:
                async with http.get(link.split("#")[0]) as response:
                    statuses.append(response.status)
            return statuses

    assert asyncio.run(fetch()) == [200, 200, 200]


def test_session_create_json_has_the_shape_the_readme_shows(served: Served) -> None:
    """README "Commands": the object ``--json`` prints, member for member and type for type."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    documented = json.loads(
        readme.split("With `--json`, `broker session create` prints")[1].split("```json")[1].split("```")[0]
    )
    result = run("session", "create", "--data-dir", str(served.data_dir), "--json")
    assert result.returncode == 0, result.stderr
    created = json.loads(result.stdout)

    def shape(value: object) -> object:
        if isinstance(value, dict):
            return {k: shape(v) for k, v in value.items()}
        if isinstance(value, list):
            return [shape(v) for v in value[:1]]
        return type(value).__name__

    assert shape(created) == shape(documented)
    assert [seat["role"] for seat in created["seats"]] == ["therapist", "client"]
    assert created["base_url"] == served.url
    assert {seat["link"].split("#")[0].rsplit("/", 2)[0] for seat in created["seats"]} == {served.url}


def test_session_create_text_output_names_each_link(served: Served) -> None:
    starts = (datetime.now(UTC) + timedelta(days=60)).strftime("%Y-%m-%dT09:00+00:00")  # within a year
    result = run("session", "create", "--data-dir", str(served.data_dir), "--starts", starts)
    assert result.returncode == 0, result.stderr
    assert "Client link" in result.stdout and "Therapist link" in result.stdout
    assert f"{served.url}/j/" in result.stdout and f"{served.url}/t/" in result.stdout


def test_revoke_makes_a_link_stop_working(served: Served) -> None:
    created = json.loads(run("session", "create", "--data-dir", str(served.data_dir), "--json").stdout)
    client = next(s for s in created["seats"] if s["role"] == "client")
    result = run("session", "revoke", created["session"], client["peer"], "--data-dir", str(served.data_dir))
    assert result.returncode == 0, result.stderr

    async def status() -> int:
        async with aiohttp.ClientSession() as http:
            async with http.get(client["link"].split("#")[0]) as response:
                return response.status

    assert asyncio.run(status()) == 404


def test_session_create_without_a_running_broker_says_what_to_do(tmp_path: Path) -> None:
    result = run("session", "create", "--data-dir", str(tmp_path))
    assert result.returncode == 1
    assert "No broker is running" in result.stderr and "broker serve" in result.stderr


def test_bad_session_requests_are_refused_clearly(served: Served) -> None:
    result = run("session", "create", "--data-dir", str(served.data_dir), "--seats", "40")
    assert result.returncode == 1 and "client seats" in result.stderr
    result = run("session", "create", "--data-dir", str(served.data_dir), "--starts", "tomorrow-ish")
    assert result.returncode != 0 and "ISO 8601" in result.stderr


def test_session_create_refuses_a_start_beyond_a_year_and_saves_nothing(tmp_path: Path) -> None:
    """Finding 11 through the command: the real CLI against a broker whose store this test can read."""

    async def scenario() -> tuple[int, str, set[str]]:
        running = await start_broker(tmp_path / "data")
        admin = web.AppRunner(admin_app(running.hub, running.broker.keys, running.url), access_log=None)
        await admin.setup()
        await start_admin_site(admin.app, admin, running.config)
        try:
            before = set(await running.broker.store.keys(""))
            data_dir = str(running.config.data_dir)
            process = await asyncio.create_subprocess_exec(
                *BROKER,
                "session",
                "create",
                "--data-dir",
                data_dir,
                "--starts",
                "2100-01-01T09:00+00:00",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            _, err = await asyncio.wait_for(process.communicate(), 60)
            added = set(await running.broker.store.keys("")) - before
            assert process.returncode is not None
            return process.returncode, err.decode(), added
        finally:
            await admin.cleanup()
            await running.stop()

    returncode, stderr, added = asyncio.run(scenario())
    assert returncode == 1
    assert stderr.count("\n") == 1 and "at most a year" in stderr and "Traceback" not in stderr, stderr
    assert added == set()


def test_join_from_a_terminal_reports_the_connection(served: Served) -> None:
    created = json.loads(run("session", "create", "--data-dir", str(served.data_dir), "--json").stdout)
    therapist_link = next(s["link"] for s in created["seats"] if s["role"] == "therapist")
    client_link = next(s["link"] for s in created["seats"] if s["role"] == "client")

    async def scenario() -> str:
        therapist = BrokerClient(therapist_link)
        await therapist.connect()
        process = await asyncio.create_subprocess_exec(
            *BROKER, "join", client_link, "--seconds", "12", stdout=asyncio.subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:
            room = await therapist.expect(
                WaitingRoom, where=lambda m: m.seats and m.seats[0].state is SeatState.WAITING, timeout=20
            )
            await therapist.admit(room.seats[0].peer)
            await therapist.wait_connected(room.seats[0].peer, timeout=20)
            code = therapist.safety_code(room.seats[0].peer)
            assert process.stdout is not None
            seen = ""
            while "safety code" not in seen:  # the terminal reports the connection, then we end
                line = await asyncio.wait_for(process.stdout.readline(), 20)
                assert line, seen
                seen += line.decode()
            await therapist.end()
            out, _ = await asyncio.wait_for(process.communicate(), 30)
            return seen + out.decode() + f"\nTHERAPIST CODE {code}"
        finally:
            if process.returncode is None:
                process.kill()
            await therapist.close()

    output = asyncio.run(scenario())
    assert "Network pre-flight: connected=True" in output
    assert "Checklist accepted" in output
    code = output.rsplit("THERAPIST CODE ", 1)[1].strip()
    assert f"safety code {code}" in output  # the same code on both sides
    assert "Session over" in output


def test_check_config_passes_a_good_configuration(tmp_path: Path) -> None:
    result = run("check-config", "--data-dir", str(tmp_path))
    assert result.returncode == 0 and "Configuration OK" in result.stdout


def test_check_config_names_the_choices_this_configuration_cannot_offer(tmp_path: Path) -> None:
    """Issue 28, item 4: no TURN server, so relay-only sessions cannot work; the command says so."""
    result = run("check-config", "--data-dir", str(tmp_path))
    assert result.returncode == 0
    assert "Not available with this configuration" in result.stdout
    assert "relay-only sessions" in result.stdout and "BROKER_TURN_URLS" in result.stdout
    env = {**os.environ, "BROKER_TURN_URLS": "turn:127.0.0.1:3478", "BROKER_TURN_SECRET": "s" * 40}
    with_turn = run("check-config", "--data-dir", str(tmp_path), env=env)
    assert with_turn.returncode == 0 and "relay-only" not in with_turn.stdout


def test_session_create_refuses_relay_only_without_turn(served: Served) -> None:
    result = run("session", "create", "--data-dir", str(served.data_dir), "--relay-only")
    assert result.returncode == 1 and "TURN" in result.stderr and "Traceback" not in result.stderr


def test_session_cancel_stops_the_links_and_says_so(served: Served) -> None:
    created = json.loads(run("session", "create", "--data-dir", str(served.data_dir), "--json").stdout)
    client_link = next(s["link"] for s in created["seats"] if s["role"] == "client")
    result = run("session", "cancel", created["session"], "--data-dir", str(served.data_dir))
    assert result.returncode == 0 and "Cancelled" in result.stdout

    async def page() -> tuple[int, str]:
        async with aiohttp.ClientSession() as http, http.get(client_link.split("#")[0]) as r:
            return r.status, await r.text()

    status, body = asyncio.run(page())
    assert status == 410 and 'data-code="session_cancelled"' in body and "cancelled" in body
    again = run("session", "cancel", created["session"], "--data-dir", str(served.data_dir))
    assert again.returncode == 1 and "Traceback" not in again.stderr


def test_check_config_reports_every_problem(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[[item]]\nid = "x"\nkind = "telepathy"\n')
    env = {
        **os.environ,
        "BROKER_PORT": "99999",
        "BROKER_PUBLIC_URL": "http://therapy.example",
        "BROKER_TURN_URLS": "turn:turn.example:3478",
        "BROKER_POLICY_FILE": str(policy),
    }
    result = run("check-config", "--data-dir", str(tmp_path), env=env)
    assert result.returncode == 1
    for words in ("port 99999", "plain http", "turn_secret", "checklist policy", "telepathy"):
        assert words in result.stderr, words


def test_check_config_checks_the_practices_exit_page_and_title(tmp_path: Path) -> None:
    """The quick exit sends the client to ``[practice] exit_url``: only an https:// address passes."""
    policy = tmp_path / "policy.toml"
    default = (Path(__file__).resolve().parents[2] / "broker" / "checklist" / "default_policy.toml").read_text()
    good = default.replace("[practice]\n", '[practice]\npage_title = "Notes"\nexit_url = "https://www.example.org/"\n')
    policy.write_text(good)
    env = {**os.environ, "BROKER_POLICY_FILE": str(policy)}
    assert run("check-config", "--data-dir", str(tmp_path), env=env).returncode == 0
    policy.write_text(good.replace("https://www.example.org/", "javascript:alert(1)").replace('"Notes"', '""'))
    result = run("check-config", "--data-dir", str(tmp_path), env=env)
    assert result.returncode == 1
    for words in ("checklist policy", "'exit_url' must be an https:// address", "'page_title' must be"):
        assert words in result.stderr, words


def test_check_config_reports_unusable_http_limits(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "BROKER_HTTP_HEADER_TIMEOUT_S": "0",
        "BROKER_HTTP_KEEPALIVE_S": "-1",
        "BROKER_MAX_HTTP_CONNECTIONS_PER_ADDRESS": "0",
    }
    result = run("check-config", "--data-dir", str(tmp_path), env=env)
    assert result.returncode == 1
    for words in ("http_header_timeout_s and http_keepalive_s must be positive", "max_http_connections_per_address"):
        assert words in result.stderr, words


def test_check_config_names_an_unknown_key_and_a_bad_value(tmp_path: Path) -> None:
    config = tmp_path / "broker.toml"
    config.write_text("prot = 80\n")
    result = run("check-config", env={**os.environ, "BROKER_CONFIG": str(config)})
    assert result.returncode == 2 and "Unknown configuration key 'prot'" in result.stderr
    result = run("check-config", env={**os.environ, "BROKER_PORT": "eighty"})
    assert result.returncode == 2 and "'port' has an invalid value" in result.stderr


def test_a_secret_readable_by_others_is_reported(tmp_path: Path) -> None:
    secret = tmp_path / "server.secret"
    secret.write_text("ab" * 32)
    secret.chmod(0o644)
    result = run("check-config", "--data-dir", str(tmp_path))
    assert result.returncode == 1 and "chmod 600" in result.stderr


def test_console_script_and_module_are_the_same_command() -> None:
    script = subprocess.run(["broker", "--help"], capture_output=True, text=True, timeout=30)
    module = run("--help")
    assert script.returncode == module.returncode == 0
    assert "session" in script.stdout and script.stdout.split("\n", 1)[1] == module.stdout.split("\n", 1)[1]


def test_sigterm_tells_peers_to_reconnect_and_exits_quickly(tmp_path: Path) -> None:
    server = start_serve(tmp_path)
    created = json.loads(run("session", "create", "--data-dir", str(tmp_path), "--json").stdout)
    therapist_link = next(s["link"] for s in created["seats"] if s["role"] == "therapist")

    async def scenario() -> float:
        from broker.signaling.protocol import Reconnect

        therapist = BrokerClient(therapist_link, reconnect=False)
        await therapist.connect()
        began = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        await therapist.expect(Reconnect, timeout=10)
        await therapist.close()
        await asyncio.to_thread(server.process.wait, 10)
        return time.monotonic() - began

    elapsed = asyncio.run(scenario())
    assert server.process.returncode == 0
    assert elapsed < 10
    assert not (tmp_path / "run" / "admin.sock").exists()


def test_self_signed_tls_for_a_lan_trial(tmp_path: Path) -> None:
    import ssl

    server = start_serve(tmp_path, None, "--tls", "self-signed")
    try:
        assert "not for production" in server.banner and "SHA-256" in server.banner
        printed = server.banner.split("fingerprint is\n", 1)[1].split()[0]
        pem = ssl.get_server_certificate(("127.0.0.1", server.port))
        import hashlib

        der = ssl.PEM_cert_to_DER_cert(pem)
        digest = hashlib.sha256(der).hexdigest().upper()
        assert printed == ":".join(digest[i : i + 2] for i in range(0, 64, 2))

        async def get() -> tuple[int, str]:
            context = ssl.create_default_context(cafile=str(tmp_path / "tls" / "self-signed.crt"))
            async with aiohttp.ClientSession() as http:
                async with http.get(f"https://127.0.0.1:{server.port}/healthz", ssl=context) as response:
                    return response.status, response.headers.get("Strict-Transport-Security", "")

        status, hsts = asyncio.run(get())
        assert status == 200 and "max-age" in hsts
        assert stat.S_IMODE((tmp_path / "tls" / "self-signed.key").stat().st_mode) == 0o600
    finally:
        server.process.terminate()
        server.process.wait(10)


@pytest.fixture
async def _unused() -> AsyncIterator[None]:  # keeps pytest-asyncio's loop scope consistent for sync tests
    yield


def test_audit_verify_passes_then_catches_an_edit(served: Served) -> None:
    run("session", "create", "--data-dir", str(served.data_dir))  # writes a session_created entry
    result = run("audit", "verify", "--data-dir", str(served.data_dir))
    assert result.returncode == 0 and "intact" in result.stdout
    log = served.data_dir / "audit.log"
    original = log.read_text()
    try:
        log.write_text(original.replace("session_created", "session_ended", 1))
        result = run("audit", "verify", "--data-dir", str(served.data_dir))
        assert result.returncode == 1 and "NOT intact" in result.stderr
    finally:
        log.write_text(original)


def test_record_verify_accepts_a_genuine_record_and_refuses_an_altered_one(tmp_path: Path) -> None:
    from broker.signaling.record import RecordSigner

    signer = RecordSigner(b"s" * 32)
    record = {"v": 1, "session": "abc", "ended": 1}
    path = tmp_path / "record.json"
    path.write_text(json.dumps({"record": record, "signature": signer.sign(record), "key_id": signer.key_id}))
    key = signer.public_jwk()["x"]
    assert run("record", "verify", str(path), "--key", key).returncode == 0
    path.write_text(path.read_text().replace('"ended": 1', '"ended": 2'))
    result = run("record", "verify", str(path), "--key", key)
    assert result.returncode == 1 and "INVALID" in result.stderr


def test_join_as_therapist_admits_a_waiting_client(served: Served) -> None:
    created = json.loads(run("session", "create", "--data-dir", str(served.data_dir), "--json").stdout)
    therapist_link = next(s["link"] for s in created["seats"] if s["role"] == "therapist")
    client_link = next(s["link"] for s in created["seats"] if s["role"] == "client")

    async def scenario() -> str:
        from broker.signaling.protocol import Status

        terminal = await asyncio.create_subprocess_exec(
            *BROKER,
            "join",
            therapist_link,
            "--admit-all",
            "--seconds",
            "15",
            stdout=asyncio.subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        client = BrokerClient(client_link)
        try:
            await client.connect()
            await client.preflight()
            await client.submit_checklist(details={"location": "x", "contact": "y"})
            await client.expect(Status, where=lambda m: m.seat_state is SeatState.ADMITTED, timeout=20)
            await client.wait_connected(next(s["peer"] for s in created["seats"] if s["role"] == "therapist"), 20)
            assert terminal.stdout is not None
            seen = ""
            while "safety code" not in seen:
                line = await asyncio.wait_for(terminal.stdout.readline(), 20)
                assert line, seen
                seen += line.decode()
            return seen
        finally:
            terminal.kill()
            await terminal.wait()
            await client.close()

    output = asyncio.run(scenario())
    assert "Admitting" in output and "Connected to" in output and "verified_by_link" in output


def test_serve_refuses_accounts_sealed_with_another_secret(tmp_path: Path) -> None:
    """Restoring a data dir without its secret (or pointing at another practice's accounts) must
    stop the broker with a plain reason, not run with every login silently failing."""
    from broker.accounts.account_store import AccountStore
    from broker.config import Keys

    data = tmp_path / "data"
    other = AccountStore(data / "accounts.sqlite3", Keys(os.urandom(32)).accounts)
    asyncio.run(other.close())
    result = run("serve", "--data-dir", str(data), "--port", str(free_port()), timeout=60)
    assert result.returncode == 2
    assert "Cannot start" in result.stderr and "different key" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- session records read strictly (issue 25, finding 13)


def _signed_record_file(tmp_path: Path) -> tuple[Path, str, str]:
    """A genuine record file's text, and the key that verifies it."""
    from broker.signaling.record import RecordSigner

    signer = RecordSigner(b"s" * 32)
    record = {"v": 1, "session": "abc", "started": None, "ended": 1, "seats": [{"peer": "p1", "verified": "link"}]}
    text = json.dumps({"record": record, "signature": signer.sign(record), "key_id": signer.key_id})
    path = tmp_path / "record.json"
    path.write_text(text)
    assert run("record", "verify", str(path), "--key", signer.public_jwk()["x"]).returncode == 0
    return path, text, signer.public_jwk()["x"]


@pytest.mark.parametrize(
    "where, old, new",
    [
        # A reader that keeps the first of two equal keys sees another record, session or verification.
        ("top level", '{"record": ', '{"record": {"v": 1, "session": "forged"}, "record": '),
        ("record", '"ended": 1', '"ended": 99, "ended": 1'),
        ("nested", '"verified": "link"', '"verified": "none", "verified": "link"'),
    ],
)
def test_record_verify_refuses_duplicate_keys_anywhere(tmp_path: Path, where: str, old: str, new: str) -> None:
    path, text, key = _signed_record_file(tmp_path)
    assert old in text
    path.write_text(text.replace(old, new, 1))
    result = run("record", "verify", str(path), "--key", key)
    assert result.returncode == 1 and "REFUSED" in result.stderr and "appears twice" in result.stderr, where
    assert "Signature valid" not in result.stdout


@pytest.mark.parametrize(
    "old, new, words",
    [
        ('"started": null', '"started": NaN', "NaN is not a JSON value"),  # read as null by the canonical form
        ('"started": null', '"started": 1e999', "out of range"),
        ('"ended": 1', '"ended": 9007199254740993', "too large"),
        ('"session": "abc"', '"session": "abc\\ud800"', "no canonical form"),
    ],
)
def test_record_verify_refuses_values_readers_would_read_differently(
    tmp_path: Path, old: str, new: str, words: str
) -> None:
    path, text, key = _signed_record_file(tmp_path)
    path.write_text(text.replace(old, new, 1))
    result = run("record", "verify", str(path), "--key", key)
    assert result.returncode == 1 and "REFUSED" in result.stderr and words in result.stderr


# ---------------------------------------------------------------- audit log: warnings, anchors, a separate key (issue 25, finding 6)


def _write_audit_entries(data_dir: Path, count: int, env: dict[str, str] | None = None) -> None:
    from broker.audit.log import AuditEvent
    from broker.audit.setup import open_audit_log
    from broker.config import load_config

    async def write() -> None:
        log = open_audit_log(load_config({**(env or {}), "BROKER_DATA_DIR": str(data_dir)}))
        for _ in range(count):  # each entry its own session: no two entries alike
            await log.append(AuditEvent.SESSION_CREATED, session=secrets.token_urlsafe(16))
        await log.aclose()

    asyncio.run(write())


def test_audit_verify_fails_after_the_tail_is_cut_and_the_broker_restarted_until_acknowledged(tmp_path: Path) -> None:
    server = start_serve(tmp_path)
    for _ in range(3):
        assert run("session", "create", "--data-dir", str(tmp_path)).returncode == 0
    server.process.terminate()
    server.process.wait(10)
    log = tmp_path / "audit.log"
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:-2]))  # cut the last two entries off
    server = start_serve(tmp_path)  # the broker records the mismatch and signs the new end
    server.process.terminate()
    server.process.wait(10)
    warning = len(lines) - 1
    result = run("audit", "verify", "--data-dir", str(tmp_path))
    assert result.returncode == 1 and "NOT intact" in result.stderr
    assert f"Integrity warning at entry {warning}" in result.stdout and "NOT acknowledged" in result.stdout
    assert f"broker audit acknowledge --through {warning}" in result.stderr
    result = run("audit", "acknowledge", "--through", str(warning - 1), "--data-dir", str(tmp_path))
    assert (
        result.returncode == 1 and f"entry {warning} is an integrity warning after entry {warning - 1}" in result.stderr
    )
    result = run("audit", "acknowledge", "--through", str(warning), "--data-dir", str(tmp_path))
    assert result.returncode == 0 and f"warning(s) at entry {warning}" in result.stdout
    result = run("audit", "verify", "--data-dir", str(tmp_path))
    assert result.returncode == 0 and "Audit log intact" in result.stdout and "acknowledged at entry" in result.stdout


def test_audit_verify_reports_a_log_emptied_with_its_head_removed(tmp_path: Path) -> None:
    _write_audit_entries(tmp_path, 3)
    (tmp_path / "audit.log").write_text("")
    (tmp_path / "audit.log.head").unlink()
    result = run("audit", "verify", "--data-dir", str(tmp_path))
    assert result.returncode == 1 and "or the log and its signed head were removed" in result.stderr
    assert "intact" not in result.stdout


def test_audit_anchor_then_verify_catches_a_log_rewritten_with_the_key(tmp_path: Path) -> None:
    from broker.audit.format import GENESIS, canonical, entry_hash, head_bytes, head_key
    from broker.config import Config, Keys, load_or_create_secret

    _write_audit_entries(tmp_path, 5)
    result = run("audit", "anchor", "--data-dir", str(tmp_path))
    assert result.returncode == 0 and "off this machine" in result.stderr
    anchor = result.stdout.strip()
    assert anchor.startswith("anchor1/5/") and len(anchor.splitlines()) == 1
    _write_audit_entries(tmp_path, 2)
    assert run("audit", "verify", "--anchor", anchor, "--data-dir", str(tmp_path)).returncode == 0
    # Someone holding the data directory drops the first entry, relinks the chain and signs its end.
    log = tmp_path / "audit.log"
    entries, prev = [], GENESIS
    for seq, line in enumerate(log.read_text().splitlines()[1:], start=1):
        entry = {**json.loads(line), "seq": seq, "prev": prev}
        entry["hash"] = entry_hash(entry)
        entries.append(entry)
        prev = entry["hash"]
    log.write_bytes(b"".join(canonical(e) + b"\n" for e in entries))
    key = Keys(load_or_create_secret(Config(data_dir=tmp_path))).audit
    (tmp_path / "audit.log.head").write_bytes(head_bytes(head_key(key), len(entries), prev))
    result = run("audit", "verify", "--data-dir", str(tmp_path))
    assert result.returncode == 0 and "whoever holds the directory could have cut or rewritten" in result.stdout
    result = run("audit", "verify", "--anchor", anchor, "--data-dir", str(tmp_path))
    assert result.returncode == 1 and "is not the one anchored" in result.stderr
    result = run("audit", "verify", "--anchor", "anchor1/5/yesterday", "--data-dir", str(tmp_path))
    assert result.returncode == 2 and "is not an anchor" in result.stderr


def test_audit_verify_and_check_config_with_a_separate_audit_key(tmp_path: Path) -> None:
    data, key_file = tmp_path / "data", tmp_path / "keys" / "audit.key"
    key_file.parent.mkdir()
    key_file.write_text(os.urandom(32).hex() + "\n")
    key_file.chmod(0o640)
    env = {**os.environ, "BROKER_AUDIT_KEY_FILE": str(key_file)}
    result = run("check-config", "--data-dir", str(data), env=env)
    assert result.returncode == 1 and f"chmod 600 {key_file}" in result.stderr
    key_file.chmod(0o600)
    assert run("check-config", "--data-dir", str(data), env=env).returncode == 0
    _write_audit_entries(data, 3, {"BROKER_AUDIT_KEY_FILE": str(key_file)})
    result = run("audit", "verify", "--data-dir", str(data), env=env)
    assert result.returncode == 0 and f"the separate audit key ({key_file})" in result.stdout
    assert "Note:" not in result.stdout
    # The key derived from the data directory's server secret does not verify this log.
    from broker.config import Config, load_or_create_secret

    load_or_create_secret(Config(data_dir=data))  # as a broker's start makes it
    result = run("audit", "verify", "--data-dir", str(data))
    assert result.returncode == 1 and "does not verify with the audit key" in result.stderr


def test_session_create_gives_every_link_its_own_key_and_warns_about_a_group_link(served: Served) -> None:
    """Issue 21: with --seats 3 each client link carries its own seat key, none the therapist's
    session secret; each is the seat key derived from that secret (docs/protocol.md 7.1)."""
    from broker.crypto.link_key import b64url_encode, decode_link_key
    from broker.crypto.seat_keys import group_key, seat_key

    result = run("session", "create", "--data-dir", str(served.data_dir), "--seats", "3", "--json")
    assert result.returncode == 0, result.stderr
    created = json.loads(result.stdout)
    keys = {seat["peer"]: seat["link"].split("#")[1] for seat in created["seats"]}
    assert len(keys) == 4 and len(set(keys.values())) == 4 and created["group_link"] is None
    secret = next(keys[s["peer"]] for s in created["seats"] if s["role"] == "therapist")
    for seat in created["seats"]:
        if seat["role"] == "client":
            derived = b64url_encode(seat_key(decode_link_key(secret), created["session"], seat["peer"]))
            assert keys[seat["peer"]] == derived
    text = run("session", "create", "--data-dir", str(served.data_dir), "--seats", "3").stdout
    fragments = re.findall(r"/[jt]/[^#\s]+#(\S+)", text)
    assert len(fragments) == 4 and len(set(fragments)) == 4
    grouped = run("session", "create", "--data-dir", str(served.data_dir), "--seats", "3", "--group-link")
    assert grouped.returncode == 0, grouped.stderr
    assert "Group link" in grouped.stdout and "shares one key" in grouped.stdout
    assert "couples" in grouped.stdout and "their own client link" in grouped.stdout
    as_json = json.loads(
        run("session", "create", "--data-dir", str(served.data_dir), "--seats", "2", "--group-link", "--json").stdout
    )
    secret = next(s["link"].split("#")[1] for s in as_json["seats"] if s["role"] == "therapist")
    assert as_json["group_link"].startswith(f"{served.url}/j/")
    expected = b64url_encode(group_key(decode_link_key(secret), as_json["session"]))
    assert as_json["group_link"].split("#")[1] == expected


def test_reissue_says_the_seat_keeps_its_own_key(served: Served) -> None:
    created = json.loads(run("session", "create", "--data-dir", str(served.data_dir), "--seats", "2", "--json").stdout)
    client = next(s for s in created["seats"] if s["role"] == "client")
    result = run(
        "session", "revoke", created["session"], client["peer"], "--reissue", "--data-dir", str(served.data_dir)
    )
    assert result.returncode == 0, result.stderr
    assert "keeps its own key" in result.stdout and "#<this seat's key>" in result.stdout
    assert "session's link key" not in result.stdout
