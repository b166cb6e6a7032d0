"""What a compromised host holds about a call, with the server secret in hand (issue 25, acceptance).

A session runs over two brokers sharing one Redis: the therapist on one process, the client on the
other, through the pre-flight, the checklist (with a recommended item not met and emergency
details), admission, a peer-to-peer call and chat. Then everything the host holds is searched as an
attacker who has the server secret would: every Redis value, *opened* with the key derived from
that secret; every log line the brokers wrote; every file in their data directories. None may hold
an SDP line, an ICE candidate or credential, the client's host addresses, a checklist answer item
by item, the emergency details, the chat, the link key or the page's resume secret; nor the
therapist's vault key or a label (issue 28).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from pathlib import Path

import pytest
from aiohttp import ClientSession, DummyCookieJar

from broker.client.broker_client import BrokerClient
from broker.config import Keys
from broker.crypto.link_key import decode_link_key
from broker.http.login_sessions import LOGIN_COOKIE
from broker.signaling.protocol import SeatState, SessionEnded, Status, WaitingRoom
from broker.store.base import session_prefix
from broker.store.sealing import Sealer, StoreCorrupt
from tests.conftest import RunningBroker, schedule, start_broker_pair
from tests.http.test_vault import b64, seal, wrap
from tests.redis_server import RedisServer, redis_server  # noqa: F401 - the fixture

pytestmark = pytest.mark.redis
VAULT_PASSWORD = "canary vault password 5e2d lantern"

#: Lines of SDP and candidates: what the review read in clear with the server secret.
SDP_MARKS = (
    b"a=fingerprint",
    b"a=ice-ufrag",
    b"a=ice-pwd",
    b"a=candidate",
    b"candidate:",
    b"v=0\r\n",
    b"m=application",
)


class Captured(logging.Handler):
    """Every log record of the process, formatted as the broker's handlers would print it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def opened_redis_values(server: RedisServer, secret: bytes) -> dict[str, list[bytes]]:
    """Every value in Redis as the attacker reads it: opened with the store key from the secret."""
    sealer = Sealer(Keys(secret).store)
    values: dict[str, list[bytes]] = {}
    with server.client() as c:
        for raw_name in c.scan_iter(count=1000):
            name = raw_name.decode()
            kind = c.type(raw_name)
            if kind == b"string":
                blob = c.get(raw_name) or b""
                values[name] = [_open(sealer, b"value\x00" + raw_name, blob)]
            elif kind == b"list":
                entries = []
                for entry in c.lrange(raw_name, 0, -1):
                    _, _, sealed = entry.partition(b":")
                    entries.append(_open(sealer, b"log\x00" + raw_name, sealed) if sealed else b"")
                values[name] = entries
            else:
                values[name] = [repr(c.dump(raw_name)).encode()]
    return values


def _open(sealer: Sealer, aad: bytes, blob: bytes) -> bytes:
    try:
        return sealer.open(aad, blob)
    except StoreCorrupt:
        return blob  # not sealed by the store (a counter): searched as it is


async def store_label_canary(a: RunningBroker, b: RunningBroker) -> tuple[bytes, list[str]]:
    """A therapist logs in on process A, schedules a session, keeps a wrapped vault key and labels
    sealed as their page seals them (tests/http/test_vault.py) and reads them back on process B."""
    await a.broker.accounts.add("canary-therapist", VAULT_PASSWORD)
    vault_key = os.urandom(32)
    labels = ["CANARY-label Sam & Alex, couple", "CANARY-note second marriage"]
    async with ClientSession(cookie_jar=DummyCookieJar()) as http:
        login = {"username": "canary-therapist", "password": VAULT_PASSWORD}
        async with http.post(a.url + "/api/login", json=login, headers={"Origin": a.url}) as r:
            assert r.status == 200, await r.text()
            me = await r.json()
            cookie = r.cookies[LOGIN_COOKIE].value
        headers = {"Origin": a.url, "X-CSRF-Token": me["csrf"], "Cookie": f"{LOGIN_COOKIE}={cookie}"}
        therapist = me["therapist"]["id"]
        async with http.post(
            a.url + "/api/vault", json=wrap(vault_key, VAULT_PASSWORD, therapist), headers=headers
        ) as r:
            assert r.status == 200
        async with http.post(a.url + "/api/sessions", json={"clients": 1}, headers=headers) as r:
            created = await r.json()
        sid = created["session"]
        seat = next(s["peer"] for s in created["seats"] if s["role"] == "client")
        items = {
            "session": seal(vault_key, therapist, sid, "session", {"label": labels[0], "note": labels[1]}),
            seat: seal(vault_key, therapist, sid, seat, {"label": labels[0], "note": ""}),
        }
        for slot, sealed in items.items():
            body = {"session": sid, "slot": slot, "sealed": sealed}
            async with http.post(a.url + "/api/vault/items", json=body, headers=headers) as r:
                assert r.status == 200
        async with http.get(b.url + "/api/vault", headers={"Cookie": f"{LOGIN_COOKIE}={cookie}"}) as r:
            assert (await r.json())["items"] == {sid: items}  # kept in Redis, shared by both processes
    return vault_key, labels


