"""No secret, link key, SDP, personal detail or address ever reaches a log line, in either log format."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from broker import logs
from broker.client.broker_client import BrokerClient
from broker.config import Config
from broker.config_check import check_config
from broker.crypto.link_key import new_link_key
from broker.http.admin_socket import AdminClient
from broker.http.login_sessions import LOGIN_COOKIE
from tests.conftest import client_link_key, free_port, schedule, start_broker

CANARY_LOCATION = "canary-location-7f3a"
CANARY_CONTACT = "canary-contact-91bd"


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """The broker's own logging set-up, at DEBUG, writing into a buffer."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    stream = io.StringIO()
    logs.configure("debug", stream)
    yield stream
    root.handlers[:], level = saved
    root.setLevel(level)
    logging.captureWarnings(False)


@pytest.fixture
def captured_json() -> Iterator[io.StringIO]:
    """As ``captured``, in the JSON format."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    stream = io.StringIO()
    logs.configure("debug", stream, log_format="json")
    yield stream
    root.handlers[:], level = saved
    root.setLevel(level)
    logging.captureWarnings(False)


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line of ``text`` as a JSON object (failing on any line that is not one)."""
    parsed = []
    for line in text.splitlines():
        value = json.loads(line)
        assert isinstance(value, dict), line
        parsed.append(value)
    return parsed


def test_addresses_are_redacted_from_any_record() -> None:
    record = logging.LogRecord("aioice.ice", logging.INFO, "", 0, "pair %s -> %s", ("10.1.2.3:5000", "fe80::1:2"), None)
    assert logs.RedactAddresses().filter(record)
    assert record.getMessage() == "pair [address]:5000 -> [address]"
    assert logs.redact("at 05:46:38 ms=1.5 id=ab:cd") == "at 05:46:38 ms=1.5 id=ab:cd"  # not addresses


async def test_a_whole_session_logs_nothing_personal(tmp_path: Path, captured: io.StringIO) -> None:
    running = await start_broker(tmp_path)
    try:
        links = await schedule(running)
        client_token = links.tokens[links.peers[links.client]]
        async with aiohttp.ClientSession() as http:
            async with http.get(links.client.split("#")[0]) as response:
                assert response.status == 200
        therapist = BrokerClient(links.therapist)
        await therapist.connect()
        client = BrokerClient(links.client)
        await client.connect()
        await client.preflight()
        await client.submit_checklist(details={"location": CANARY_LOCATION, "contact": CANARY_CONTACT})
        await therapist.admit(client.peer_id)
        link = await client.wait_connected(therapist.peer_id)
        sdp = link.pc.remoteDescription.sdp
        await therapist.end()
        await client.close()
        await therapist.close()
    finally:
        await running.stop()

    text = captured.getvalue()
    assert "event=peer_joined" in text and "event=session_ended" in text  # the log is not empty
    assert "route=/j/{token}" in text  # the access log names the route, not the path
    ufrag = next(line for line in sdp.splitlines() if line.startswith("a=ice-ufrag:"))
    for secret in (client_token, *links.secrets, CANARY_LOCATION, CANARY_CONTACT, ufrag, "a=fingerprint"):
        assert secret not in text, secret
    assert not logs.has_address(text)


# ---------------------------------------------------------------- JSON lines


def test_a_json_line_holds_the_pairs_of_the_text_line(captured_json: io.StringIO) -> None:
    log = logging.getLogger("broker.hub")
    log.info("event=peer_joined session=%s peer=%s role=%s", "s1", "p1", "client")
    log.warning("event=bus_disconnected error=%s", "Connection reset by peer")
    (joined, disconnected) = json_lines(captured_json.getvalue())
    assert set(joined) == {"time", "level", "logger", "event", "session", "peer", "role"}
    assert (joined["event"], joined["session"], joined["peer"], joined["role"]) == ("peer_joined", "s1", "p1", "client")
    assert (joined["level"], joined["logger"]) == ("INFO", "broker.hub")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", joined["time"])
    assert disconnected["error"] == "Connection reset by peer"  # a value with spaces stays whole


