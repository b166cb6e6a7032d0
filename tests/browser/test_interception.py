"""A malicious relay cannot intercept a call in Chromium unnoticed (DESIGN.md section 4).

A relay between a page and the broker tampers with the description it passes on (a man in the
middle: the page seals it, so the relay can only alter the ciphertext): the receiving page
refuses the connection and shows the full interception warning. Then the broker itself turns
bad (MaliciousRelays from tests/signaling/test_malicious_relay.py): it swaps in its own description without
or with a broken MAC, corrupts sealed descriptions or candidates, replays an old offer, or
injects a fake peer without the link key, and every attack ends on a page's warning screen and
in the broker's audit log; clear candidates it injects are dropped without a warning. Through
the honest broker, nothing of a browser call's signaling is in clear in what the broker relays
or stores (docs/protocol.md 7.7)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_asyncio
from playwright.async_api import Locator, Page, WebSocketRoute, expect

from broker.signaling.protocol import Candidate
from broker.signaling.relay import Relays
from broker.store.base import session_prefix
from tests.browser.conftest import NewContext
from tests.browser.kit import RECORD_PEER_CONNECTIONS, Watch, look, pass_checklist, wait_screen
from tests.conftest import RunningBroker, SessionLinks, schedule, start_broker
from tests.signaling.test_malicious_relay import (
    HOST_CANDIDATE,
    MADE_UP_MAC,
    MaliciousRelays,
    attacker_description,
    turn_malicious,
    wait_for,
)
from tests.signaling.test_sealed_signaling import assert_nothing_in_clear, host_addresses, secrets_of, store_contents

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="session")]

FINGERPRINT = re.compile(r"(a=fingerprint:sha-256 )([0-9A-F]{2})")


def swap_fingerprint(sdp: str) -> str:
    """What an attacker in the middle does: put its own certificate's fingerprint in."""
    return FINGERPRINT.sub(lambda m: m.group(1) + ("00" if m.group(2) != "00" else "11"), sdp)


def alter(sealed: str) -> str:
    """All it can do to a sealed description: change its ciphertext (here one bit of it)."""
    return sealed[:40] + ("B" if sealed[40] != "B" else "C") + sealed[41:]


async def relay_rewriting(page: Page, kind: str) -> list[str]:
    """Route the page's WebSocket through a relay that rewrites every `kind` it delivers."""
    rewritten: list[str] = []

    def handler(ws: WebSocketRoute) -> None:
        server = ws.connect_to_server()

        def to_page(message: str | bytes) -> None:
            if isinstance(message, str) and f'"type":"{kind}"' in message:
                data = json.loads(message)
                if data.get("sealed"):
                    data["sealed"] = alter(data["sealed"])
                    rewritten.append(f"sealed {kind}")
                else:
                    data["sdp"] = swap_fingerprint(data["sdp"])
                    rewritten.append(kind)
                message = json.dumps(data)
            ws.send(message)

        server.on_message(to_page)

    await page.route_web_socket(re.compile(r"/ws$"), handler)
    return rewritten


@pytest.mark.parametrize("victim", ["client", "therapist"])
async def test_swapped_fingerprint_is_refused_with_a_warning(
    victim: str, broker: RunningBroker, new_context: NewContext, watch: Watch, axe_source: str
) -> None:
    links = await schedule(broker, clients=1)
    watch.secrets.append(links.link_key)
    client = await (await new_context()).new_page()
    therapist = await (await new_context()).new_page()
    target = client if victim == "client" else therapist
    rewritten = await relay_rewriting(target, "offer" if victim == "client" else "answer")

    await client.goto(links.client)
    await pass_checklist(client)
    await therapist.goto(links.therapist)
    await wait_screen(therapist, "dashboard")
    await therapist.get_by_test_id("admit").click()

    await wait_screen(target, "interception")
    assert rewritten and set(rewritten) == {f"sealed {'offer' if victim == 'client' else 'answer'}"}
    alert = target.locator("#screen-interception [role=alert]")
    await expect(alert).to_contain_text("What to do now")
    await expect(target.locator("#interception-reason")).to_contain_text("bad mac")
    # Nothing got through: the victim has no connected tile.
    await expect(target.locator("[data-testid=tile][data-state=connected]")).to_have_count(0)
    await look(target, axe_source, f"{victim}-interception-warning")
    if victim == "client":
        await client.click("#interception-close")
        await wait_screen(client, "ended")
        await expect(client.locator("#ended-message")).to_contain_text("new link")
    else:
        await therapist.click("#interception-back")
        await wait_screen(therapist, "dashboard")
    await watch.assert_clean()


# ---------------------------------------------------------------- the malicious broker itself
#
# Every attack of tests/signaling/test_malicious_relay.py, played by the broker (MaliciousRelays, imported
# from there) against two real pages. The honest relay with equal safety codes on both sides is
# tests/browser/test_call.py::test_client_from_link_to_call_to_end.

