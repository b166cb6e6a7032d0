"""No secret, link key, SDP, personal detail or address ever reaches a log line."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from broker import logs
from broker.client.broker_client import BrokerClient
from tests.conftest import schedule, start_broker

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
    for secret in (client_token, links.link_key, CANARY_LOCATION, CANARY_CONTACT, ufrag, "a=fingerprint"):
        assert secret not in text, secret
    assert not logs.has_address(text)