def test_free_text_and_clashing_keys_stay_whole_in_message(captured_json: io.StringIO) -> None:
    log = logging.getLogger("aiortc.test")
    log.warning("pair %s -> %s failed", "10.1.2.3:5000", "fe80::1:2")
    log.warning("event=spoof level=DEBUG logger=broker.fake")  # cannot replace the record's own fields
    log.warning("event=a event=b")
    log.warning("event=x note=%s", 'one\n{"event": "forged"}')
    lines = json_lines(captured_json.getvalue())
    assert len(lines) == 4  # the newline in the last value did not start a line of its own
    assert lines[0] == {**lines[0], "message": "pair [address]:5000 -> [address] failed", "logger": "aiortc.test"}
    assert "event" not in lines[0]
    assert lines[1]["level"] == "WARNING" and lines[1]["logger"] == "aiortc.test"
    assert lines[1]["message"] == "event=spoof level=DEBUG logger=broker.fake"
    assert lines[2]["message"] == "event=a event=b"
    assert lines[3]["event"] == "x" and lines[3]["note"] == 'one\n{"event": "forged"}'


def test_a_traceback_goes_into_exception(captured_json: io.StringIO) -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("broker.bus").exception("event=bus_handler_failed")
    (line,) = json_lines(captured_json.getvalue())
    assert line["event"] == "bus_handler_failed" and line["level"] == "ERROR"
    assert line["exception"].startswith("Traceback") and "RuntimeError: boom" in line["exception"]


def test_python_warnings_become_json_lines_too() -> None:
    program = (
        "import warnings\n"
        "from broker.logs import configure\n"
        "configure(log_format='json')\n"
        "warnings.warn('slow path taken', RuntimeWarning)\n"
    )
    ran = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    (line,) = json_lines(ran.stderr)
    assert line["logger"] == "py.warnings" and "RuntimeWarning: slow path taken" in line["message"]