def host_addresses(sdp: str) -> set[bytes]:
    """The addresses a peer's own candidates name (its host, and what STUN/TURN saw)."""
    found = set(re.findall(r"candidate:\S+ \d+ \S+ \d+ (\S+) \d+ typ", sdp))
    return {a.encode() for a in found if a not in ("0.0.0.0", "127.0.0.1")}


async def test_a_compromised_host_holds_no_signaling_checklist_answer_or_secret(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    captured = Captured()
    broker_log = logging.getLogger("broker")
    root = logging.getLogger()
    old_level = broker_log.level
    broker_log.setLevel(logging.DEBUG)
    root.addHandler(captured)
    a, b = await start_broker_pair(tmp_path, redis_server.empty_database())
    secret = bytes.fromhex((tmp_path / "server.secret").read_text().strip())
    therapist = client = None
    try:
        links = await schedule(a, clients=2)  # a key per seat: the second seat's must not leak either
        therapist = BrokerClient(links.therapist)  # on process A
        client = BrokerClient(links.client.replace(a.url, b.url))  # on process B
        await therapist.connect()
        await client.connect()
        assert (await client.preflight()).connected
        assert client.joined is not None and client.joined.policy is not None
        answers = {item["id"]: item["id"] != "headset" for item in client.joined.policy["items"]}
        details = {"location": "CANARY-14-Quiet-Lane", "contact": "CANARY-Robin-0700-900"}
        await client.submit_checklist(answers, details=details)
        await client.expect(Status, where=lambda m: m.seat_state is SeatState.WAITING)
        await therapist.expect(WaitingRoom, where=lambda m: any(s.state is SeatState.WAITING for s in m.seats))
        await therapist.admit(client.peer_id)
        t_link = await therapist.wait_connected(client.peer_id, timeout=20)
        c_link = await client.wait_connected(therapist.peer_id, timeout=20)
        chat = "CANARY chat: I feel safe saying this here"
        client.send_chat(therapist.peer_id, chat)
        assert await asyncio.wait_for(t_link.messages.get(), 10) == chat
        await asyncio.sleep(0.5)  # the last candidates and views settle

        local = [t_link.pc.localDescription.sdp, c_link.pc.localDescription.sdp]
        vault_key, labels = await store_label_canary(a, b)
        canaries: dict[str, bytes] = {
            "vault key": vault_key.hex().encode(),
            "vault key (base64url)": b64(vault_key).encode(),
            **{f"label canary {i}": label.encode() for i, label in enumerate(labels)},
            **{f"link key {i} (session secret or seat key)": key.encode() for i, key in enumerate(links.secrets)},
            "client's resume secret": (client._resume_secret or "").encode(),
            "details location": details["location"].encode(),
            "details contact": details["contact"].encode(),
            "chat": chat.encode(),
            "recommended item answer": b"headset",
            "item by item": b"private_place",
        }
        for sdp in local:
            for line in sdp.splitlines():
                if line.startswith(("a=fingerprint:", "a=ice-ufrag:", "a=ice-pwd:")):
                    canaries[line.split(":", 1)[0]] = line.split(":", 1)[1].encode()
            for address in host_addresses(sdp):
                canaries[f"host address {address.decode()}"] = address
        assert any(k.startswith("a=fingerprint") for k in canaries)

        # 1. Redis, every value opened with the server secret, while the call is live.
        values = opened_redis_values(redis_server, secret)
        session_keys = [k for k in values if k.startswith(session_prefix(links.session))]
        assert session_keys, "the session's record and resume buffers are in Redis"
        plain = b"\n".join(v for vs in values.values() for v in vs)
        assert b"all_required_met" in plain  # the opening works: the record is readable to the attacker
        found = {what for what, canary in canaries.items() if canary and canary in plain}
        found |= {mark.decode() for mark in SDP_MARKS if mark in plain}
        assert found == set(), f"Redis, opened with the server secret, holds: {sorted(found)}"

        # 2. Every log line the two brokers wrote.
        logged = "\n".join(captured.lines).encode()
        assert captured.lines, "the brokers logged"
        found = {what for what, canary in canaries.items() if canary and canary in logged}
        found |= {mark.decode() for mark in SDP_MARKS if mark in logged}
        assert found == set(), f"the logs hold: {sorted(found)}"

        # 3. Every file of both data directories (audit log, secrets, accounts, sockets' directories).
        files = [p for p in tmp_path.rglob("*") if p.is_file()]
        assert files
        for path in files:
            data = path.read_bytes()
            found = {what for what, canary in canaries.items() if canary and canary in data}
            found |= {mark.decode() for mark in SDP_MARKS if mark in data}
            assert found == set(), f"{path.relative_to(tmp_path)} holds: {sorted(found)}"

        # And once the therapist ends it, nothing of the session is left in Redis.
        await therapist.end()
        await client.expect(SessionEnded)
        for _ in range(50):
            if not redis_server.keys(session_prefix(links.session)):
                break
            await asyncio.sleep(0.1)
        assert redis_server.keys(session_prefix(links.session)) == []
        assert len(set(links.secrets)) == 3 and all(decode_link_key(k) for k in links.secrets)  # real, distinct keys
    finally:
        for peer in (client, therapist):
            if peer is not None:
                await peer.close()
        await a.stop()
        await b.stop()
        root.removeHandler(captured)
        broker_log.setLevel(old_level)
