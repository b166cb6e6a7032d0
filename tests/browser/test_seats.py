"""Couples, families and groups in Chromium: a key per seat, the therapist's roster, private time
(docs/protocol.md 7.1, 7.8, 7.9; issue 21).

Three browser contexts (the therapist and two clients) on the real broker. Honest: every pair
connects with one safety code on both ends, and the therapist puts one client on hold and
brings them back twice; while held, nothing reaches that client's page on any track, and after
release its frames decode again on the same RTCPeerConnection objects. Hostile: a relay between
a client's page and the broker, with a colluding client that knows its own seat key, tries to
speak as the therapist, to put another certificate between the two clients, and to forge a
roster; each attempt ends on the victim's interception warning."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from playwright.async_api import Locator, Page, WebSocketRoute, expect

from broker.crypto.link_key import decode_link_key, derive_auth_key, new_link_key, pair_key
from broker.crypto.roster import RosterEntry, roster_plaintext
from broker.crypto.sealed_signaling import derive_seal_key, seal_signal
from tests.browser.conftest import NewContext
from tests.browser.kit import RECORD_PEER_CONNECTIONS, Watch, frames_decoded, look, pass_checklist, wait_screen
from tests.conftest import RunningBroker, SessionLinks, schedule

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="session")]

HOLD_TEXT = "Your therapist is talking with someone privately. You'll be brought back."
#: Bytes received on every inbound track of a page's connections: {"<pc index>/<stats id>": bytes}.
INBOUND_BYTES = """() => Promise.all(window.__peerConnections.map(async (pc, i) => {
  if (pc.connectionState === 'closed') return [];
  const out = [];
  (await pc.getStats()).forEach((s) => {
    if (s.type === 'inbound-rtp') out.push([`${i}/${s.id}`, s.bytesReceived ?? 0]);
  });
  return out;
})).then((lists) => Object.fromEntries(lists.flat()))"""
#: Video frames decoded per connection object (its index in window.__peerConnections).
FRAMES_DECODED = """() => Promise.all(window.__peerConnections.map(async (pc) => {
  let frames = 0;
  if (pc.connectionState !== 'connected') return -1;
  (await pc.getStats()).forEach((s) => {
    if (s.type === 'inbound-rtp' && s.kind === 'video') frames += s.framesDecoded ?? 0;
  });
  return frames;
}))"""
#: A colluding client's page: every connection after its first gets a certificate of its own, so
#: what it shows the other client is not the fingerprint the therapist vouched for.
SWAP_CERTIFICATE = """
(() => {
  const Native = window.RTCPeerConnection;
  let made = 0;
  window.RTCPeerConnection = class extends Native {
    constructor(config = {}, ...rest) {
      made += 1;
      super(made > 1 ? { ...config, certificates: undefined } : config, ...rest);
    }
  };
  window.RTCPeerConnection.generateCertificate = Native.generateCertificate.bind(Native);
})();
"""


@dataclass
class Trio:
    """One session seen by three people: the therapist and two clients, all in the call."""

    links: SessionLinks
    therapist: Page
    clients: list[Page]

    @property
    def therapist_peer(self) -> str:
        return self.links.peers[self.links.therapist]

    @property
    def client_peers(self) -> list[str]:
        return [self.links.peers[link] for link in self.links.clients]

    @staticmethod
    def tile(page: Page, peer: str) -> Locator:
        return page.locator(f'[data-testid=tile][data-peer="{peer}"]')

    def seat_button(self, peer: str, action: str) -> Locator:
        return self.therapist.locator(f'[data-testid=seat][data-peer="{peer}"] [data-testid={action}]')


async def open_trio(
    broker: RunningBroker,
    new_context: NewContext,
    watch: Watch,
    *,
    client_scripts: tuple[str, str] = ("", ""),
    therapist_script: str = "",
    before_join: Callable[[SessionLinks, list[Page]], Any] | None = None,
) -> Trio:
    """Schedule a session of two clients; both pass the checklist and the therapist admits them."""
    links = await schedule(broker, clients=2)
    watch.secrets.extend([links.link_key, *links.seat_keys.values()])
    pages = []
    for script in (therapist_script, *client_scripts):
        context = await new_context()
        await context.add_init_script(RECORD_PEER_CONNECTIONS)
        if script:
            await context.add_init_script(script)
        pages.append(await context.new_page())
    therapist, *clients = pages
    if before_join:
        await before_join(links, clients)

    async def client_way_in(page: Page, link: str, i: int) -> None:
        await page.goto(link)
        await pass_checklist(page, location=f"Room {i}", contact=f"Contact {i}")

    async def therapist_way_in() -> None:
        await therapist.goto(links.therapist)
        await wait_screen(therapist, "dashboard")

    await asyncio.gather(
        therapist_way_in(),
        *(client_way_in(p, link, i) for i, (p, link) in enumerate(zip(clients, links.clients, strict=True))),
    )
    trio = Trio(links, therapist, clients)
    for peer in trio.client_peers:
        await trio.seat_button(peer, "admit").click()
    return trio


async def inbound_bytes(page: Page) -> dict[str, int]:
    return dict(await page.evaluate(INBOUND_BYTES))


async def inbound_stopped(
    read: Callable[[], Awaitable[dict[str, int]]], *, quiet_s: float = 1.5, within_s: float = 15.0
) -> dict[str, int]:
    """Wait until no inbound track (as `read` counts them) grows over `quiet_s`; the counts then."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    before = await read()
    while True:
        await asyncio.sleep(quiet_s)
        now = await read()
        if now == before and now:
            return now
        if loop.time() > deadline:
            grew = [k for k in now if now[k] != before.get(k)]
            pytest.fail(f"inbound bytes still grow on {len(grew)} of {len(now)} tracks while on hold")
        before = now


