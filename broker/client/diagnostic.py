"""``broker join``: a terminal diagnostic that joins a session as one peer and says what happens.

It goes through what a real peer goes through (pre-flight, checklist, admission, the
peer-to-peer connection) and prints each step, the safety codes and any interception
warning, so that an operator can check a deployment without a browser.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from urllib.parse import urlsplit

from broker.client.broker_client import BrokerClient, BrokerError
from broker.signaling.protocol import Role, SeatState, WaitingRoom


def check_broker_url(url: str) -> None:
    """A broker URL is http(s)://host[:port][/path], nothing else (no query, no fragment)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"--broker-url {url!r} is not a broker address such as https://video.example.org")


DIAGNOSTIC_DETAILS = {"location": "diagnostic test, not a real location", "contact": "diagnostic test"}


async def join_from_terminal(
    link: str,
    *,
    seconds: float,
    admit_all: bool,
    media: bool,
    details: dict[str, str] | None = None,
    broker_urls: Sequence[str] = (),
) -> int:
    """``broker join``: join, pass the checklist, connect, report what happens.

    ``broker_urls`` are other brokers of the same deployment: the client moves to the next one when the
    one it is on stops answering (or does not answer at all), and says so."""
    try:
        for url in broker_urls:
            check_broker_url(url)
    except ValueError as exc:
        print(f"Could not join: {exc}")
        return 2
    client = BrokerClient(link, extra_urls=[u.rstrip("/") for u in broker_urls], media=media, agent="broker join")
    try:
        joined = await client.connect()
    except Exception as exc:
        print(f"Could not join: {exc}" if str(exc) else "Could not join: no broker answered in time")
        return 1
    print(
        f"Joined session {joined.session} as {joined.role.value} (peer {joined.peer}); seat {joined.seat_state.value}"
    )
    try:
        if joined.role is Role.CLIENT:
            report = await client.preflight()
            print(f"Network pre-flight: connected={report.connected} rtt_ms={report.rtt_ms} relayed={report.relayed}")
            try:
                await client.submit_checklist(details=details or DIAGNOSTIC_DETAILS)
            except BrokerError as exc:
                print(f"Checklist refused ({exc.code.value}): {exc.error.message}")
                return 1
            print("Checklist accepted; waiting for the therapist to admit you.")
        loop = asyncio.get_running_loop()
        end_at = loop.time() + seconds
        reported: set[str] = set()
        admitted: set[str] = set()
        reconnects = 0
        while loop.time() < end_at and client.final is None:
            if client.reconnects != reconnects:
                reconnects = client.reconnects
                print(f"Lost the broker; reconnected through {client.broker_url} to the same seat.")
            rooms = [m for m in client.received if isinstance(m, WaitingRoom)]
            if admit_all and joined.role is Role.THERAPIST and rooms:
                for seat in rooms[-1].seats:
                    if seat.state is SeatState.WAITING and seat.peer not in admitted:
                        admitted.add(seat.peer)
                        print(f"Admitting {seat.peer} (checklist: {seat.checklist})")
                        await client.admit(seat.peer)
            for peer, peer_link in client.links.items():
                if peer_link.channel_open.is_set() and peer not in reported:
                    reported.add(peer)
                    print(f"Connected to {peer}: safety code {client.safety_code(peer)} ({peer_link.trust})")
            for interception in client.interceptions:
                print(f"WARNING: possible interception with {interception.peer}: {interception.reason}")
            client.interceptions.clear()
            await asyncio.sleep(0.5)
        if client.final is not None:
            print(f"Session over: {type(client.final).__name__}")
        return 0
    finally:
        await client.close()