def test_an_unknown_log_format_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    problems = check_config(Config(data_dir=tmp_path, log_format="xml"))
    assert "log_format 'xml' is not one of: text, json." in problems
    assert not check_config(Config(data_dir=tmp_path, log_format="json"))
    env = {**os.environ, "BROKER_LOG_FORMAT": "xml"}
    checked = subprocess.run(
        [*BROKER, "check-config", "--data-dir", str(tmp_path)], capture_output=True, text=True, env=env, timeout=60
    )
    assert checked.returncode == 1 and "log_format 'xml' is not one of: text, json." in checked.stderr
    served = subprocess.run(
        [*BROKER, "serve", "--data-dir", str(tmp_path), "--port", str(free_port())],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert served.returncode == 2 and "log_format 'xml' is not one of: text, json." in served.stderr


# ---------------------------------------------------------------- a real process, both formats

BROKER = [sys.executable, "-m", "broker"]
LOGIN_NAME = "canary-login-52e9"
DISPLAY_NAME = "Canary Display Name 0b6f"
PASSWORD = "canary-password-Quill-8d41-river"
WRONG_PASSWORD = "canary-wrong-password-3c77-stone"
CHAT = "canary-chat-a41d"
#: Fields of every JSON line that are not pairs of the message.
RECORD_FIELDS = {"time", "level", "logger", "message", "exception", "stack"}


@dataclass
class LoggedRun:
    """What a broker process wrote to stderr over one whole session, and what it must never have written."""

    stderr: str
    never_logged: dict[str, str]


async def run_logged_session(data: Path, log_format: str) -> LoggedRun:
    """A real ``broker serve`` in ``log_format`` through logins and a whole call between two Python peers."""
    env = {**os.environ, "BROKER_LOG_LEVEL": "info", "BROKER_LOG_FORMAT": log_format}
    added = subprocess.run(
        [*BROKER, "therapist", "add", LOGIN_NAME, "--display-name", DISPLAY_NAME, "--password-stdin"]
        + ["--data-dir", str(data)],
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert added.returncode == 0, added.stderr
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    stderr_path = data / "stderr.log"
    with stderr_path.open("wb") as stderr, (data / "stdout.log").open("wb") as stdout:
        process = subprocess.Popen(
            [*BROKER, "serve", "--port", str(port), "--data-dir", str(data)], env=env, stdout=stdout, stderr=stderr
        )
    never_logged = {"login name": LOGIN_NAME, "display name": DISPLAY_NAME, "password": PASSWORD}
    never_logged |= {"wrong password": WRONG_PASSWORD, "chat": CHAT}
    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
            for _ in range(300):
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(url + "/readyz") as response:
                        if response.status == 200:
                            break
                assert process.poll() is None, stderr_path.read_text()
                await asyncio.sleep(0.1)
            origin = {"Origin": url}
            async with http.post(
                url + "/api/login", json={"username": LOGIN_NAME, "password": WRONG_PASSWORD}, headers=origin
            ) as response:
                assert response.status == 401, await response.text()
            async with http.post(
                url + "/api/login", json={"username": LOGIN_NAME, "password": PASSWORD}, headers=origin
            ) as response:
                assert response.status == 200, await response.text()
                cookie = response.cookies[LOGIN_COOKIE].value
            async with http.get(url + "/api/me", headers={"Cookie": f"{LOGIN_COOKIE}={cookie}"}) as response:
                assert DISPLAY_NAME in await response.text()  # the display name was in play

            created = await AdminClient(Config(data_dir=data)).create_session(clients=1)
            key = new_link_key()
            tokens = {seat["role"]: seat["token"] for seat in created["seats"]}
            client_peer = next(seat["peer"] for seat in created["seats"] if seat["role"] == "client")
            seat_key = client_link_key(key, created["session"], client_peer)
            never_logged |= {"session secret": key, "seat key": seat_key, "client token": tokens["client"]}
            never_logged |= {"therapist token": tokens["therapist"]}
            async with http.get(f"{url}/j/{tokens['client']}") as response:
                assert response.status == 200
            therapist = BrokerClient(f"{url}/t/{tokens['therapist']}#{key}")
            client = BrokerClient(f"{url}/j/{tokens['client']}#{seat_key}")
            try:
                await therapist.connect(timeout=30)
                await client.connect(timeout=30)
                assert (await client.preflight()).connected
                details = {"location": "canary-location-19c4", "contact": "canary-contact-77e0"}
                never_logged |= {"emergency location": details["location"], "emergency contact": details["contact"]}
                await client.submit_checklist(details=details)
                await therapist.admit(client.peer_id)
                t_link, c_link = await asyncio.gather(
                    therapist.wait_connected(client.peer_id, timeout=30),
                    client.wait_connected(therapist.peer_id, timeout=30),
                )
                client.send_chat(therapist.peer_id, CHAT)
                assert await asyncio.wait_for(t_link.messages.get(), 10) == CHAT
                for line in c_link.pc.remoteDescription.sdp.splitlines():
                    if line.startswith(("a=ice-ufrag:", "a=ice-pwd:", "a=fingerprint:")):
                        what, value = line.split(":", 1)
                        never_logged[what] = value
                await therapist.end()
            finally:
                await client.close()
                await therapist.close()
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    return LoggedRun(added.stderr + stderr_path.read_text(), never_logged)


def text_fields(stderr: str) -> dict[str, set[str]]:
    """For each event type of a text log, the keys its lines carry."""
    found: dict[str, set[str]] = {}
    for line in stderr.splitlines():
        event = re.search(r"\bevent=(\S+)", line)
        if event:
            message = line[event.start() :]
            found.setdefault(event.group(1), set()).update(re.findall(r"(?:^|\s)([a-z_][a-z0-9_]*)=", message))
    return found


def json_fields(lines: list[dict[str, Any]]) -> dict[str, set[str]]:
    """For each event type of a JSON log, the keys its lines carry besides the record's own."""
    found: dict[str, set[str]] = {}
    for line in lines:
        if "event" in line:
            found.setdefault(line["event"], set()).update(set(line) - RECORD_FIELDS)
    return found


def assert_nothing_personal(run: LoggedRun, what: str) -> None:
    leaked = sorted(name for name, value in run.never_logged.items() if value in run.stderr)
    assert leaked == [], f"the {what} log holds: {leaked}"
    assert not logs.has_address(run.stderr), f"the {what} log holds an address"


async def test_json_logs_carry_the_same_events_and_nothing_personal(tmp_path: Path) -> None:
    text_run = await run_logged_session(tmp_path / "text", "text")
    json_run = await run_logged_session(tmp_path / "json", "json")

    lines = json_lines(json_run.stderr)  # every stderr line is one JSON object
    assert all({"time", "level", "logger"} <= set(line) for line in lines)
    by_event = json_fields(lines)
    expected = text_fields(text_run.stderr)
    assert {"serving", "login_failed", "login_ok", "peer_joined", "session_ended", "http", "stopped"} <= set(expected)
    assert by_event == expected  # the same event types, each with the same fields
    assert {"event": "http", "method": "GET", "route": "/j/{token}", "status": "200"}.items() <= next(
        line.items() for line in lines if line.get("event") == "http" and line["route"] == "/j/{token}"
    )
    assert any(line["logger"] == "aiohttp.access" for line in lines)  # aiohttp's own logger, same layout

    assert_nothing_personal(text_run, "text")
    assert_nothing_personal(json_run, "JSON")
    # Escaping cannot hide a value: the values as decoded hold none either.
    decoded = json.dumps(lines, ensure_ascii=False)
    decoded_run = dataclasses.replace(json_run, stderr=decoded)
    assert_nothing_personal(decoded_run, "decoded JSON")
