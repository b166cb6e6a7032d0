"""A session through Janus in the call pages (issue 22; docs/protocol.md 3, 7.5 `media_key`, 7.12).

The therapist's and two clients' pages, in Chromium, on a broker whose sessions above two people go
through the tests' Janus: they pass the checklist and the waiting room as in any session, then see
and hear each other through Janus. Their peer connections carry no media (data only: chat, the
tools, the frame keys); every connection that carries media has a frame transform on each sender
and receiver, and what Janus forwards is sealed. When a client is removed, or put on hold, the
others make new keys (a new key generation in the frames they send) and go on seeing each other; the
held client leaves the room and comes back into it when the hold ends.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from playwright.async_api import Page, Route, expect

from broker.crypto.sframe import SENDER_SLOTS, decode_header
from tests.browser.conftest import NewContext
from tests.browser.kit import Watch, frames_decoded, until, wait_screen
from tests.browser.test_seats import Trio, open_trio
from tests.conftest import RunningBroker, start_broker
from tests.janus_server import JanusServer, janus_server  # noqa: F401 - the fixture

# alone: three browsers' media through Janus on two cores stall beside the other worker's browsers.
pytestmark = [pytest.mark.browser, pytest.mark.alone, pytest.mark.asyncio(loop_scope="session")]

#: Keeps the page's frame-crypto worker reachable (window.__frameWorkers) to ask it its counts and for
#: the wire bytes of frames it receives, as the page's own FrameCrypto does (the same messages).
SPY_WORKERS = """
(() => {
  const Native = window.Worker;
  const made = [];
  Object.defineProperty(window, '__frameWorkers', { value: made });
  window.Worker = class extends Native {
    constructor(url, options) { super(url, options); if (options?.name === 'frame-crypto') made.push(this); }
  };
  let next = 0;
  window.__askWorker = (op, fields = {}) => new Promise((resolve, reject) => {
    const worker = made[made.length - 1];
    if (!worker) { resolve(null); return; }
    const id = `spy-${++next}`;
    worker.addEventListener('message', function reply(event) {
      if (event.data?.id !== id) return;
      worker.removeEventListener('message', reply);
      if (event.data.ok) resolve(event.data.value); else reject(new Error(event.data.code));
    });
    worker.postMessage({ ...fields, id, op });
  });
})();
"""
#: Every connection of the page: how many transceivers, and whether each sender and receiver has a
#: transform (the frame encryption).
CONNECTIONS = """() => window.__peerConnections.filter((pc) => pc.connectionState !== 'closed').map((pc) => ({
  transceivers: pc.getTransceivers().length,
  sealed: pc.getTransceivers().every((t) => {
    const way = t.currentDirection ?? t.direction;
    return (!way.includes('send') || !!t.sender.transform) && (!way.includes('recv') || !!t.receiver.transform);
  }),
}))"""
#: The key ids of the audio frames a page receives next (audio keeps no clear prefix).
NEXT_AUDIO_KIDS = """async () => {
  await window.__askWorker('capture', { count: 40 });
  await new Promise((r) => setTimeout(r, 1500));
  const frames = await window.__askWorker('captured');
  return frames.filter((f) => f.kind === 'audio').map((f) => Array.from(f.bytes.slice(0, 12)));
}"""


@pytest_asyncio.fixture(loop_scope="session")
async def sfu_broker(tmp_path: Path, janus_server: JanusServer) -> AsyncIterator[RunningBroker]:  # noqa: F811
    """A broker whose sessions above two people (the therapist and two clients) go through Janus."""
    janus_server.ensure_running()
    running = await start_broker(tmp_path / "data", **janus_server.settings(), mesh_max_participants=2)
    yield running
    await running.stop()


async def counts(page: Page) -> dict[str, Any]:
    return dict(await page.evaluate("() => window.__askWorker('counts')") or {})


async def decrypted_video(page: Page) -> int:
    return int((await counts(page)).get("decrypted", {}).get("video", 0))


async def sender_generations(page: Page) -> set[tuple[int, int]]:
    """(slot, generation) of the audio frames `page` receives over a moment."""
    out = set()
    for head in await page.evaluate(NEXT_AUDIO_KIDS):
        kid, _counter, _length = decode_header(bytes(head))
        out.add((kid % SENDER_SLOTS, kid // SENDER_SLOTS))
    return out


async def media_only_through_janus(page: Page) -> None:
    """Two peer connections without media (the pairs), and every one with media sealed."""
    connections = await page.evaluate(CONNECTIONS)
    assert [c for c in connections if c["transceivers"] == 0], connections
    with_media = [c for c in connections if c["transceivers"]]
    assert with_media and all(c["sealed"] for c in with_media), connections


async def still_decoding(page: Page) -> None:
    before = await decrypted_video(page)
    await until(lambda: decrypted_video(page), lambda now: now > before, "video that keeps arriving and opening", 20)


async def all_decode(trio: Trio, count: int = 2) -> None:
    """Every page's tiles decode video; on failure, what each page's frame worker counted (why not)."""
    try:
        for page in (trio.therapist, *trio.clients):
            await frames_decoded(page, count)
    except AssertionError as failure:
        seen = [await counts(page) for page in (trio.therapist, *trio.clients)]
        raise AssertionError(f"{failure}\nframe counts (therapist, clients): {seen}") from None


async def open_sfu_trio(broker: RunningBroker, new_context: NewContext, watch: Watch) -> Trio:
    return await open_trio(
        broker,
        new_context,
        watch,
        client_scripts=(SPY_WORKERS, SPY_WORKERS),
        therapist_script=SPY_WORKERS,
    )


async def test_a_group_through_janus_sees_each_other_with_every_frame_sealed_and_rekeys_on_removal(
    sfu_broker: RunningBroker, new_context: NewContext, watch: Watch
) -> None:
    trio = await open_sfu_trio(sfu_broker, new_context, watch)
    pages = [trio.therapist, *trio.clients]
    await all_decode(trio)  # each tile's video, decoded from Janus's connection
    for page in pages:
        await media_only_through_janus(page)
        assert await decrypted_video(page) > 0
        await expect(page.get_by_test_id("sfu-banner")).to_be_hidden()
    # Screen sharing rides on the pair connections' media: not offered through Janus (yet).
    await expect(trio.therapist.get_by_test_id("share-screen")).to_be_hidden()
    for page in pages:
        c = await counts(page)
        assert c["bad_tag"] == 0 and c["malformed"] == 0, c

    # The therapist removes the second client: the others make new keys, and still see each other.
    before = await sender_generations(trio.clients[0])
    therapist_slot = {kid for kid in before if kid[0] == 0}
    assert therapist_slot, before
    await trio.seat_button(trio.client_peers[1], "remove").click()
    await trio.therapist.get_by_test_id("confirm-remove").click()
    await frames_decoded(trio.therapist, 1)
    await frames_decoded(trio.clients[0], 1)

    newest = max(g for _, g in therapist_slot)
    await until(
        lambda: sender_generations(trio.clients[0]),
        lambda kids: any(slot == 0 and g > newest for slot, g in kids),
        "the therapist's frames under a new key generation",
        20,
    )
    await still_decoding(trio.clients[0])
    await still_decoding(trio.therapist)


#: How many of the page's connections that carry media (its connections with Janus) are open: one
#: publishing, and one receiving every other publisher (Janus's multistream subscription).
MEDIA_CONNECTIONS_OPEN = """() => window.__peerConnections.filter(
  (pc) => pc.connectionState !== 'closed' && pc.getTransceivers().length > 0).length"""


async def test_a_held_client_leaves_the_room_the_others_rekey_and_it_comes_back_when_the_hold_ends(
    sfu_broker: RunningBroker, new_context: NewContext, watch: Watch
) -> None:
    trio = await open_sfu_trio(sfu_broker, new_context, watch)
    await all_decode(trio)
    # Two connections with Janus a page, however many others there are: n at Janus, not n².
    for page in (trio.therapist, *trio.clients):
        assert await page.evaluate(MEDIA_CONNECTIONS_OPEN) == 2
    stays, held = trio.clients
    newest = max(g for slot, g in await sender_generations(stays) if slot == 0)

    await trio.seat_button(trio.client_peers[1], "hold").click()
    await wait_screen(held, "hold")
    await until(lambda: held.evaluate(MEDIA_CONNECTIONS_OPEN), lambda n: n == 0, "the held page out of Janus", 20)
    await until(
        lambda: sender_generations(stays),
        lambda kids: any(slot == 0 and g > newest for slot, g in kids),
        "the therapist's frames under a key the held client never got",
        20,
    )
    await still_decoding(stays)

    await trio.seat_button(trio.client_peers[1], "release").click()
    await wait_screen(held, "call")
    await until(lambda: held.evaluate(MEDIA_CONNECTIONS_OPEN), lambda n: n == 2, "the page back in Janus", 30)
    await still_decoding(held)
    await still_decoding(stays)


#: Every `media_key` the page's pair channels receive (window.__mediaKeys): what an altered page knows.
RECORD_KEYS = """
(() => {
  window.__mediaKeys = [];
  const native = RTCPeerConnection.prototype.createDataChannel;
  RTCPeerConnection.prototype.createDataChannel = function (...args) {
    const channel = native.apply(this, args);
    channel.addEventListener('message', (e) => {
      try { const m = JSON.parse(e.data); if (m.t === 'media_key') window.__mediaKeys.push(m); } catch {}
    });
    return channel;
  };
})();
"""
#: The altered page seals its own frames under the therapist's key and key id (it holds both).
SEAL_AS = """(k) => {
  const raw = atob(k.key.replace(/-/g, '+').replace(/_/g, '/'));
  const baseKey = Uint8Array.from(raw, (c) => c.charCodeAt(0));
  return window.__askWorker('send-key', { baseKey, slot: k.slot, generation: k.generation });
}"""


async def test_a_participant_sealing_its_frames_as_the_therapist_is_refused_by_the_others(
    sfu_broker: RunningBroker, new_context: NewContext, watch: Watch
) -> None:
    """Every participant holds every sender's key, so an altered page (or Janus, swapping feeds) could
    pass frames off as another person's; each feed's receivers open only frames under the slot of the
    peer it shows (bound from that peer's own `media_key`), so the others refuse them."""
    trio = await open_trio(
        sfu_broker,
        new_context,
        watch,
        client_scripts=(SPY_WORKERS + RECORD_KEYS, SPY_WORKERS),
        therapist_script=SPY_WORKERS,
    )
    await all_decode(trio)
    altered, other = trio.clients
    therapists = await altered.evaluate("window.__mediaKeys.filter((k) => k.slot === 0)")
    assert therapists, "the therapist's key reached the client"
    before = (await counts(other))["wrong_sender"]
    await altered.evaluate(SEAL_AS, therapists[-1])
    await until(lambda: counts(other), lambda c: c["wrong_sender"] > before + 20, "frames refused as another's", 30)
    therapist_tile = other.locator(f'[data-testid=tile][data-peer="{trio.links.peers[trio.links.therapist]}"]')
    await expect(therapist_tile).not_to_have_attribute("data-frames-decoded", "0")
    await still_decoding(other)  # the therapist's own frames still open there


async def test_a_publishing_and_a_subscription_that_fail_once_are_made_again(
    sfu_broker: RunningBroker,
    new_context: NewContext,
    watch: Watch,
    janus_server: JanusServer,  # noqa: F811
) -> None:
    """Janus slow or unreachable for a moment (a loaded host, a network blip): the first `publish` and
    the first subscriber `join` one client's page sends never reach Janus. The page joins the room
    again (docs/protocol.md 7.12, "A browser in the Janus room") and subscribes again, and every page
    ends up seeing every other."""
    lost: list[str] = []

    async def lose_first_tries(route: Route) -> None:
        body = json.loads(route.request.post_data or "{}").get("body") or {}
        what = (
            "publish" if body.get("request") == "publish" else "subscribe" if body.get("ptype") == "subscriber" else ""
        )
        if what and what not in lost:
            lost.append(what)
            await route.abort("connectionfailed")
            return
        await route.continue_()

    async def unreliable_janus(_links: Any, clients: list[Page]) -> None:
        await clients[0].route(re.compile(re.escape(janus_server.settings()["janus_url"]) + ".*"), lose_first_tries)

    trio = await open_trio(
        sfu_broker,
        new_context,
        watch,
        client_scripts=(SPY_WORKERS, SPY_WORKERS),
        therapist_script=SPY_WORKERS,
        before_join=unreliable_janus,
    )
    await all_decode(trio)
    assert sorted(lost) == ["publish", "subscribe"], lost
    await still_decoding(trio.clients[0])
    await still_decoding(trio.therapist)