# ---------------------------------------------------------------- honest: three peers, private time


async def test_three_peers_connect_pair_by_pair_and_hold_and_release_twice(
    broker: RunningBroker, new_context: NewContext, watch: Watch, axe_source: str
) -> None:
    trio = await open_trio(broker, new_context, watch)
    first, second = trio.client_peers
    # Every pair connects, with one safety code on both ends.
    await frames_decoded(trio.therapist, 2)
    for page in trio.clients:
        await wait_screen(page, "call")
        await frames_decoded(page, 2)
    for peer, page in zip(trio.client_peers, trio.clients, strict=True):
        assert await code_of(page, trio.therapist_peer) == await code_of(trio.therapist, peer)
    assert await code_of(trio.clients[0], second) == await code_of(trio.clients[1], first)

    held_page = trio.clients[1]
    connections = await held_page.evaluate("window.__peerConnections.length")
    for round_ in range(2):
        await trio.seat_button(second, "hold").click()
        await wait_screen(held_page, "hold")
        await expect(held_page.get_by_test_id("hold-message")).to_have_text(HOLD_TEXT)
        if round_ == 0:
            await look(held_page, axe_source, "client-on-hold")
            await look(trio.therapist, axe_source, "therapist-client-on-hold")
        await expect(
            trio.therapist.locator(f'[data-testid=seat][data-peer="{second}"] [data-testid=seat-held]')
        ).to_be_visible()
        await expect(trio.tile(trio.clients[0], second)).to_have_attribute("data-held", "yes")
        # Nothing reaches the held page on any track: the counts stop, and stay stopped.
        stopped = await inbound_stopped(lambda: inbound_bytes(held_page))
        assert len(stopped) >= 4  # audio and video from the therapist and from the other client
        await asyncio.sleep(2)
        assert await inbound_bytes(held_page) == stopped
        # The two others still see and hear each other.
        frames = await trio.clients[0].evaluate(FRAMES_DECODED)
        await trio.seat_button(second, "release").click()
        await wait_screen(held_page, "call")
        await expect(trio.tile(trio.clients[0], second)).to_have_attribute("data-held", "no")
        # Frames decode again, on the very same RTCPeerConnection objects.
        at_release = await held_page.evaluate(FRAMES_DECODED)
        await wait_until_grown(held_page, at_release)
        assert await held_page.evaluate("window.__peerConnections.length") == connections
        assert max(await trio.clients[0].evaluate(FRAMES_DECODED)) > max(frames)
    await watch.assert_clean()


