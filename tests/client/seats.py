"""Three-way calls for the seat-key tests: a therapist and clients, each with its own link's key."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from broker.client.broker_client import BrokerClient
from broker.signaling.protocol import SeatState, Status
from tests.conftest import RunningBroker, SessionLinks, schedule


@dataclass
class Call:
    links: SessionLinks
    therapist: BrokerClient
    clients: list[BrokerClient]

    @property
    def everyone(self) -> list[BrokerClient]:
        return [self.therapist, *self.clients]

    async def close(self) -> None:
        for peer in self.everyone:
            await peer.close()


async def wait_for(condition: Callable[[], object], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.02)


async def waiting(link: str, cls: type[BrokerClient] = BrokerClient, *, media: bool = False) -> BrokerClient:
    """A client who passed the pre-flight and the checklist (with emergency details) and now waits."""
    client = cls(link, media=media)
    await client.connect()
    assert (await client.preflight()).connected
    await client.submit_checklist(details={"location": f"home of {client.peer_id}", "contact": "a friend"})
    await client.expect(Status, where=lambda m: m.seat_state is SeatState.WAITING)
    return client


async def three_way(
    running: RunningBroker,
    *,
    clients: int = 2,
    media: bool = False,
    connect: bool = True,
    classes: Sequence[type[BrokerClient]] = (),
) -> Call:
    """A session with ``clients`` clients (of ``classes``, else BrokerClient), all admitted;
    with ``connect``, every pair connected."""
    links = await schedule(running, clients=clients)
    therapist = BrokerClient(links.therapist, media=media)
    await therapist.connect()
    kinds = [*classes, *[BrokerClient] * clients][:clients]
    joined = await asyncio.gather(
        *(waiting(link, cls, media=media) for link, cls in zip(links.clients, kinds, strict=True))
    )
    call = Call(links, therapist, list(joined))
    for client in call.clients:
        await therapist.admit(client.peer_id)
    if connect:
        await all_connected(call)
    return call


async def all_connected(call: Call, timeout: float = 20.0) -> None:
    """Every pair's data channel open, both ways."""
    for a in call.everyone:
        for b in call.everyone:
            if a is not b:
                await a.wait_connected(b.peer_id, timeout=timeout)
