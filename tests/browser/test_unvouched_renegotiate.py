"""A client asked for an offer by another client no roster lists yet makes none, in Chromium.

Between two clients of a group, only the therapist's roster vouches for the other's fingerprint and
brings the pair's key (docs/protocol.md 7.8). Until it comes, the pair's offerer has no key to MAC an
offer with: an offer then would reach the other client without a MAC and read there as an
interception. So a `renegotiate` from a client no roster lists yet is ignored; once the roster
arrives, the pair connects as usual. Here both clients' rosters (relayed, and over the therapist's
data channel) are held back in their pages, the
pair's answerer sends `renegotiate` (as its page does when the pair's media stops), and no offer may
leave the offerer for it until the rosters are let through.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.browser.conftest import NewContext
from tests.browser.kit import RECORD_SOCKETS, Watch, frames_decoded, pass_checklist, send_from_page, wait_screen
from tests.conftest import RunningBroker, schedule

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="session")]

#: Keeps what the page's sockets sent (type and recipient), keeps the last `peers`
#: message, and holds back rosters (relayed, or over the therapist's data channel) while
#: window.__holdRosters is true.
HOLD_ROSTERS = """
(() => {
  const Native = window.WebSocket;
  const sent = [];
  const held = [];
  window.__holdRosters = true;
  Object.defineProperty(window, '__sent', { value: sent });
  window.__releaseRosters = () => {
    window.__holdRosters = false;
    for (const [listener, event] of held.splice(0)) listener(event);
  };
  // The therapist also sends the roster over its pair's data channel: held back there too.
  const channelListen = RTCDataChannel.prototype.addEventListener;
  RTCDataChannel.prototype.addEventListener = function (type, listener, options) {
    if (type !== 'message') return channelListen.call(this, type, listener, options);
    return channelListen.call(this, type, (event) => {
      let message = null;
      try { message = JSON.parse(event.data); } catch { /* not JSON */ }
      if (message && message.t === 'roster' && window.__holdRosters) held.push([listener, event]);
      else listener(event);
    }, options);
  };
  window.WebSocket = class extends Native {
    send(data) {
      try {
        const message = JSON.parse(data);
        sent.push({ type: message.type, to: message.to ?? null });
      } catch { /* not ours to read */ }
      return super.send(data);
    }
    addEventListener(type, listener, options) {
      if (type !== 'message') return super.addEventListener(type, listener, options);
      return super.addEventListener(type, (event) => {
        let message = null;
        try { message = JSON.parse(event.data); } catch { /* not JSON */ }
        if (message && message.type === 'peers') window.__peers = message;
        if (message && message.type === 'roster' && window.__holdRosters) held.push([listener, event]);
        else listener(event);
      }, options);
    }
  };
})();
"""


async def _offers(page: Any, to: str) -> int:
    return int(await page.evaluate("(to) => window.__sent.filter((m) => m.type === 'offer' && m.to === to).length", to))


async def test_a_renegotiate_from_a_client_no_roster_lists_brings_no_offer(
    broker: RunningBroker, new_context: NewContext, watch: Watch
) -> None:
    links = await schedule(broker, clients=2)
    watch.secrets += [links.link_key, *links.seat_keys.values()]
    first, second = (links.peers[link] for link in links.clients)
    pages = {}
    for link, peer in zip(links.clients, (first, second), strict=True):
        context = await new_context()
        await context.add_init_script(RECORD_SOCKETS)
        await context.add_init_script(HOLD_ROSTERS)
        pages[peer] = await context.new_page()
        await pages[peer].goto(link)
        await pass_checklist(pages[peer])
    therapist = await (await new_context()).new_page()
    await therapist.goto(links.therapist)
    await wait_screen(therapist, "dashboard")
    for peer in (first, second):
        await therapist.locator(f'[data-testid=seat][data-peer="{peer}"] [data-testid=admit]').click()
    for peer in (first, second):
        await wait_screen(pages[peer], "call")
        await pages[peer].wait_for_function(
            "(other) => (window.__peers?.peers ?? []).some((p) => p.peer === other && p.connected)",
            arg=second if peer == first else first,
        )
    you_offer = await pages[first].evaluate(
        "(other) => window.__peers.peers.find((p) => p.peer === other).you_offer", second
    )
    offerer, answerer = (first, second) if you_offer else (second, first)

    # The answerer asks for an offer, twice, a few seconds apart (as its page does on a stall).
    for _ in range(2):
        await send_from_page(pages[answerer], {"type": "renegotiate", "to": offerer})
        await pages[offerer].wait_for_timeout(2500)
    asked = "(to) => window.__sent.filter((m) => m.type === 'renegotiate' && m.to === to).length"
    assert await pages[answerer].evaluate(asked, offerer) >= 2
    assert await _offers(pages[offerer], answerer) == 0, "an offer left for a client no roster lists"
    for peer in (first, second):
        assert await pages[peer].evaluate("() => document.body.dataset.screen") == "call"
        assert await pages[peer].evaluate("() => window.__sent.filter((m) => m.type === 'report').length") == 0

    for peer in (first, second):
        await pages[peer].evaluate("() => window.__releaseRosters()")
    for peer in (first, second):
        await frames_decoded(pages[peer], 2)
    assert await _offers(pages[offerer], answerer) >= 1
    assert await _offers(pages[answerer], offerer) == 0, "only the pair's offerer offers"
    await watch.assert_clean()