async def test_a_client_reloaded_in_a_group_is_vouched_for_again(
    broker: RunningBroker, new_context: NewContext, watch: Watch
) -> None:
    """A client's page reloads (another device for its seat, with a new certificate): the other
    client waits for the therapist's new roster and reconnects to the new page, with no warning."""
    trio = await open_trio(broker, new_context, watch)
    first, second = trio.client_peers
    for page in trio.clients:
        await frames_decoded(page, 2)
    old_code = await code_of(trio.clients[0], second)
    reloaded = trio.clients[1]
    await reloaded.reload()
    await wait_screen(reloaded, "welcome")
    await pass_checklist(reloaded)
    await trio.seat_button(second, "admit-other-device").click()
    await wait_screen(reloaded, "call")
    await frames_decoded(reloaded, 2)
    await frames_decoded(trio.clients[0], 2)
    new_code = await code_of(reloaded, first)
    assert new_code != old_code
    await expect(trio.tile(trio.clients[0], second)).to_have_attribute("data-code", new_code)
    assert await trio.clients[0].evaluate("document.body.dataset.screen") == "call"
    await watch.assert_clean()


async def wait_until_grown(page: Page, before: list[int], within_s: float = 20.0) -> None:
    """Every connection that was live decodes more video frames than `before`."""
    await frames_grown(lambda: page.evaluate(FRAMES_DECODED), before, within_s)


