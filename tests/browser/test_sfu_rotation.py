"""When a page of a Janus session makes a new media key (web/js/sfu_call.js; docs/protocol.md 7.12,
"Keys in the call"), driven in Chromium through a stand-in for the call: its peers, their state
changes and the `media_key` messages it would send on each pair channel.

In a busy group a peer's state changes many times a second (connections restarting, channels
opening). A removal must still rotate the key at once: the rotation waits a moment for the changes
that come with it, never for the changes to stop.
"""

from __future__ import annotations

import asyncio

import pytest
from playwright.async_api import Page

from tests.browser.conftest import NewContext
from tests.browser.kit import until
from tests.conftest import RunningBroker

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="session")]

#: In a broker page: an SfuCall over a stand-in call with three peers, and its granted slot. Janus's
#: address answers nothing (the room never joins: only the keys matter here).
STAND_IN = """async () => {
  const { SfuCall } = await import('/static/js/sfu_call.js');
  const handlers = new Map();
  const state = { peers: ['peerAAAA', 'peerBBBB', 'peerCCCC'], sent: [] };
  const on = (type, fn) => {
    if (!handlers.has(type)) handlers.set(type, new Set());
    handlers.get(type).add(fn);
    return () => handlers.get(type).delete(fn);
  };
  const call = {
    on, peerId: 'selfSELF', localStream: new MediaStream(), selfHeld: false,
    useSfu() {}, peers: () => [...state.peers], isHeld: () => false,
    describe: () => ({ connection: 'c1' }), setSfuTracks() {},
    sendMessage(peer, message) { state.sent.push({ peer, generation: message.generation }); return true; },
  };
  const signaling = { on: () => () => {} };
  const grant = { url: 'http://127.0.0.1:9/janus', room: 7, pin: 'pin', token: 'token',
    join_by: Math.floor(Date.now() / 1000) + 120, slot: 1 };
  window.__rotation = {
    state,
    emit(type, detail) { for (const fn of handlers.get(type) ?? []) fn(detail); },
    sfu: new SfuCall(call, signaling, { grant }),
  };
  return true;
}"""
#: The generations of the keys sent to one peer so far.
SENT_TO = "(peer) => window.__rotation.state.sent.filter((s) => s.peer === peer).map((s) => s.generation)"
#: A peer leaves; then every peer's state changes every 50 ms for 3 s (a busy group).
REMOVE_AMID_CHANGES = """async (gone) => {
  const r = window.__rotation;
  r.state.peers = r.state.peers.filter((p) => p !== gone);
  r.emit('left', { peer: gone });
  const until = Date.now() + 3000;
  while (Date.now() < until) {
    for (const peer of r.state.peers) r.emit('peer', { peer });
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}"""


async def stand_in(page: Page, broker: RunningBroker) -> None:
    await page.goto(f"{broker.url}/login")
    assert await page.evaluate(STAND_IN) is True


async def test_a_removal_amid_constant_peer_changes_rotates_the_key_at_once(
    broker: RunningBroker, new_context: NewContext
) -> None:
    page = await (await new_context()).new_page()
    await stand_in(page, broker)
    first = await until(lambda: page.evaluate(SENT_TO, "peerAAAA"), lambda g: g, "the first key sent")
    assert await page.evaluate(SENT_TO, "peerCCCC") == first  # everyone present holds it

    changes = asyncio.ensure_future(page.evaluate(REMOVE_AMID_CHANGES, "peerCCCC"))
    # While the changes go on (3 s), a new key reaches those who stay, and never the one who left.
    newer = await until(
        lambda: page.evaluate(SENT_TO, "peerAAAA"), lambda g: max(g) > max(first), "a new key amid the changes", 2.5
    )
    await changes
    assert max(newer) > max(first)
    assert max(await page.evaluate(SENT_TO, "peerBBBB")) == max(newer)
    assert await page.evaluate(SENT_TO, "peerCCCC") == first
