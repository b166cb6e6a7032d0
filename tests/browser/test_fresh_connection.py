"""A pair's offerer that starts a fresh connection is answered from a fresh connection, in Chromium.

Every connection of a page uses the page's one certificate, so a fresh connection from the offerer
shows the same DTLS fingerprint as the one it replaces. The answering page must still tell it from an
ICE restart of the old one (by the session id of the offer's origin line), or it applies the new
offer to the old connection: that one's DTLS session has no other end any more, and the pair never
carries media again. The offerer starts afresh when its restart offer cannot be made (here its
browser refuses ``createOffer({iceRestart: true})`` once), as after an answer from another
connection or a restart that got no answer.
"""

from __future__ import annotations

import pytest
from playwright.async_api import expect

from tests.browser.conftest import NewContext
from tests.browser.kit import (
    RECORD_SOCKETS,
    Watch,
    code_with,
    frames_decoded,
    pass_checklist,
    send_from_page,
    wait_screen,
)
from tests.conftest import RunningBroker, schedule

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="session")]

#: Counts the descriptions the client page applies to a connection that had another connection's
#: (another origin-line session id): each is the fault this test is about.
COUNT_MIXED_SESSIONS = """
(() => {
  const native = RTCPeerConnection.prototype.setRemoteDescription;
  const sessionOf = new WeakMap();
  window.__mixedSessions = 0;
  RTCPeerConnection.prototype.setRemoteDescription = function (description) {
    const id = ((description && description.sdp || '').match(/^o=\\S+ (\\S+) /m) || [])[1];
    if (id && sessionOf.has(this) && sessionOf.get(this) !== id) window.__mixedSessions += 1;
    if (id) sessionOf.set(this, id);
    return native.call(this, description);
  };
})();
"""

#: The therapist's browser refuses its next ICE-restart offer while window.__failRestart is true.
FAIL_ONE_RESTART = """
(() => {
  const native = RTCPeerConnection.prototype.createOffer;
  RTCPeerConnection.prototype.createOffer = function (options) {
    if (options && options.iceRestart && window.__failRestart) {
      window.__failRestart = false;
      return Promise.reject(new DOMException('refused for the test', 'OperationError'));
    }
    return native.call(this, options);
  };
})();
"""


async def test_a_fresh_connection_from_the_offerer_is_answered_from_a_fresh_connection(
    broker: RunningBroker, new_context: NewContext, watch: Watch
) -> None:
    links = await schedule(broker, clients=1)
    watch.secrets.append(links.link_key)
    client_peer, therapist_peer = links.peers[links.client], links.peers[links.therapist]
    client_context = await new_context()
    await client_context.add_init_script(RECORD_SOCKETS)
    await client_context.add_init_script(COUNT_MIXED_SESSIONS)
    client = await client_context.new_page()
    await client.goto(links.client)
    await pass_checklist(client)
    therapist_context = await new_context()
    await therapist_context.add_init_script(FAIL_ONE_RESTART)
    therapist = await therapist_context.new_page()
    await therapist.goto(links.therapist)
    await wait_screen(therapist, "dashboard")
    await therapist.get_by_test_id("admit").click()
    await frames_decoded(therapist, 1)
    await frames_decoded(client, 1)
    code = await code_with(therapist, client_peer)
    on_therapist = therapist.locator(f'[data-testid=tile][data-peer="{client_peer}"]')
    on_client = client.locator(f'[data-testid=tile][data-peer="{therapist_peer}"]')
    first = await on_therapist.get_attribute("data-connection")
    first_on_client = await on_client.get_attribute("data-connection")

    await therapist.wait_for_timeout(5500)  # past the offerer's guard against requests crossing its offer
    await therapist.evaluate("() => { window.__failRestart = true; }")
    await send_from_page(client, {"type": "renegotiate", "to": therapist_peer})
    await therapist.wait_for_function("() => window.__failRestart === false", timeout=10_000)

    await expect(on_therapist).not_to_have_attribute("data-connection", str(first), timeout=10_000)
    await expect(on_client).not_to_have_attribute("data-connection", str(first_on_client), timeout=20_000)
    await frames_decoded(therapist, 1)
    await frames_decoded(client, 1)
    assert await code_with(client, therapist_peer) == await code_with(therapist, client_peer) == code
    assert await client.evaluate("() => window.__mixedSessions") == 0, "a connection took another one's offer"
    await watch.assert_clean()
