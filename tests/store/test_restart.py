"""A restart of the one embedded broker loses no session (issue 26, item 1), with real processes:
``python -m broker serve`` killed (SIGKILL) or stopped (SIGTERM) and started again on its data dir.

Before, every session was in the process's memory only: links answered 404, reconnects
``invalid_token``, and the therapist's dashboard was empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from broker.client.broker_client import BrokerClient
from broker.config import Config, Keys
from broker.crypto.link_key import new_link_key
from broker.http.admin_socket import AdminClient
from broker.signaling.protocol import Joined, Offer, Renegotiate, SeatState, SessionEnded, Status
from broker.store.base import session_key
from broker.store.session_file import SessionFile
from tests.conftest import client_link_key, free_port

#: What the issue promises: live peers back in signaling within 10 s of the broker being back.
BACK_WITHIN_S = 10.0


class Process:
    """``python -m broker serve`` on a fixed port and data dir, started again as often as asked."""

    def __init__(self, data: Path) -> None:
        data.mkdir(mode=0o700)
        self.data = data
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = Config(data_dir=data, port=self.port)
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    async def start(self) -> float:
        """Start and wait until /readyz answers; returns when that was (monotonic)."""
        self.starts += 1
        log = (self.data / f"broker-{self.starts}.log").open("wb")
        env = {**os.environ, "BROKER_LOG_LEVEL": "info"}
        argv = [sys.executable, "-m", "broker", "serve", "--port", str(self.port), "--data-dir", str(self.data)]
        self.process = subprocess.Popen(argv, env=env, stdout=log, stderr=log)
        log.close()
        async with aiohttp.ClientSession() as http:
            for _ in range(300):
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(self.url + "/readyz") as response:
                        if response.status == 200:
                            return time.monotonic()
                assert self.process.poll() is None, self.logs()
                await asyncio.sleep(0.05)
        raise AssertionError("the broker did not become ready")

    def stop(self, how: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(how)
        self.process.wait(15)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.data.glob("broker-*.log")))

    def secret(self) -> bytes:
        return bytes.fromhex((self.data / "server.secret").read_text().strip())


def file_bytes(data: Path) -> bytes:
    path = data / "sessions.sqlite3"
    return b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists())


def opened_rows(data: Path, secret: bytes) -> dict[str, bytes]:
    """The session file as whoever holds the server secret reads it."""
    path = data / "sessions.sqlite3"
    reader = SessionFile(path, Keys(secret).sessions)
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        found = db.execute("SELECT id, sealed FROM entry").fetchall()
    return dict(reader.open_row(bytes(row), bytes(sealed)) for row, sealed in found)


async def page_status(url: str) -> int:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        return response.status


async def live_session(process: Process) -> tuple[BrokerClient, BrokerClient, str]:
    """A therapist and an admitted client, with a peer-to-peer data channel open between them."""
    created = await AdminClient(process.config).create_session(clients=1)
    tokens = {s["role"]: s["token"] for s in created["seats"]}
    key = new_link_key()
    therapist = BrokerClient(f"{process.url}/t/{tokens['therapist']}#{key}", ice_servers=[])
    client_key = client_link_key(
        key, created["session"], next(s["peer"] for s in created["seats"] if s["role"] == "client")
    )
    client = BrokerClient(f"{process.url}/j/{tokens['client']}#{client_key}", ice_servers=[])
    await therapist.connect()
    await client.connect()
    assert (await client.preflight()).connected
    await client.submit_checklist(details={"location": "home", "contact": "a friend"})
    await client.expect(Status, where=lambda m: m.seat_state is SeatState.WAITING, timeout=20)
    await therapist.admit(client.peer_id)
    await asyncio.gather(
        therapist.wait_connected(client.peer_id, timeout=30), client.wait_connected(therapist.peer_id, timeout=30)
    )
    return therapist, client, str(created["session"])


def joins(peer: BrokerClient) -> int:
    return sum(isinstance(m, Joined) for m in peer.received)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
async def test_scheduled_and_live_sessions_survive_a_restart(tmp_path: Path, how: signal.Signals) -> None:
    process = Process(tmp_path / "data")
    await process.start()
    therapist = client = None
    try:
        now = int(time.time())
        tomorrow = await AdminClient(process.config).create_session(clients=1, starts=now + 86_400)
        today = await AdminClient(process.config).create_session(clients=1)
        tomorrow_link = f"{process.url}/j/{tomorrow['seats'][1]['token']}"
        path = {"therapist": "t", "client": "j"}
        today_links = {s["role"]: f"{process.url}/{path[s['role']]}/{s['token']}" for s in today["seats"]}
        assert await page_status(tomorrow_link) == 425  # "a little early": the link is known
        assert await page_status(today_links["client"]) == 200
        therapist, client, live = await live_session(process)
        before = {peer: joins(peer) for peer in (therapist, client)}
        secret = process.secret()

        # What is on disk is sealed: no session id, seat id or token in clear.
        data = file_bytes(process.data)
        for clear in (live, today["session"], tomorrow["session"], therapist.peer_id, client.peer_id):
            assert clear.encode() not in data
        for seat in (*today["seats"], *tomorrow["seats"]):
            assert seat["token"].encode() not in data
        assert session_key(live) in opened_rows(process.data, secret)  # ... but it is there

        stopped = time.monotonic()
        process.stop(how)
        ready = await process.start()
        down = ready - stopped

        # Scheduled links resolve as before the restart.
        assert await page_status(tomorrow_link) == 425
        assert await page_status(today_links["client"]) == 200
        assert await page_status(today_links["therapist"]) == 200
        # The live peers come back to their seats by their resume path, within the promise.
        while any(joins(peer) == before[peer] for peer in (therapist, client)):
            assert time.monotonic() - ready < BACK_WITHIN_S, process.logs()
            assert therapist.final is None and client.final is None, (therapist.final, client.final)
            await asyncio.sleep(0.05)
        back = time.monotonic() - ready
        assert therapist.joined is not None and client.joined is not None
        assert therapist.joined.seat_state is SeatState.ADMITTED
        assert client.joined.seat_state is SeatState.ADMITTED
        # ... and signaling flows between them again, both ways, numbered past what they saw: the
        # answering side asks for a fresh offer, and the offering side's new offer reaches it.
        offerer, answerer = (
            (therapist, client) if any(isinstance(m, Offer) for m in client.received) else (client, therapist)
        )
        mark = len(answerer.received)
        await answerer.renegotiate(offerer.peer_id)
        await offerer.expect(Renegotiate, timeout=5)
        await answerer.expect(Offer, timeout=10, since=mark)
        assert answerer.duplicates == 0
        print(f"{how.name}: broker ready {down:.2f} s after the signal, both peers back {back:.2f} s later")

        # Ended, the session leaves nothing in the file, not even sealed.
        await therapist.end()
        await client.expect(SessionEnded, timeout=5)
        for _ in range(100):
            if session_key(live) not in opened_rows(process.data, secret):
                break
            await asyncio.sleep(0.05)
        assert session_key(live) not in opened_rows(process.data, secret)
        assert session_key(today["session"]) in opened_rows(process.data, secret)
    finally:
        for peer in (client, therapist):
            if peer is not None:
                await peer.close()
        if process.process is not None and process.process.poll() is None:
            process.stop(signal.SIGTERM)