async def frames_grown(read: Callable[[], Awaitable[list[int]]], before: list[int], within_s: float = 20.0) -> None:
    """As wait_until_grown, with frames counted by `read` (a Chromium or a Firefox page)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while True:
        now = await read()
        live = [i for i, n in enumerate(before) if n >= 0]
        if live and all(now[i] > before[i] for i in live):
            return
        if loop.time() > deadline:
            pytest.fail(f"frames did not decode again after release: {before} -> {now}")
        await asyncio.sleep(0.5)


async def code_of(page: Page, peer: str) -> str:
    tile = Trio.tile(page, peer)
    await expect(tile).to_have_attribute("data-code", re.compile(r"^\d{3} \d{3} \d{3}$"))
    return str(await tile.get_attribute("data-code"))


# ---------------------------------------------------------------- hostile relay, colluding client


def relay(
    page_routes: list[WebSocketRoute], rewrite: Callable[[dict[str, Any]], dict[str, Any]]
) -> Callable[[WebSocketRoute], None]:
    """A relay between one page and the broker that rewrites what the broker delivers."""

    def handler(ws: WebSocketRoute) -> None:
        server = ws.connect_to_server()
        page_routes.append(ws)

        def to_page(message: str | bytes) -> None:
            if isinstance(message, str) and message.startswith("{"):
                message = json.dumps(rewrite(json.loads(message)))
            ws.send(message)

        server.on_message(to_page)

    return handler


async def assert_intercepted(page: Page, reason: str) -> None:
    await wait_screen(page, "interception")
    await expect(page.locator("#interception-reason")).to_have_text(f"Technical reason: {reason.replace('_', ' ')}.")


def forge_as_therapist(links: SessionLinks, kind: str, counter: int, plaintext: str) -> str:
    """What a colluding client can seal "from the therapist" to the first client: with its own seat key."""
    session, therapist = links.session, links.peers[links.therapist]
    victim, colluder = (links.peers[link] for link in links.clients)
    own = decode_link_key(links.seat_keys[colluder])
    k_seal = derive_seal_key(pair_key(derive_auth_key(own, session), therapist, victim), therapist, victim)
    return seal_signal(k_seal, session, therapist, victim, kind, counter, plaintext)


@pytest.mark.parametrize("attack", ["relabelled", "forged"])
async def test_relay_rewriting_from_cannot_speak_as_the_therapist(
    attack: str, broker: RunningBroker, new_context: NewContext, watch: Watch
) -> None:
    """The relay delivers as the therapist's what the other client sent the victim ("relabelled"),
    or an offer the colluding client sealed with its own seat key ("forged"): neither opens."""
    rewritten: list[str] = []
    routes: list[WebSocketRoute] = []

    async def install(links: SessionLinks, clients: list[Page]) -> None:
        therapist = links.peers[links.therapist]
        other = links.peers[links.clients[1]]

        def as_therapist(message: dict[str, Any]) -> dict[str, Any]:
            if attack == "relabelled" and message.get("type") in ("offer", "answer", "candidate"):
                if message.get("from") == other:
                    rewritten.append(message["type"])
                    return {**message, "from": therapist}
            return message

        await clients[0].route_web_socket(re.compile(r"/ws$"), relay(routes, as_therapist))

    trio = await open_trio(broker, new_context, watch, before_join=install)
    victim = trio.clients[0]
    if attack == "forged":
        await expect(trio.tile(victim, trio.therapist_peer)).to_have_attribute("data-state", "connected")
        sdp = (
            "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=fingerprint:sha-256 " + ":".join(["AB"] * 32) + "\r\n"
        )
        counter = 2**52
        sealed = forge_as_therapist(trio.links, "offer", counter, json.dumps({"sdp": sdp}, separators=(",", ":")))
        offer = {"type": "offer", "to": trio.client_peers[0], "from": trio.therapist_peer, "seq": 10**6}
        routes[-1].send(json.dumps({**offer, "counter": counter, "sealed": sealed}))
        rewritten.append("offer")
    await assert_intercepted(victim, "bad_mac")
    assert rewritten
    await watch.assert_clean()


async def test_colluding_client_with_another_certificate_cannot_sit_between_the_clients(
    broker: RunningBroker, new_context: NewContext, watch: Watch
) -> None:
    """The second client holds the client-pair key, but shows the first one a fingerprint the
    therapist never vouched for (a certificate in the middle): fingerprint_mismatch."""
    trio = await open_trio(broker, new_context, watch, client_scripts=("", SWAP_CERTIFICATE))
    await assert_intercepted(trio.clients[0], "fingerprint_mismatch")
    await expect(
        trio.tile(trio.clients[0], trio.client_peers[1]).and_(trio.clients[0].locator("[data-state=connected]"))
    ).to_have_count(0)
    await watch.assert_clean()


async def test_forged_roster_from_a_colluding_client_shows_the_warning(
    broker: RunningBroker, new_context: NewContext, watch: Watch
) -> None:
    """A client that knows only its own seat key forges a roster for the other client, and the
    relay delivers it as the therapist's: it does not open (bad_mac)."""
    routes: list[WebSocketRoute] = []

    async def install(links: SessionLinks, clients: list[Page]) -> None:
        await clients[0].route_web_socket(re.compile(r"/ws$"), relay(routes, lambda m: m))

    trio = await open_trio(broker, new_context, watch, before_join=install)
    victim = trio.clients[0]
    await wait_screen(victim, "call")
    await expect(trio.tile(victim, trio.therapist_peer)).to_have_attribute("data-state", "connected")
    first, second = trio.client_peers
    fingerprint = "sha-256 " + ":".join(["AB"] * 32)
    plaintext = roster_plaintext(2**52, [RosterEntry(second, fingerprint, new_link_key(), False)])
    counter = 2**52
    sealed = forge_as_therapist(trio.links, "roster", counter, plaintext)
    forged = {
        "type": "roster",
        "to": first,
        "from": trio.therapist_peer,
        "seq": 10**6,
        "counter": counter,
        "sealed": sealed,
    }
    routes[-1].send(json.dumps(forged))
    await assert_intercepted(victim, "bad_mac")
    await watch.assert_clean()
