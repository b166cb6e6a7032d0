"""The broker never holds the signaling of two peers with the link key in clear (docs/protocol.md 7.7).

A real call between two Python clients through a real broker: once with the embedded store,
once across two broker processes on one real Redis (so relays cross Redis pub/sub and the
resume buffers live in Redis). Every offer, answer and candidate the broker received and
passed on, and every value in its store (in Redis, opened with the server secret, as a
compromised host could), must hold nothing of the peers' SDP: no DTLS fingerprint, no ICE
credentials, no candidate line, no host address. The browser's trickled candidates:
tests/browser/test_interception.py::test_the_broker_holds_no_signaling_of_a_browser_call_in_clear.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import redis

from broker.client.broker_client import BrokerClient
from broker.signaling.connections import Connections
from broker.signaling.protocol import Answer, Candidate, Offer
from broker.signaling.relay import Relays
from broker.store.sealing import StoreCorrupt
from tests.client.test_client import waiting_client
from tests.conftest import RunningBroker, schedule, start_broker, start_broker_pair
from tests.redis_server import RedisServer, redis_server  # noqa: F401 - the fixture
from tests.signaling.test_malicious_relay import wait_for

RELAYED = (Offer, Answer, Candidate)
MARKS = ("a=fingerprint", "a=ice-ufrag", "a=ice-pwd", "candidate:", "v=0\r\n")


class RecordingConnections(Connections):
    """The real connection side, keeping a copy of every offer, answer and candidate frame as it came in."""

    frames: list[bytes]

    def take(self, conn: Any, text: str | bytes) -> Any:
        message = Connections.take(self, conn, text)
        if isinstance(message, RELAYED):
            self.frames.append(text.encode() if isinstance(text, str) else text)
        return message


class RecordingRelays(Relays):
    """The real relays, keeping a copy of every offer, answer and candidate as they pass it on
    (to a local peer or through Redis)."""

    frames: list[bytes]

    def checked(self, conn: Any, message: Any, session: Any) -> tuple[Any, ...]:
        checked = Relays.checked(self, conn, message, session)
        if isinstance(message, RELAYED):
            self.frames.append(checked[1].data)
        return checked


class Recorded:
    """Every offer, answer and candidate a broker's hub handled: each frame as it came in, and
    each message as it passed it on."""

    def __init__(self, running: RunningBroker) -> None:
        self.frames: list[bytes] = []
        hub = running.broker.hub
        hub.connections.__class__ = RecordingConnections
        hub.relays.__class__ = RecordingRelays
        hub.connections.frames = hub.relays.frames = self.frames  # type: ignore[attr-defined]


def recording(running: RunningBroker) -> Recorded:
    return Recorded(running)


def secrets_of(sdps: Iterable[str]) -> set[str]:
    """What a description gives away: fingerprints, ICE credentials, candidate lines, host addresses."""
    found: set[str] = set()
    for sdp in sdps:
        for line in sdp.splitlines():
            if line.startswith("a=fingerprint:"):
                found.add(line.split(" ", 1)[1])
            elif line.startswith("a=ice-pwd:"):
                found.add(line.split(":", 1)[1])
            elif line.startswith("a=candidate:"):
                found.add(line[2:])
                address = line.split()[4]
                if address not in ("127.0.0.1", "::1"):
                    found.add(address)
    return found


def host_addresses(sdps: Iterable[str]) -> set[str]:
    return {line.split()[4] for sdp in sdps for line in sdp.splitlines() if line.startswith("a=candidate:")} - {
        "127.0.0.1",
        "::1",
    }


async def connected_call(
    therapist_link: str, client_link: str, links: Any
) -> tuple[BrokerClient, BrokerClient, list[str]]:
    """Therapist and client connected (twice: the second time after a renegotiation, as an ICE
    restart would have it). Returns both and every SDP they used."""
    therapist = BrokerClient(therapist_link)
    await therapist.connect()
    client = await waiting_client(links, client_link)
    await therapist.admit(client.peer_id)
    await client.wait_connected(therapist.peer_id)

    def descriptions() -> list[str]:
        return [
            d.sdp
            for c in (therapist, client)
            for link in c.links.values()
            for d in (link.pc.localDescription, link.pc.remoteDescription)
            if d is not None
        ]

    sdps = descriptions()
    first = client.links[therapist.peer_id]
    await client.renegotiate(therapist.peer_id)
    await wait_for(lambda: client.links.get(therapist.peer_id) not in (None, first))
    await client.wait_connected(therapist.peer_id)
    await therapist.wait_connected(client.peer_id)
    return therapist, client, sdps + descriptions()


async def trickle_one(client: BrokerClient, therapist: BrokerClient) -> None:
    """One of the client's real candidates trickled to the therapist, sealed, as a browser does
    (aiortc puts its candidates in the SDP instead)."""
    link = client.links[therapist.peer_id]
    line = next(x[2:] for x in link.pc.localDescription.sdp.splitlines() if x.startswith("a=candidate:"))
    assert client.auth is not None
    fields = {"candidate": line, "sdp_mid": "0", "sdp_mline_index": 0}
    counter, sealed = client.auth.seal(therapist.peer_id, "candidate", fields)
    mark = len(therapist.received)
    await client.send_raw(
        json.dumps({"type": "candidate", "to": therapist.peer_id, "counter": counter, "sealed": sealed})
    )
    await therapist.expect(Candidate, where=lambda m: m.sealed == sealed, since=mark)
    assert therapist.interceptions == client.interceptions == [] and therapist.dropped == {}


def assert_nothing_in_clear(where: str, blobs: Iterable[bytes], secrets: set[str]) -> None:
    for blob in blobs:
        for mark in (*MARKS, *secrets):
            assert mark.encode() not in blob, f"{where} holds {mark!r} in clear"


async def store_contents(running: RunningBroker, raw: Any = None, prefix: str = "") -> list[bytes]:
    """Every value in the broker's store (under ``prefix``), opened as the broker opens it (with
    its server secret)."""
    store = running.broker.hub.store
    values: list[bytes] = []
    for key in await store.keys(prefix):
        values.append(key.encode())
        try:
            value = await store.get(key)
        except StoreCorrupt:  # a plain counter (incr_window): not sealed, read as it is
            values.append(raw.get(key) or b"")
            continue
        if value is not None:
            values.append(value)
        else:
            values += [entry for _, entry in await store.read_since(key, 0)]
    return values


async def test_an_embedded_broker_holds_no_signaling_in_clear(tmp_path: Path) -> None:
    running = await start_broker(tmp_path)
    recorded = recording(running)
    try:
        links = await schedule(running)
        therapist, client, sdps = await connected_call(links.therapist, links.client, links)
        try:
            secrets = secrets_of(sdps)
            assert host_addresses(sdps), "the call used no host address: nothing to look for"
            assert_nothing_in_clear("a relayed frame", recorded.frames, secrets)
            await trickle_one(client, therapist)
            assert_nothing_in_clear("a relayed frame", recorded.frames, secrets)
            relayed = [f for f in recorded.frames if b'"sealed"' in f]
            assert len(recorded.frames) >= 10 and relayed == recorded.frames  # every one sealed
            assert any(b'"type":"candidate"' in f for f in recorded.frames)
            stored = await store_contents(running)
            assert any(b'"sealed"' in v for v in stored), "the resume buffers are in the store"
            assert_nothing_in_clear("the store", stored, secrets)
        finally:
            await client.close()
            await therapist.close()
    finally:
        await running.stop()


async def test_brokers_on_redis_hold_no_signaling_in_clear(redis_server: RedisServer, tmp_path: Path) -> None:  # noqa: F811
    url = redis_server.empty_database(11)
    one, two = await start_broker_pair(tmp_path, url)
    recorded = [recording(one), recording(two)]
    try:
        links = await schedule(one)
        client_link = links.client.replace(one.url, two.url)  # the client on the other process
        therapist, client, sdps = await connected_call(links.therapist, client_link, links)
        try:
            secrets = secrets_of(sdps)
            assert host_addresses(sdps)
            assert_nothing_in_clear("a relayed frame", [f for each in recorded for f in each.frames], secrets)
            await trickle_one(client, therapist)
            frames = [f for each in recorded for f in each.frames]
            assert all(each.frames for each in recorded)  # both processes relayed
            assert all(b'"sealed"' in f for f in frames)
            assert_nothing_in_clear("a relayed frame", frames, secrets)
            with redis.Redis.from_url(url) as raw:
                stored = await store_contents(one, raw)
            assert any(b'"sealed"' in v for v in stored), "the resume buffers, opened"
            assert_nothing_in_clear("Redis, opened with the server secret", stored, secrets)
        finally:
            await client.close()
            await therapist.close()
    finally:
        await one.stop()
        await two.stop()


def test_the_secrets_finder_sees_what_a_clear_description_gives_away() -> None:
    """Guards the guard: from a real-looking aiortc description it picks out every kind of secret."""
    sdp = (
        "v=0\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\nc=IN IP4 10.1.2.3\r\n"
        "a=candidate:abc 1 udp 2130706431 10.1.2.3 40000 typ host\r\n"
        "a=candidate:def 1 udp 2130706431 127.0.0.1 40001 typ host\r\n"
        "a=ice-ufrag:Ab12\r\na=ice-pwd:0123456789abcdefghijkl\r\n"
        "a=fingerprint:sha-256 " + ":".join(["AB"] * 32) + "\r\n"
    )
    found = secrets_of([sdp])
    assert {"10.1.2.3", "0123456789abcdefghijkl", ":".join(["AB"] * 32)} <= found
    assert "127.0.0.1" not in found and host_addresses([sdp]) == {"10.1.2.3"}
    with pytest.raises(AssertionError, match="in clear"):
        assert_nothing_in_clear("a frame", [sdp.encode()], found)
    assert re.search("candidate:abc", " ".join(found))


async def test_without_the_link_key_the_call_stays_in_clear_and_says_so(tmp_path: Path) -> None:
    """A therapist on a device without the link key (docs/protocol.md 7.2, 7.7): nothing can be
    sealed for it, so both sides keep the clear path, unverified, and compare safety codes."""
    running = await start_broker(tmp_path)
    recorded = recording(running)
    try:
        links = await schedule(running)
        therapist = BrokerClient(links.therapist.split("#", 1)[0])
        await therapist.connect()
        client = await waiting_client(links, allow_unverified=True)
        try:
            await therapist.admit(client.peer_id)
            c_link = await client.wait_connected(therapist.peer_id)
            t_link = await therapist.wait_connected(client.peer_id)
            assert c_link.trust == t_link.trust == "unverified"
            assert not (c_link.sealing or c_link.remote_sealed or t_link.sealing or t_link.remote_sealed)
            assert therapist.safety_code(client.peer_id) == client.safety_code(therapist.peer_id)
            assert recorded.frames and not any(b'"sealed":"' in f for f in recorded.frames)
            # Sealed anyway (a peer that got it wrong): the keyless side cannot open it, and drops it.
            assert client.auth is not None
            counter, sealed = client.auth.seal(
                therapist.peer_id, "candidate", {"candidate": "", "sdp_mid": None, "sdp_mline_index": None}
            )
            await client.send_raw(
                json.dumps({"type": "candidate", "to": therapist.peer_id, "counter": counter, "sealed": sealed})
            )
            await wait_for(lambda: therapist.dropped == {"sealed_without_link_key": 1})
            assert therapist.interceptions == client.interceptions == []
        finally:
            await client.close()
            await therapist.close()
    finally:
        await running.stop()
