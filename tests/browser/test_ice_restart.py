"""ICE restart on the same connection, in Chromium, while the signaling WebSocket stays up.

A relay-only session between the real join page and the real therapist page, so every media packet
crosses a coturn process this test owns. Killing that coturn breaks the media path of this one call
and nothing else: both pages keep their broker connection (the test checks the broker still holds
the very same WebSocket of each). coturn then comes back on the same port, empty: every allocation is
gone, so only an ICE restart (new ICE credentials, new relay allocations) can bring the media back.

What the pages must do, and what is checked:
- the reconnecting banner says the picture and sound stopped, on both sides, and goes away after;
- no new RTCPeerConnection: the connection each page built (recorded as the page made it) is
  connected again, with a new ICE username fragment and a new relay candidate on the new coturn;
- the app's own view agrees: the same connection id on the tile, its ICE restart counter went up,
  and the safety code did not change (DTLS survived, so nobody has to compare codes again);
- video decodes again on both sides: inbound-rtp framesDecoded grows well past its value at the break.

The second test cuts the offerer's WebSocket too, so its restart offer is made while the broker is
away and never leaves the page: once the page is back with the broker it must restart again, still on
the same connection.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from playwright.async_api import Page, expect

from tests.browser.conftest import NewContext
from tests.browser.kit import RECORD_PEER_CONNECTIONS, Watch, code_with, frames_decoded, pass_checklist, wait_screen
from tests.conftest import RunningBroker, schedule, start_broker
from tests.signaling.test_turn import SECRET, Coturn, _free_listening_port, _test_coturn_command, run_coturn

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="session")]

#: Frames that must decode after the restart, beyond the count at the break (about half a second).
MORE_FRAMES = 10

#: Records every RTCPeerConnection the page makes (kit.RECORD_PEER_CONNECTIONS), and samples the
#: call's connection through the standard getStats() API.
OBSERVE_CALL = (
    RECORD_PEER_CONNECTIONS
    + """