CLIENT_WARNING = (
    "We stopped the call to protect you",  # what happened
    "Someone may have tried to listen in",
    "Nothing you said or showed went through this connection",
    "What to do now",  # what to do
    "Do not use this link again",
    "Contact your therapist another way",
    "Ask them for a new link",
)
THERAPIST_WARNING = (
    "A connection was stopped: possible interception",
    "could not be verified with the link key",
    "may have tried to listen in",
    "What to do now",
    "Do not continue with this client on this link",
    "Call the client by phone",
    "Schedule a new session with a new link",
)
#: The page reports as it shows the warning; generous for two busy cores.
AUDIT_WAIT_S = 10.0


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def evil(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningBroker]:
    """A broker of this module only, its hub turned malicious; the shared broker stays honest."""
    running = await start_broker(Path(tmp_path_factory.mktemp("evil-browser-broker")))
    hub = turn_malicious(running, await attacker_description())  # as tests/signaling/test_malicious_relay.py does
    yield running
    hub.__class__ = Relays
    await running.stop()


def evil_hub(running: RunningBroker, mode: str) -> MaliciousRelays:
    hub = cast(MaliciousRelays, running.broker.hub.relays)
    hub.mode = mode
    hub.saved_offers.clear()
    hub.saved_candidates.clear()
    hub.seen.clear()
    return hub


@dataclass
class Pair:
    """One session seen by two people: a client in the waiting room, the therapist on the dashboard."""

    links: SessionLinks
    client: Page
    therapist: Page

    @property
    def client_peer(self) -> str:
        return self.links.peers[self.links.client]

    @property
    def therapist_peer(self) -> str:
        return self.links.peers[self.links.therapist]

    def tile(self, page: Page, peer: str) -> Locator:
        return page.locator(f'[data-testid=tile][data-peer="{peer}"]')

    async def admit(self) -> None:
        await self.therapist.get_by_test_id("admit").click()


async def open_pair(running: RunningBroker, new_context: NewContext, watch: Watch) -> Pair:
    links = await schedule(running, clients=1)
    watch.secrets.append(links.link_key)
    contexts = [await new_context(), await new_context()]
    for context in contexts:  # so a test can read each page's own descriptions
        await context.add_init_script(RECORD_PEER_CONNECTIONS)
    client, therapist = [await context.new_page() for context in contexts]

    async def client_way_in() -> None:
        await client.goto(links.client)
        await pass_checklist(client)

    async def therapist_way_in() -> None:
        await therapist.goto(links.therapist)
        await wait_screen(therapist, "dashboard")

    await asyncio.gather(client_way_in(), therapist_way_in())
    return Pair(links, client, therapist)


async def assert_warning(pair: Pair, victim: str, reason: str, *, stopped: str) -> None:
    """The victim's page shows the full warning: what happened, what to do, and why."""
    page = pair.client if victim == "client" else pair.therapist
    await wait_screen(page, "interception")
    alert = page.locator("#screen-interception [role=alert]")
    await expect(alert).to_be_visible()
    for text in CLIENT_WARNING if victim == "client" else THERAPIST_WARNING:
        await expect(alert).to_contain_text(text)
    await expect(page.locator("#interception-reason")).to_have_text(f"Technical reason: {reason.replace('_', ' ')}.")
    # Nothing got through with the peer the attack came from.
    await expect(pair.tile(page, stopped).and_(page.locator("[data-state=connected]"))).to_have_count(0)


async def assert_audited(running: RunningBroker, pair: Pair, reporter: str) -> None:
    """The page told the broker: its audit log holds the warning, with nothing but opaque ids."""

    def entries() -> list[dict[str, Any]]:
        lines = running.config.audit_path.read_text().splitlines() if running.config.audit_path.exists() else []
        return [
            entry
            for entry in map(json.loads, lines)
            if entry["event"] == "interception_warning" and entry["session"] == pair.links.session
        ]

    try:
        # The actor is the reporting seat, opaque: "<session>-<peer>" (broker/http/app.py audit_hook).
        who = f"{pair.links.session}-{reporter}"
        await wait_for(lambda: any(entry["actor"] == who for entry in entries()), timeout=AUDIT_WAIT_S)
    except TimeoutError:
        pytest.fail("the page never reported the interception to the broker: no interception_warning in the audit log")
    text = json.dumps(entries())
    # Random ids may spell "sdp" by chance: look for the offer's own marks instead.
    assert pair.links.link_key not in text
    for mark in ("FAKEpeer", "v=0", "a=fingerprint", "a=ice-ufrag"):
        assert mark not in text
    assert {entry["outcome"] for entry in entries()} == {"warning"}


