"""Screen sharing in a couples/family call in Chromium (issue 34; docs/protocol.md 7.11).

Three browser contexts (the therapist and two clients) on the real broker; the display capture is
Chromium's fake one (`--use-fake-ui-for-media-stream` picks the screen without asking). Every share
rides on transceivers negotiated with the pair's first, authenticated offer and answer, so nothing
is renegotiated: the tests check frames decode on the share's own track (getStats of its receiver),
that a share goes only where the therapist chose and never to a held client, that a client without
permission has no share control and that a share it forces anyway is neither shown nor passed on,
and that a client allowed to share reaches the therapist, who can stop it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from playwright.async_api import Page, expect

from tests.browser.conftest import NewContext
from tests.browser.kit import Watch, check_axe, frames_decoded, wait_screen
from tests.browser.test_seats import Trio, open_trio
from tests.conftest import RunningBroker

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="session")]

#: Frames decoded on the track the page shows as a shared screen (-1: it shows none).
SHOWN_SHARE_FRAMES = """async () => {
  const track = document.querySelector('[data-testid=share-video]')?.srcObject?.getVideoTracks()[0];
  if (!track || document.querySelector('[data-testid=share-view]').hidden) return -1;
  for (const pc of window.__peerConnections) {
    const receiver = pc.getReceivers().find((r) => r.track === track);
    if (!receiver) continue;
    let frames = 0;
    (await receiver.getStats()).forEach((s) => { if (s.type === 'inbound-rtp') frames += s.framesDecoded ?? 0; });
    return frames;
  }
  return -1;
}"""
#: Bytes received on each connection's share transceiver (the second video one), by connection index.
SHARE_BYTES = """async () => Promise.all(window.__peerConnections.map(async (pc) => {
  if (pc.connectionState === 'closed') return -1;
  const share = pc.getTransceivers().filter((t) => t.receiver.track?.kind === 'video')[1];
  if (!share) return -1;
  let bytes = 0;
  (await share.receiver.getStats()).forEach((s) => { if (s.type === 'inbound-rtp') bytes += s.bytesReceived ?? 0; });
  return bytes;
}))"""
#: This page's DTLS fingerprint (one certificate per page: the same on every connection).
FINGERPRINT = """() => /a=fingerprint:(.*)/.exec(window.__peerConnections.find((pc) => pc.localDescription).localDescription.sdp)[1].trim()"""
#: [remote fingerprint, bytes received on the share transceiver] for each live connection.
SHARE_BYTES_BY_PEER = """async () => Promise.all(window.__peerConnections
  .filter((pc) => pc.connectionState !== 'closed' && pc.remoteDescription)
  .map(async (pc) => {
    const share = pc.getTransceivers().filter((t) => t.receiver.track?.kind === 'video')[1];
    let bytes = 0;
    if (share) (await share.receiver.getStats()).forEach((s) => { if (s.type === 'inbound-rtp') bytes += s.bytesReceived ?? 0; });
    return [/a=fingerprint:(.*)/.exec(pc.remoteDescription.sdp)[1].trim(), bytes];
  }))"""
#: Whether any element of the page plays a track that came in on a share transceiver it has not
#: accepted: every <video>'s tracks against each connection's share receivers, except the one the
#: share view shows.
SHOWS_UNACCEPTED_SHARE = """() => {
  const view = document.querySelector('[data-testid=share-view]');
  const accepted = view && !view.hidden ? document.querySelector('[data-testid=share-video]').srcObject : null;
  const shareTracks = new Set();
  for (const pc of window.__peerConnections) {
    for (const kind of ['audio', 'video']) {
      const t = pc.getTransceivers().filter((x) => x.receiver.track?.kind === kind)[1];
      if (t) shareTracks.add(t.receiver.track);
    }
  }
  for (const video of document.querySelectorAll('video')) {
    const stream = video.srcObject;
    if (!stream || stream === accepted) continue;
    if (stream.getTracks().some((t) => shareTracks.has(t))) return true;
  }
  return false;
}"""
#: Whether every connection's share senders carry nothing but this page's own share (no track that
#: arrived from someone else is ever put on a sender).
SENDS_ONLY_OWN = """() => {
  const received = new Set(window.__peerConnections.flatMap((pc) => pc.getReceivers().map((r) => r.track)));
  return window.__peerConnections.every((pc) => pc.getSenders().every((s) => !s.track || !received.has(s.track)));
}"""
#: A page that keeps the data channels it makes, so the test can speak on them as a forged page would.
RECORD_CHANNELS = """
(() => {
  const made = [];
  Object.defineProperty(window, '__channels', { value: made });
  const native = RTCPeerConnection.prototype.createDataChannel;
  RTCPeerConnection.prototype.createDataChannel = function (...args) {
    const channel = native.apply(this, args);
    made.push({ pc: this, channel });
    return channel;
  };
})();
"""
#: A client page sharing without permission: a drawn canvas on every connection's share sender,
#: and "I share" said on every data channel, as an altered page would.
FORCE_SHARE = """async () => {
  const canvas = document.createElement('canvas');
  canvas.width = 320; canvas.height = 240;
  const ctx = canvas.getContext('2d');
  let n = 0;
  window.__forced = setInterval(() => { ctx.fillStyle = `hsl(${(n += 20) % 360} 80% 50%)`; ctx.fillRect(0, 0, 320, 240); }, 50);
  const track = canvas.captureStream(15).getVideoTracks()[0];
  let sent = 0;
  for (const { pc, channel } of window.__channels) {
    if (pc.connectionState !== 'connected') continue;
    const share = pc.getTransceivers().filter((t) => t.receiver.track?.kind === 'video')[1];
    await share.sender.replaceTrack(track);
    if (channel.readyState === 'open') channel.send(JSON.stringify({ t: 'share', on: true, mid: share.mid }));
    sent += 1;
  }
  return sent;
}"""


async def share_frames(page: Page) -> int:
    return int(await page.evaluate(SHOWN_SHARE_FRAMES))


async def until(check: Callable[[], Awaitable[bool]], what: str, within_s: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not await check():
        if loop.time() > deadline:
            pytest.fail(what)
        await asyncio.sleep(0.25)


async def decodes_share(page: Page) -> None:
    """The page shows a shared screen and decodes frames of it, more and more."""
    await expect(page.get_by_test_id("share-view")).to_be_visible()
    await until(lambda: _positive(page), "no frame of the share decoded")
    first = await share_frames(page)
    await until(lambda: _more(page, first), "the share's frames stopped")


async def _positive(page: Page) -> bool:
    return await share_frames(page) > 0


async def _more(page: Page, than: int) -> bool:
    return await share_frames(page) > than


async def share_bytes(page: Page) -> list[int]:
    return list(await page.evaluate(SHARE_BYTES))


async def start_trio(broker: RunningBroker, new_context: NewContext, watch: Watch, **kw: object) -> Trio:
    trio = await open_trio(broker, new_context, watch, **kw)  # type: ignore[arg-type]
    await frames_decoded(trio.therapist, 2)
    for page in trio.clients:
        await wait_screen(page, "call")
        await frames_decoded(page, 2)
    return trio


async def share_from_therapist(trio: Trio, target: str) -> None:
    page = trio.therapist
    await page.get_by_test_id("share-screen").click()
    dialog = page.get_by_test_id("share-dialog")
    await expect(dialog).to_be_visible()
    await page.get_by_test_id("share-target").select_option(target)
    await page.get_by_test_id("share-confirm").click()
    await expect(page.get_by_test_id("share-bar")).to_be_visible()


async def test_the_therapist_shares_with_everyone_or_one_client_and_never_with_a_held_one(
    broker: RunningBroker, new_context: NewContext, watch: Watch, axe_source: str
) -> None:
    trio = await start_trio(broker, new_context, watch)
    first, second = trio.client_peers
    connections = [await p.evaluate("window.__peerConnections.length") for p in trio.clients]
    await share_from_therapist(trio, "all")
    bar = trio.therapist.get_by_test_id("share-bar")
    await expect(bar).to_contain_text("You are sharing your screen")
    await check_axe(trio.therapist, axe_source, "therapist-sharing")
    for page in trio.clients:
        await decodes_share(page)
        # Large, named, and the camera stays on the therapist's tile.
        await expect(page.get_by_test_id("share-from")).to_have_text("Your therapist's screen")
        assert not await page.evaluate(SHOWS_UNACCEPTED_SHARE)
    await check_axe(trio.clients[0], axe_source, "client-sees-share")
    await frames_decoded(trio.clients[0], 2)
    # Nothing renegotiated: the very same connections carry it.
    assert [await p.evaluate("window.__peerConnections.length") for p in trio.clients] == connections

    # A held client gets nothing of the share; back, it gets it again on the same connection.
    held = trio.clients[1]
    await trio.seat_button(second, "hold").click()
    await wait_screen(held, "hold")
    await until(lambda: _share_bytes_stopped(held), "the share still reaches the held client", within_s=15)
    await decodes_share(trio.clients[0])  # the other client still sees it
    await trio.seat_button(second, "release").click()
    await wait_screen(held, "call")
    await decodes_share(held)

    # Stop, then share with the first client only: the second sees nothing.
    await trio.therapist.get_by_test_id("share-bar-stop").click()
    await expect(bar).to_be_hidden()
    for page in trio.clients:
        await expect(page.get_by_test_id("share-view")).to_be_hidden()
    await share_from_therapist(trio, first)
    await decodes_share(trio.clients[0])
    await asyncio.sleep(2)
    await expect(trio.clients[1].get_by_test_id("share-view")).to_be_hidden()
    assert await share_frames(trio.clients[1]) == -1
    before = await share_bytes(trio.clients[1])
    await asyncio.sleep(1.5)
    assert await share_bytes(trio.clients[1]) == before  # nothing arrives on any share track there
    await trio.therapist.get_by_test_id("share-bar-stop").click()
    await expect(trio.clients[0].get_by_test_id("share-view")).to_be_hidden()
    await watch.assert_clean()


async def _share_bytes_stopped(page: Page) -> bool:
    before = await share_bytes(page)
    await asyncio.sleep(1.5)
    return await share_bytes(page) == before


async def test_a_client_without_permission_cannot_share_and_a_forced_share_is_neither_shown_nor_passed_on(
    broker: RunningBroker, new_context: NewContext, watch: Watch
) -> None:
    trio = await start_trio(broker, new_context, watch, client_scripts=(RECORD_CHANNELS, ""))
    rogue, other = trio.clients
    for page in trio.clients:
        await expect(page.get_by_test_id("share-screen")).to_be_hidden()
        await expect(page.get_by_test_id("share-screen")).to_have_count(1)
    # The altered page puts a picture on its share senders and says it shares, on every pair.
    assert await rogue.evaluate(FORCE_SHARE) == 2
    # It does arrive (the therapist's share receiver from that client gets bytes)...
    await until(lambda: _any_share_bytes(trio.therapist), "the forced share never arrived")
    await until(lambda: _any_share_bytes(other), "the forced share never reached the other client")
    await asyncio.sleep(2)
    # ...and no page shows it, or puts it on a connection to anyone else.
    for page in (trio.therapist, other):
        await expect(page.get_by_test_id("share-view")).to_be_hidden()
        assert await share_frames(page) == -1
        assert not await page.evaluate(SHOWS_UNACCEPTED_SHARE)
        assert await page.evaluate(SENDS_ONLY_OWN)
    await expect(trio.therapist.get_by_test_id("stop-their-share")).to_have_count(2)
    for stop in await trio.therapist.get_by_test_id("stop-their-share").all():
        await expect(stop).to_be_hidden()
    # The other client's connection with the therapist carries no share at all (nothing forwarded).
    therapist_fp = await trio.therapist.evaluate(FINGERPRINT)
    from_therapist = [b for fp, b in await other.evaluate(SHARE_BYTES_BY_PEER) if fp == therapist_fp]
    assert from_therapist and all(b == 0 for b in from_therapist)
    await rogue.evaluate("clearInterval(window.__forced)")
    await watch.assert_clean()


async def _any_share_bytes(page: Page) -> bool:
    return any(b > 0 for b in await share_bytes(page))


async def test_a_client_allowed_to_share_shares_with_the_therapist_who_stops_it(
    broker: RunningBroker, new_context: NewContext, watch: Watch, axe_source: str
) -> None:
    trio = await start_trio(broker, new_context, watch)
    sharer, other = trio.clients
    sharer_peer = trio.client_peers[0]
    allow = Trio.tile(trio.therapist, sharer_peer).get_by_test_id("allow-share")
    await allow.click()
    await expect(allow).to_have_attribute("aria-pressed", "true")
    button = sharer.get_by_test_id("share-screen")
    await expect(button).to_be_visible()
    await expect(other.get_by_test_id("share-screen")).to_be_hidden()  # allowed per client
    await button.click()
    # First the warning: notifications show on what is shared.
    await expect(sharer.get_by_test_id("share-warning")).to_contain_text("notifications")
    await check_axe(sharer, axe_source, "client-share-warning")
    await sharer.get_by_test_id("share-confirm").click()
    await expect(sharer.get_by_test_id("share-bar")).to_be_visible()
    await check_axe(sharer, axe_source, "client-sharing")
    await decodes_share(trio.therapist)
    await expect(trio.therapist.get_by_test_id("share-from")).to_have_text("Screen shared by Client 1")
    # To the therapist only.
    await asyncio.sleep(1.5)
    await expect(other.get_by_test_id("share-view")).to_be_hidden()
    assert all(b <= 0 for b in await share_bytes(other))
    # The therapist stops it: the client's share ends there too.
    stop = Trio.tile(trio.therapist, sharer_peer).get_by_test_id("stop-their-share")
    await expect(stop).to_be_visible()
    await stop.click()
    await expect(trio.therapist.get_by_test_id("share-view")).to_be_hidden()
    await expect(sharer.get_by_test_id("share-bar")).to_be_hidden()
    await expect(button).to_have_attribute("aria-pressed", "false")
    # Taking the permission back takes the control away.
    await allow.click()
    await expect(button).to_be_hidden()
    await watch.assert_clean()