(() => {
  const made = window.__peerConnections;
  const receivesVideo = (pc) => pc.getTransceivers().some((t) => t.receiver.track && t.receiver.track.kind === 'video');
  setInterval(async () => {
    const calls = made.filter(receivesVideo);
    const pc = calls[calls.length - 1];
    if (!pc) return;
    window.__call = window.__call || pc;  // the first call connection; it must stay the only one
    const byId = new Map();
    (await pc.getStats()).forEach((s) => byId.set(s.id, s));
    let framesDecoded = 0;
    for (const s of byId.values()) if (s.type === 'inbound-rtp' && s.kind === 'video') framesDecoded += s.framesDecoded || 0;
    const transport = [...byId.values()].find((s) => s.type === 'transport' && s.selectedCandidatePairId);
    const pair = transport ? byId.get(transport.selectedCandidatePairId) : null;
    const local = pair ? byId.get(pair.localCandidateId) : null;
    const ufrag = /a=ice-ufrag:(\\S+)/.exec(pc.localDescription ? pc.localDescription.sdp : '');
    window.__sample = {
      made: made.length,
      calls: calls.length,
      first: window.__call === pc,
      state: pc.connectionState,
      framesDecoded,
      ufrag: ufrag ? ufrag[1] : null,
      local: local ? { type: local.candidateType, at: `${local.address}:${local.port}` } : null,
    };
  }, 200);
})();
"""
)


# ---------------------------------------------------------------- a relay that can die and come back


@dataclass
class Relay:
    """coturn on one fixed port: killed like a crash, then a new, empty one on the same port."""

    port: int
    tmp: Path
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    server: Coturn | None = None
    runs: int = 0

    @property
    def url(self) -> str:
        return f"turn:127.0.0.1:{self.port}?transport=udp"

    def start(self) -> Coturn:
        self.runs += 1
        tmp = self.tmp / f"run-{self.runs}"
        tmp.mkdir(parents=True)
        self.server = self.stack.enter_context(
            run_coturn(_test_coturn_command(tmp, self.port, []), self.port, tmp / "turn.log")
        )
        return self.server

    def kill(self) -> None:
        assert self.server is not None
        self.server.process.kill()
        self.server.process.wait()
        self.server = None


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Relay]:
    relay = Relay(_free_listening_port(), tmp_path / "coturn")
    with relay.stack:
        relay.start()
        yield relay


@pytest_asyncio.fixture(loop_scope="session")
async def turn_broker(relay: Relay, tmp_path: Path) -> AsyncIterator[RunningBroker]:
    """A broker that hands out short-lived credentials for the relay (TURN REST API secret)."""
    running = await start_broker(tmp_path / "broker", turn_urls=(relay.url,), turn_secret=SECRET)
    yield running
    await running.stop()


# ---------------------------------------------------------------- the call


@dataclass
class Side:
    page: Page
    other: str  # the peer id of the other side

    @property
    def tile(self) -> Any:
        return self.page.locator(f'[data-testid=tile][data-peer="{self.other}"]')

    @property
    def banner(self) -> Any:
        return self.page.get_by_test_id("reconnecting-banner")

    async def sample(self) -> dict[str, Any]:
        await self.page.wait_for_function("() => window.__sample && window.__sample.state === 'connected'")
        return dict(await self.page.evaluate("window.__sample"))


@dataclass
class Before:
    """One side of the call just before the break."""

    sample: dict[str, Any]
    code: str
    connection: str


async def open_call(broker: RunningBroker, new_context: NewContext, watch: Watch) -> tuple[Side, Side]:
    """A relay-only session: the client passes the checklist, the therapist admits, both decode video."""
    links = await schedule(broker, clients=1, relay_only=True)
    watch.secrets.append(links.link_key)
    pages = []
    for _ in range(2):
        context = await new_context()
        await context.add_init_script(OBSERVE_CALL)
        pages.append(await context.new_page())
    client, therapist = pages
    await client.goto(links.client)
    await pass_checklist(client)
    await therapist.goto(links.therapist)
    await wait_screen(therapist, "dashboard")
    await therapist.get_by_test_id("admit").click()
    await wait_screen(client, "call")
    await frames_decoded(client, 1)
    await frames_decoded(therapist, 1)
    return Side(client, links.peers[links.therapist]), Side(therapist, links.peers[links.client])


async def before_break(side: Side) -> Before:
    sample = await side.sample()
    assert sample["calls"] == 1 and sample["first"], sample
    assert sample["local"]["type"] == "relay", f"a relay-only call must go through coturn: {sample}"
    await expect(side.tile).to_have_attribute("data-ice-restarts", "0")
    connection = await side.tile.get_attribute("data-connection")
    assert connection, "the tile names its connection"
    await expect(side.banner).to_be_hidden()
    return Before(sample, await code_with(side.page, side.other), connection)


async def media_stopped(side: Side) -> None:
    """The call's media path is down while the other side is still with the broker: the banner says so."""
    await expect(side.tile).to_have_attribute("data-state", re.compile("^(disconnected|failed)$"))
    await expect(side.banner).to_be_visible()
    await expect(side.banner).to_have_attribute("data-reason", "media")
    await expect(side.banner).to_contain_text("Reconnecting")


async def frames_at_break(side: Side) -> int:
    await side.page.wait_for_function("() => window.__sample.state !== 'connected'")
    return int(await side.page.evaluate("window.__sample.framesDecoded"))