async def test_corrupted_mac_is_refused_with_a_warning(
    evil: RunningBroker, new_context: NewContext, watch: Watch
) -> None:
    evil_hub(evil, "corrupt_mac")
    try:
        pair = await open_pair(evil, new_context, watch)
        await pair.admit()
        await assert_warning(pair, "client", "bad_mac", stopped=pair.therapist_peer)
        await assert_audited(evil, pair, pair.client_peer)
    finally:
        evil_hub(evil, "honest")
    await watch.assert_clean()


async def test_corrupted_sealed_candidate_is_refused_with_a_warning(
    evil: RunningBroker, new_context: NewContext, watch: Watch
) -> None:
    """The offer opens, then a candidate behind it does not: someone altered it on the way."""
    evil_hub(evil, "corrupt_candidates")
    try:
        pair = await open_pair(evil, new_context, watch)
        await pair.admit()
        await assert_warning(pair, "client", "bad_mac", stopped=pair.therapist_peer)
        await assert_audited(evil, pair, pair.client_peer)
    finally:
        evil_hub(evil, "honest")
    await watch.assert_clean()


async def test_stripped_mac_is_refused_with_a_warning(
    evil: RunningBroker, new_context: NewContext, watch: Watch
) -> None:
    evil_hub(evil, "strip_mac")
    try:
        pair = await open_pair(evil, new_context, watch)
        await pair.admit()
        # The broker swaps the sealed offer for a description of its own without a MAC. An offer
        # without a MAC may come from a therapist on a device without the link key, so the client
        # is not connected silently: it is told to compare the safety code first.
        await wait_screen(pair.client, "unverified")
        card = pair.client.locator("#screen-unverified")
        await expect(card).to_be_visible()
        await expect(card).to_contain_text("Please compare the safety code")
        await expect(card).to_contain_text("If they differ, leave the call")
        await expect(pair.tile(pair.client, pair.therapist_peer)).not_to_have_attribute("data-state", "connected")
        # The client goes on; its answer loses its MAC as well, and the therapist holds the link
        # key: that can only be someone in the middle.
        await pair.client.click("#unverified-continue")
        await assert_warning(pair, "therapist", "missing_mac", stopped=pair.client_peer)
        await assert_audited(evil, pair, pair.therapist_peer)
    finally:
        evil_hub(evil, "honest")
    await watch.assert_clean()


async def test_replayed_old_offer_is_refused_with_a_warning(
    evil: RunningBroker, new_context: NewContext, watch: Watch
) -> None:
    hub = evil_hub(evil, "replay")  # keeps the first offer of each pair and sends it instead of later ones
    try:
        pair = await open_pair(evil, new_context, watch)
        await pair.admit()
        # The first offer goes through untouched: the call connects.
        await wait_screen(pair.client, "call")
        await expect(pair.tile(pair.client, pair.therapist_peer)).to_have_attribute("data-state", "connected")
        assert (pair.therapist_peer, pair.client_peer) in hub.saved_offers
        # The therapist reloads the page: its fresh offer is swapped for the old one.
        await pair.therapist.reload()
        await assert_warning(pair, "client", "replayed_counter", stopped=pair.therapist_peer)
        await assert_audited(evil, pair, pair.client_peer)
    finally:
        evil_hub(evil, "honest")
    await watch.assert_clean()


@pytest.mark.parametrize(
    ("mac", "reason"), [(None, "missing_mac"), (MADE_UP_MAC, "bad_mac")], ids=["no-mac", "made-up-mac"]
)
async def test_fake_peer_from_the_broker_is_refused_with_a_warning(
    mac: str | None, reason: str, evil: RunningBroker, new_context: NewContext, watch: Watch
) -> None:
    hub = evil_hub(evil, "honest")
    pair = await open_pair(evil, new_context, watch)
    await pair.admit()
    await wait_screen(pair.client, "call")
    await expect(pair.tile(pair.client, pair.therapist_peer)).to_have_attribute("data-state", "connected")
    # A peer the therapist never admitted, made up by the broker, offers to the client.
    await hub.inject_fake_offer(pair.links.session, pair.client_peer, mac=mac)
    # The warning, not the "compare the safety code" screen: only a therapist may lack the link key.
    await assert_warning(pair, "client", reason, stopped="FAKEpeer")
    await expect(pair.tile(pair.client, "FAKEpeer")).to_have_count(0)
    # The real call is untouched.
    await expect(pair.tile(pair.client, pair.therapist_peer)).to_have_attribute("data-state", "connected")
    await assert_audited(evil, pair, pair.client_peer)
    await watch.assert_clean()


async def connected(pair: Pair) -> None:
    await wait_screen(pair.client, "call")
    await expect(pair.tile(pair.client, pair.therapist_peer)).to_have_attribute("data-state", "connected")
    await expect(pair.tile(pair.therapist, pair.client_peer)).to_have_attribute("data-state", "connected")


