"""web/js/ice_restart.js on its own, in Chromium: what counts as a stall worth an ICE restart.

Two connections in one page, the module watching the offerer's. A connection still being set up
(its offer waiting for the answer, while the answerer's ICE checks and DTLS handshake arrive and
stop) is not restarted: a restart there rolled the offer back and renumbered its m-lines, so the
answer on its way fitted nothing and the call never connected (seen on a loaded machine in
tests/browser/test_audio_only_network.py). A connection that carried media and then fell silent
is restarted, once the signaling check says the broker is reachable.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page

from tests.browser.kit import web_dir_site

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="session")]

#: Builds the pair and the watcher; window.pair.restarts lists each restart the module asked for.
PAIR = """
async ({ answer, media }) => {
  const { NetworkRecovery } = await import('/static/js/ice_restart.js');
  const a = new RTCPeerConnection();
  const b = new RTCPeerConnection();
  const restarts = [];
  const signaling = { on: () => () => {}, checkNow: async () => true };
  const recovery = new NetworkRecovery(signaling, { restart: (peer) => restarts.push(peer) });
  recovery.watch('b', a);
  b.onicecandidate = (e) => { if (e.candidate && a.remoteDescription) a.addIceCandidate(e.candidate); };
  a.onicecandidate = (e) => { if (e.candidate) b.addIceCandidate(e.candidate).catch(() => {}); };
  a.addTransceiver('audio', { direction: 'recvonly' });
  a.createDataChannel('x');
  await a.setLocalDescription(await a.createOffer());
  await b.setRemoteDescription(a.localDescription);
  if (media) {
    // The answerer sends a (fake) microphone: media the offerer's side sees flowing.
    const [mic] = (await navigator.mediaDevices.getUserMedia({ audio: true })).getAudioTracks();
    const [sending] = b.getTransceivers();
    await sending.sender.replaceTrack(mic);
    sending.direction = 'sendonly';
  }
  await b.setLocalDescription(await b.createAnswer());
  if (answer) await a.setRemoteDescription(b.localDescription);
  window.pair = { a, b, restarts, recovery };
}
"""

#: Packets of the answerer's checks and handshake that arrive in its first second or so.
BURST = 10

RECEIVED = """
async () => {
  let n = 0;
  (await window.pair.a.getStats()).forEach((s) => { if (s.type === 'transport') n += s.packetsReceived || 0; });
  return n;
}
"""


@pytest_asyncio.fixture(loop_scope="session")
async def page(chromium: Browser) -> AsyncIterator[Page]:
    """A blank secure-context page with the repo's web/ at /static/."""
    async with web_dir_site() as base:
        context = await chromium.new_context()
        try:
            blank = await context.new_page()
            await blank.goto(base + "/")
            yield blank
        finally:
            await context.close()


async def test_a_connection_still_waiting_for_its_answer_is_not_restarted(page: Page) -> None:
    await page.evaluate(PAIR, {"answer": False, "media": False})
    # The answerer's ICE checks and DTLS handshake reach the offerer, which cannot finish without
    # the answer; then they stop (here the answerer goes away, as a page does when it is closed).
    for _ in range(100):
        if await page.evaluate(RECEIVED) >= BURST:
            break
        await page.wait_for_timeout(50)
    assert await page.evaluate(RECEIVED) >= BURST, "the answerer's checks never reached the offerer"
    await page.evaluate("() => window.pair.b.close()")
    await page.wait_for_timeout(6000)  # past STALL_MS and one RETRY_MS
    assert await page.evaluate("() => window.pair.a.connectionState") != "connected"
    assert await page.evaluate("() => window.pair.restarts") == [], "a set-up still under way was restarted"


async def test_a_connection_whose_media_stops_is_restarted(page: Page) -> None:
    await page.evaluate(PAIR, {"answer": True, "media": True})
    await page.wait_for_function("() => window.pair.a.connectionState === 'connected'")
    await page.wait_for_timeout(1500)  # media flowing for more than a second
    assert await page.evaluate("() => window.pair.restarts") == []
    await page.evaluate("() => window.pair.b.close()")  # the other side falls silent at once
    await page.wait_for_function("() => window.pair.restarts.length > 0", timeout=10_000)
    assert await page.evaluate("() => window.pair.restarts[0]") == "b"
