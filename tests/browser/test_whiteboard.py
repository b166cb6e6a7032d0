"""The shared whiteboard in a couples/family call in Chromium (issue 34; docs/protocol.md 7.11).

Three browser contexts (the therapist and two clients) on the real broker. What is drawn on one
side shows on the others, pixel for pixel, and every frame each page exchanges with
the broker meanwhile is counted: nothing but heartbeats (and, on a loaded machine, a pair's sealed
ICE restart), never the board's text. Text, the eraser, undo and clear work
across pages; only a client the therapist allows may draw, and what another client sends anyway is
dropped by the therapist's page and passed on to no one; a held client receives no board message
at all and gets the whole board back when the hold ends; the therapist saves a PNG on their own
device; axe finds nothing with the board and the share bar open."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from playwright.async_api import Page, WebSocket, expect

from tests.browser.conftest import NewContext
from tests.browser.kit import Watch, check_axe, look, until, wait_screen
from tests.browser.test_screen_share import RECORD_CHANNELS, start_trio
from tests.browser.test_seats import Trio
from tests.conftest import RunningBroker, SessionLinks

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="session")]

#: The promise is a stroke on the other side within a second; a test on a shared 2-core machine holds
#: it only to a functional deadline (a board that sent only when nudged, or lost a change, misses it):
#: under the whole suite a stroke was seen to take 4 and 8.6 s, so speed is not asserted here.
SHOWN_WITHIN_S = 30.0
#: A page that counts the board messages its data channels receive (window.__boardIn), and keeps
#: its channels (window.__channels) so the test can speak on them as an altered page would.
COUNT_BOARD = (
    RECORD_CHANNELS
    + """
(() => {
  window.__boardIn = 0;
  const native = RTCPeerConnection.prototype.createDataChannel;
  RTCPeerConnection.prototype.createDataChannel = function (...args) {
    const channel = native.apply(this, args);
    channel.addEventListener('message', (e) => {
      if (typeof e.data === 'string' && JSON.parse(e.data).t === 'board') window.__boardIn += 1;
    });
    return channel;
  };
})();
"""
)
#: Pixels of the board's canvas that something was drawn on.
PAINTED = """() => {
  const canvas = document.querySelector('[data-testid=board-canvas]');
  const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  let n = 0;
  for (let i = 3; i < data.length; i += 4) if (data[i] > 0) n += 1;
  return n;
}"""


async def paints(pages: list[Page], expected: int) -> None:
    """Each page's board shows `expected` painted pixels, once its next frames are painted (a page
    just back on the call screen, or on a loaded machine, repaints a moment after its model changed)."""
    for page in pages:
        await until(lambda p=page: p.evaluate(PAINTED), lambda n: n == expected, "the board painted", 10)


#: An altered client page draws without permission: a stroke and a clear, on every channel.
FORCE_DRAW = """() => {
  let sent = 0;
  for (const { channel } of window.__channels) {
    if (channel.readyState !== 'open') continue;
    channel.send(JSON.stringify({ t: 'board', op: 'stroke', id: 'forced1', tool: 'pen', pts: [100, 100, 9000, 9000] }));
    channel.send(JSON.stringify({ t: 'board', op: 'clear' }));
    sent += 1;
  }
  return sent;
}"""


#: What the call's own upkeep sends through the broker on a loaded machine: an ICE restart of a pair
#: (its sealed offer, answer and candidates, or the request for one) and the therapist's roster; and
#: a page's socket joining again after it dropped (its hello, and the session's state sent back).
UPKEEP = {"offer", "answer", "candidate", "renegotiate", "roster"}
REJOIN = {"hello", "joined", "status", "peers", "waiting_room", "ping.ack"}


@dataclass
class BrokerFrames:
    """Every frame the pages exchange with the broker, heartbeats (ping/pong) and the pairs' upkeep apart."""

    frames: list[tuple[str, str, int]] = field(default_factory=list)
    heartbeats: int = 0
    upkeep: int = 0
    texts: list[str] = field(default_factory=list)
    counting: bool = False

    def watch(self, page: Page) -> None:
        page.on("websocket", self._socket)

    def _socket(self, ws: WebSocket) -> None:
        ws.on("framesent", lambda payload: self._frame("sent", payload))
        ws.on("framereceived", lambda payload: self._frame("received", payload))

    def _frame(self, direction: str, payload: Any) -> None:
        if not self.counting:
            return
        text = payload if isinstance(payload, str) else bytes(payload).decode("utf-8", "replace")
        try:
            kind = str(json.loads(text).get("type"))
        except (ValueError, AttributeError):
            kind = "?"
        self.texts.append(text)
        if kind in ("ping", "pong"):
            self.heartbeats += 1  # (the watch is live: the pages ping a quiet broker every 2 s)
        elif kind in UPKEEP or kind in REJOIN:
            self.upkeep += 1  # sealed end to end, or the session's own state: never the board
        else:
            self.frames.append((direction, kind, len(text)))