async def test_clear_candidates_injected_by_the_broker_are_dropped_without_a_warning(
    evil: RunningBroker, new_context: NewContext, watch: Watch
) -> None:
    """Both pages seal; a clear candidate can only come from the broker: dropped and counted,
    never used, and no warning (it gives the broker nothing it could not do by dropping)."""
    hub = evil_hub(evil, "honest")
    pair = await open_pair(evil, new_context, watch)
    await pair.admit()
    await connected(pair)
    for sender, recipient in ((pair.therapist_peer, pair.client_peer), (pair.client_peer, pair.therapist_peer)):
        fake = Candidate(to=recipient, candidate=HOST_CANDIDATE, sdp_mid="0", sdp_mline_index=0, from_=sender)
        for _ in range(5):
            await hub.inject(pair.links.session, fake)
    await expect(pair.tile(pair.client, pair.therapist_peer)).to_have_attribute("data-dropped", "5")
    await expect(pair.tile(pair.therapist, pair.client_peer)).to_have_attribute("data-dropped", "5")
    assert await pair.client.evaluate("document.body.dataset.screen") == "call"
    assert await pair.therapist.evaluate("document.body.dataset.screen") == "dashboard"
    await expect(pair.tile(pair.client, pair.therapist_peer)).to_have_attribute("data-state", "connected")
    await watch.assert_clean()


async def test_the_broker_holds_no_signaling_of_a_browser_call_in_clear(
    evil: RunningBroker, new_context: NewContext, watch: Watch
) -> None:
    """Chromium trickles its candidates: every offer, answer and candidate the broker relayed was
    sealed, and neither the frames nor the store hold a fingerprint, ICE credentials, a candidate
    or a host address of either page (the Python peers: tests/signaling/test_sealed_signaling.py)."""
    hub = evil_hub(evil, "honest")
    pair = await open_pair(evil, new_context, watch)
    await pair.admit()
    await connected(pair)
    sdps: list[str] = []
    for page in (pair.client, pair.therapist):
        sdps += await page.evaluate(
            """() => window.__peerConnections.flatMap((pc) =>
                 [pc.localDescription, pc.remoteDescription].filter(Boolean).map((d) => d.sdp))"""
        )
    secrets = secrets_of(sdps)
    assert host_addresses(sdps), "the pages used no host address: nothing to look for"
    kinds = {kind for kind, _, _ in hub.seen}
    assert {"Offer", "Answer", "Candidate"} <= kinds, kinds  # candidates were trickled
    assert all(sealed for _, sealed, _ in hub.seen)
    assert_nothing_in_clear("a relayed frame", [frame for _, _, frame in hub.seen], secrets)
    # This session's keys: the store also holds the sessions of the attacks above, with the
    # malicious broker's own descriptions in them.
    stored = await store_contents(evil, prefix=session_prefix(pair.links.session))
    assert any(b'"sealed"' in value for value in stored)  # the resume buffers were read
    assert_nothing_in_clear("the store", stored, secrets)
    await watch.assert_clean()


async def relay_repeating_sealed_candidates(page: Page) -> list[int]:
    """Route the page's WebSocket through a relay that delivers every sealed candidate twice."""
    repeated: list[int] = []

    def handler(ws: WebSocketRoute) -> None:
        server = ws.connect_to_server()

        def to_page(message: str | bytes) -> None:
            ws.send(message)
            if isinstance(message, str) and '"type":"candidate"' in message and '"sealed":"' in message:
                repeated.append(json.loads(message)["counter"])
                ws.send(message)

        server.on_message(to_page)

    await page.route_web_socket(re.compile(r"/ws$"), handler)
    return repeated


async def test_a_replayed_sealed_candidate_is_ignored_without_a_warning(
    broker: RunningBroker, new_context: NewContext, watch: Watch
) -> None:
    """A sealed candidate again is nothing new: dropped and counted, and the call goes on."""
    links = await schedule(broker, clients=1)
    watch.secrets.append(links.link_key)
    client = await (await new_context()).new_page()
    therapist = await (await new_context()).new_page()
    repeated = await relay_repeating_sealed_candidates(client)
    await client.goto(links.client)
    await pass_checklist(client)
    await therapist.goto(links.therapist)
    await wait_screen(therapist, "dashboard")
    pair = Pair(links, client, therapist)
    await pair.admit()
    await connected(pair)
    await wait_for(lambda: len(repeated) > 0)
    tile = pair.tile(client, pair.therapist_peer)
    await expect(tile).to_have_attribute("data-dropped", re.compile(r"^[1-9]\d*$"))
    assert int(await tile.get_attribute("data-dropped") or 0) <= len(repeated)
    assert await client.evaluate("document.body.dataset.screen") == "call"
    await expect(tile).to_have_attribute("data-state", "connected")
    await watch.assert_clean()