async def recovered_on_the_same_connection(side: Side, before: Before, frames: int) -> None:
    """Connected again through the new coturn, by an ICE restart of the connection the page had."""
    await expect(side.tile).to_have_attribute("data-state", "connected")
    await expect(side.banner).to_be_hidden()
    await side.page.wait_for_function(
        "(n) => window.__sample && window.__sample.state === 'connected' && window.__sample.framesDecoded > n",
        arg=frames + MORE_FRAMES,
    )
    after = await side.sample()
    assert after["made"] == before.sample["made"], f"a new RTCPeerConnection was made: {before.sample} -> {after}"
    assert after["calls"] == 1 and after["first"], after
    assert after["ufrag"] != before.sample["ufrag"], "no ICE restart: the ICE credentials are the old ones"
    assert after["local"]["type"] == "relay", after
    assert after["local"]["at"] != before.sample["local"]["at"], "the relay allocation on the dead coturn is back?"
    # The app's own account: same connection, restarted, same safety code, decoding again.
    await expect(side.tile).to_have_attribute("data-connection", before.connection)
    await expect(side.tile).not_to_have_attribute("data-ice-restarts", "0")
    await expect(side.tile).to_have_attribute("data-code", before.code)
    await side.page.wait_for_function(
        "([sel, n]) => Number(document.querySelector(sel).dataset.framesDecoded) > n",
        arg=[f'[data-testid=tile][data-peer="{side.other}"]', frames],
    )


def broker_connection(broker: RunningBroker, peer: str) -> object:
    """The broker's live, joined WebSocket of a peer (exactly one)."""
    live = [c for c in broker.hub.connections.by_id.values() if c.peer_id == peer and not c.closed]
    assert len(live) == 1, f"{len(live)} live broker connections for one peer"
    return live[0]


# ---------------------------------------------------------------- the tests


async def test_relay_dies_and_the_same_connection_restarts_ice(
    relay: Relay, turn_broker: RunningBroker, new_context: NewContext, watch: Watch
) -> None:
    client, therapist = await open_call(turn_broker, new_context, watch)
    sides = (client, therapist)
    before = {side.other: await before_break(side) for side in sides}
    sockets = {side.other: broker_connection(turn_broker, side.other) for side in sides}

    relay.kill()
    for side in sides:
        await media_stopped(side)
    frames = {side.other: await frames_at_break(side) for side in sides}
    relay.start()

    for side in sides:
        await recovered_on_the_same_connection(side, before[side.other], frames[side.other])
    # Signaling never went away: the broker still holds the WebSocket each page had before the break.
    for side in sides:
        assert broker_connection(turn_broker, side.other) is sockets[side.other]
    await watch.assert_clean()


# alone: the restart offer must get its answer within call.js's ANSWER_WAIT_MS (10 s) once the broker
# is back, or the page rightly starts a fresh connection, which this test tells apart; beside another
# worker's browsers on two cores that answer has come later.
@pytest.mark.alone
async def test_offerer_loses_the_broker_during_the_restart_and_restarts_again(
    relay: Relay, turn_broker: RunningBroker, new_context: NewContext, watch: Watch
) -> None:
    client, therapist = await open_call(turn_broker, new_context, watch)  # the therapist offers
    sides = (client, therapist)
    before = {side.other: await before_break(side) for side in sides}
    client_socket = broker_connection(turn_broker, therapist.other)

    relay.kill()
    for side in sides:
        await media_stopped(side)
    # The therapist's WebSocket drops too, and the broker turns it away for now.
    turn_broker.hub.accepting = False
    try:
        for conn in list(turn_broker.hub.connections.by_id.values()):
            if conn.peer_id == client.other:
                await conn.transport.close(1012, "")
        await expect(therapist.banner).to_have_attribute("data-reason", "broker")
        await expect(client.tile).to_have_attribute("data-state", "away")
        await expect(client.banner).to_be_hidden()  # the client is told the therapist is away instead
        # The therapist's page restarts ICE while the broker is away: that offer never leaves the page.
        restarts = int(await therapist.tile.get_attribute("data-ice-restarts") or "0")
        await therapist.page.wait_for_function(
            "([sel, n]) => Number(document.querySelector(sel).dataset.iceRestarts) > n",
            arg=[f'[data-testid=tile][data-peer="{therapist.other}"]', restarts],
        )
        frames = {side.other: await frames_at_break(side) for side in sides}
        relay.start()
    finally:
        turn_broker.hub.accepting = True

    for side in sides:
        await recovered_on_the_same_connection(side, before[side.other], frames[side.other])
    assert broker_connection(turn_broker, therapist.other) is client_socket, "the client's WebSocket stayed up"
    await watch.assert_clean()