async def open_board_trio(broker: RunningBroker, new_context: NewContext, watch: Watch, frames: BrokerFrames) -> Trio:
    async def count_frames(_links: SessionLinks, _clients: list[Page]) -> None:
        for page in watch.pages:  # the therapist's and both clients', before any of them opens its socket
            frames.watch(page)

    trio = await start_trio(
        broker, new_context, watch, client_scripts=(COUNT_BOARD, COUNT_BOARD), before_join=count_frames
    )
    await trio.therapist.get_by_test_id("toggle-whiteboard").click()
    for page in (trio.therapist, *trio.clients):
        await expect(page.get_by_test_id("whiteboard")).to_be_visible()
    return trio


async def draw(page: Page, points: list[tuple[float, float]]) -> None:
    """A stroke through `points` (fractions of the canvas), with the mouse."""
    canvas = page.get_by_test_id("board-canvas")
    await canvas.scroll_into_view_if_needed()
    box = await canvas.bounding_box()
    assert box is not None
    at = [(box["x"] + x * box["width"], box["y"] + y * box["height"]) for x, y in points]
    await page.mouse.move(*at[0])
    await page.mouse.down()
    for x, y in at[1:]:
        await page.mouse.move(x, y, steps=4)
    await page.mouse.up()


async def strokes(page: Page) -> str:
    return str(await page.get_by_test_id("whiteboard").get_attribute("data-strokes"))


async def shows(pages: list[Page], attribute: str, value: str) -> None:
    """Every page's board comes to say `attribute` = `value` (within SHOWN_WITHIN_S)."""
    for page in pages:
        await expect(page.get_by_test_id("whiteboard")).to_have_attribute(
            attribute, value, timeout=SHOWN_WITHIN_S * 1000
        )


async def test_strokes_text_undo_and_clear_cross_to_every_page_and_nothing_passes_through_the_broker(
    broker: RunningBroker, new_context: NewContext, watch: Watch, axe_source: str
) -> None:
    frames = BrokerFrames()
    trio = await open_board_trio(broker, new_context, watch, frames)
    writer, viewer = trio.clients
    await asyncio.sleep(1)  # the call settles (candidates, rosters) before counting starts
    frames.counting = True

    # The therapist draws: both clients see the stroke, the same pixels.
    await draw(trio.therapist, [(0.1, 0.1), (0.4, 0.3), (0.6, 0.2)])
    await shows(trio.clients, "data-strokes", "1")
    await asyncio.sleep(0.3)  # the next frame painted
    painted = await trio.therapist.evaluate(PAINTED)
    assert painted > 0
    await paints(trio.clients, painted)

    # Without permission a client sees the board but cannot draw; allowed, it can.
    await expect(writer.get_by_test_id("board-view-only")).to_be_visible()
    await expect(writer.get_by_test_id("board-pen")).to_be_hidden()
    allow = Trio.tile(trio.therapist, trio.client_peers[0]).get_by_test_id("allow-draw")
    await allow.click()
    await expect(allow).to_have_attribute("aria-pressed", "true")
    await expect(writer.get_by_test_id("board-pen")).to_be_visible()
    await expect(viewer.get_by_test_id("board-pen")).to_be_hidden()
    await draw(writer, [(0.5, 0.5), (0.9, 0.9)])
    await shows([trio.therapist, viewer], "data-strokes", "2")

    # Text, placed with a click.
    await writer.get_by_test_id("board-text").click()
    await writer.get_by_test_id("board-text-field").fill("Thought record")
    box = await writer.get_by_test_id("board-canvas").bounding_box()
    assert box is not None
    await writer.mouse.click(box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.8)
    await shows([trio.therapist, viewer], "data-texts", "1")

    # The eraser is a stroke too (it takes ink away where it passes).
    await trio.therapist.get_by_test_id("board-eraser").click()
    await draw(trio.therapist, [(0.1, 0.1), (0.4, 0.3)])
    await shows(trio.clients, "data-strokes", "3")
    await asyncio.sleep(0.3)
    erased = await trio.therapist.evaluate(PAINTED)
    await paints(trio.clients, erased)

    # The board and the share bar open together: axe finds nothing on either side.
    await trio.therapist.get_by_test_id("share-screen").click()
    await trio.therapist.get_by_test_id("share-confirm").click()
    await expect(trio.therapist.get_by_test_id("share-bar")).to_be_visible()
    await expect(writer.get_by_test_id("share-view")).to_be_visible()
    await look(trio.therapist, axe_source, "therapist-board-and-share")
    await look(writer, axe_source, "client-board-and-share")
    await check_axe(viewer, axe_source, "client-board-view-only")
    await trio.therapist.get_by_test_id("share-bar-stop").click()

    # Undo takes back each one's own latest item, everywhere.
    await trio.therapist.get_by_test_id("board-undo").click()  # the eraser stroke
    await shows([*trio.clients], "data-strokes", "2")
    await writer.get_by_test_id("board-undo").click()  # the text
    await shows([trio.therapist, viewer], "data-texts", "0")
    await writer.get_by_test_id("board-undo").click()  # its stroke
    await shows([trio.therapist, viewer], "data-strokes", "1")
    await paints([viewer], painted)  # back to the therapist's first stroke alone

    # Clear empties every board.
    await trio.therapist.get_by_test_id("board-clear").click()
    await shows([trio.therapist, *trio.clients], "data-strokes", "0")
    await paints([trio.therapist, *trio.clients], 0)

    # All of that, and the share, went peer to peer: the broker saw nothing but heartbeats (and, on a
    # loaded machine, a pair's ICE restart), and never the text written on the board.
    frames.counting = False
    assert frames.frames == [], f"the broker carried {len(frames.frames)} frames: {frames.frames[:5]}"
    assert not [t for t in frames.texts if "Thought record" in t]
    assert frames.heartbeats > 0

    # The therapist keeps a picture on their own device: a PNG made in the page.
    await draw(trio.therapist, [(0.3, 0.3), (0.7, 0.6)])
    async with trio.therapist.expect_download() as info:
        await trio.therapist.get_by_test_id("board-save").click()
    download = await info.value
    path = await download.path()
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert download.suggested_filename.endswith(".png")
    await expect(writer.get_by_test_id("board-save")).to_be_hidden()  # clients have no save

    # Closing the board closes it for everyone, and nothing of it is kept.
    await trio.therapist.get_by_test_id("board-close").click()
    for page in trio.clients:
        await expect(page.get_by_test_id("whiteboard")).to_be_hidden()
        await expect(page.get_by_test_id("whiteboard")).to_have_attribute("data-strokes", "0")
    await watch.assert_clean()


async def test_a_client_not_allowed_to_draw_changes_nothing_and_a_held_client_receives_nothing(
    broker: RunningBroker, new_context: NewContext, watch: Watch
) -> None:
    frames = BrokerFrames()
    trio = await open_board_trio(broker, new_context, watch, frames)
    allowed, other = trio.clients
    allowed_peer, other_peer = trio.client_peers
    await draw(trio.therapist, [(0.2, 0.2), (0.5, 0.5)])
    for page in trio.clients:
        await expect(page.get_by_test_id("whiteboard")).to_have_attribute("data-strokes", "1")

    # An altered page without permission sends a stroke and a clear on every channel: the
    # therapist's page drops them, so no board changes and nothing is passed on.
    await asyncio.sleep(1)  # the rest of the stroke (it goes out in parts as it is drawn)
    received = await allowed.evaluate("window.__boardIn")
    assert await other.evaluate(FORCE_DRAW) == 2
    await asyncio.sleep(1.5)
    for page in (trio.therapist, *trio.clients):
        await expect(page.get_by_test_id("whiteboard")).to_have_attribute("data-strokes", "1")
    assert await allowed.evaluate("window.__boardIn") == received + 2  # the direct copy, and only that

    # Private time: the held client receives no board message at all while the others draw.
    await Trio.tile(trio.therapist, allowed_peer).get_by_test_id("allow-draw").click()
    await expect(allowed.get_by_test_id("board-pen")).to_be_visible()
    await trio.seat_button(other_peer, "hold").click()
    await wait_screen(other, "hold")
    await asyncio.sleep(0.5)
    held_received = await other.evaluate("window.__boardIn")
    await draw(trio.therapist, [(0.6, 0.1), (0.9, 0.4)])
    await draw(allowed, [(0.1, 0.9), (0.4, 0.6)])
    await allowed.get_by_test_id("board-undo").click()
    await draw(allowed, [(0.2, 0.9), (0.5, 0.6)])
    await expect(trio.therapist.get_by_test_id("whiteboard")).to_have_attribute("data-strokes", "3")
    await expect(allowed.get_by_test_id("whiteboard")).to_have_attribute("data-strokes", "3")
    await asyncio.sleep(1.5)
    assert await other.evaluate("window.__boardIn") == held_received
    assert await strokes(other) == "1"

    # Back from the hold, it gets the whole board at once.
    await trio.seat_button(other_peer, "release").click()
    await wait_screen(other, "call")
    await expect(other.get_by_test_id("whiteboard")).to_have_attribute("data-strokes", "3")
    await asyncio.sleep(0.3)
    await paints([other], await trio.therapist.evaluate(PAINTED))
    await watch.assert_clean()
