"""Firefox ESR in a session through Janus with Chromium peers (issue 22; docs/protocol.md 7.12).

The therapist and one client in Chromium, the other client in Debian's firefox-esr (over WebDriver
BiDi, as test_firefox.py), on a broker whose sessions above two people go through the tests' Janus.
The Firefox client comes in by its link, the checklist and the waiting room as a person would; the
therapist admits both clients. Then Firefox decodes both Chromium peers' video as Janus forwards it
(its frame-crypto worker opens their frames, and its tiles count decoded frames), and both Chromium
pages decode Firefox's: every frame sealed and opened across the two browsers' transforms, through
a server that cannot read them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import pytest_asyncio
from playwright.async_api import Page, expect

from broker.janus.client import NO_SUCH_HANDLE, NO_SUCH_SESSION, ApiError
from tests.browser.conftest import NewContext
from tests.browser.firefox_bidi import Firefox, FirefoxPage
from tests.browser.kit import CSP_WATCH, DESKTOP, RECORD_PEER_CONNECTIONS, Watch, pass_checklist, until, wait_screen
from tests.browser.test_quick_exit_firefox import EMPTY_BODY_SHA384, screen, through_the_checklist
from tests.browser.test_sfu_call import CONNECTIONS, SPY_WORKERS, decrypted_video, sfu_broker  # noqa: F401
from tests.conftest import RunningBroker, schedule
from tests.janus_server import janus_server  # noqa: F401 - the fixture sfu_broker uses

# alone: three browsers' media through Janus on two cores; beside the other worker's browsers, Firefox's
# and Chromium's connections with Janus were seen to fail their ICE checks and stall (test_sfu_call.py too).
pytestmark = [pytest.mark.browser, pytest.mark.alone, pytest.mark.asyncio(loop_scope="session")]

#: A tile's decoded frame count (call.js keeps data-frames-decoded from the Janus connection's stats).
FRAMES_OF = """(peer) => Number(document.querySelector(
  `[data-testid=tile][data-peer="${peer}"]`)?.dataset.framesDecoded ?? 0)"""
AUDIO_LEVEL = "urn:ietf:params:rtp-hdrext:ssrc-audio-level"
ICE_FAILED = "WebRTC: ICE failed, add a STUN server"
HIDDEN = "(s) => { const e = document.querySelector(s); return !e || e.getClientRects().length === 0; }"
#: What the Firefox page decodes from each peer, and its connections' states (for the failure message).
FIREFOX_VIEW = f"""(peers) => ({{
  frames: peers.map({FRAMES_OF}),
  connections: window.__peerConnections.map((pc) => [pc.getTransceivers().length, pc.connectionState]),
}})"""
#: The Firefox page's worker counts (SPY_WORKERS asks the page's own frame-crypto worker).
COUNTS = "() => window.__askWorker('counts')"


@pytest_asyncio.fixture(loop_scope="session")
async def firefox_client(firefox: Firefox) -> AsyncIterator[FirefoxPage]:
    """A Firefox tab whose peer connections and frame-crypto worker the test can read."""
    page = await firefox.new_page(CSP_WATCH + RECORD_PEER_CONNECTIONS + SPY_WORKERS)
    await page.set_viewport(DESKTOP["width"], DESKTOP["height"])
    yield page
    await page.close()


async def chromium_page(new_context: NewContext) -> Page:
    context = await new_context()
    await context.add_init_script(RECORD_PEER_CONNECTIONS)
    await context.add_init_script(SPY_WORKERS)
    return await context.new_page()


async def firefox_counts(page: FirefoxPage) -> dict[str, Any]:
    return dict(await page.evaluate(COUNTS) or {})


async def janus_publishers(broker: RunningBroker) -> list[dict[str, Any]]:
    """Janus's own record (admin API handle_info) of every publisher handle: its display, the SDPs."""
    rooms = broker.hub.media.rooms
    assert rooms is not None
    found = []
    for session in (await rooms.client.admin({"janus": "list_sessions"}))["sessions"]:
        try:  # another test's session may end while this looks
            for handle in (await rooms.client.admin({"janus": "list_handles"}, f"/{session}"))["handles"]:
                info = (await rooms.client.admin({"janus": "handle_info"}, f"/{session}/{handle}"))["info"]
                if info.get("plugin_specific", {}).get("type") == "publisher":
                    found.append(info)
        except ApiError as err:
            if err.error_code not in (NO_SUCH_SESSION, NO_SUCH_HANDLE):
                raise
    return found


async def decrypted_in_firefox(page: FirefoxPage) -> int:
    return int((await firefox_counts(page)).get("decrypted", {}).get("video", 0))


async def still_decoding_in_firefox(page: FirefoxPage, peer: str) -> None:
    """`peer`'s tile in Firefox counts more decoded frames (the page's connections in the failure message)."""

    async def view() -> dict[str, Any]:
        return dict(await page.evaluate(FIREFOX_VIEW, [peer]))

    before = (await view())["frames"][0]
    await until(view, lambda now: now["frames"][0] > before, "a Chromium peer's video still decoded in Firefox", 60)


async def rises(read: Any, what: str) -> None:
    """`read()` (a count) grows: frames keep arriving and opening, not only the first few."""
    before = await read()
    await until(read, lambda now: now > before, what, 60)


async def test_firefox_joins_a_janus_session_with_chromium_peers_and_both_ways_decode(
    sfu_broker: RunningBroker,  # noqa: F811
    firefox_client: FirefoxPage,
    new_context: NewContext,
    watch: Watch,
) -> None:
    links = await schedule(sfu_broker, clients=2)
    watch.secrets.extend([links.link_key, *links.seat_keys.values()])
    therapist_peer = links.peers[links.therapist]
    chromium_link, firefox_link = links.clients
    chromium_peer, firefox_peer = links.peers[chromium_link], links.peers[firefox_link]
    therapist, chromium = await chromium_page(new_context), await chromium_page(new_context)
    firefox = firefox_client

    async def firefox_way_in() -> None:
        await firefox.goto(firefox_link)
        await through_the_checklist(firefox)

    async def chromium_way_in() -> None:
        await chromium.goto(chromium_link)
        await pass_checklist(chromium, location="Room 1", contact="Contact 1")

    async def therapist_way_in() -> None:
        await therapist.goto(links.therapist)
        await wait_screen(therapist, "dashboard")

    await asyncio.gather(therapist_way_in(), chromium_way_in(), firefox_way_in())
    for peer in (chromium_peer, firefox_peer):
        await therapist.locator(f'[data-testid=seat][data-peer="{peer}"] [data-testid=admit]').click()
    await screen(firefox, "call")
    await wait_screen(chromium, "call")

    # Firefox decodes both Chromium peers' video, as Janus forwards it, after its worker opened each frame.
    await until(
        lambda: firefox.evaluate(FIREFOX_VIEW, [therapist_peer, chromium_peer]),
        lambda view: all(view["frames"]),
        "Firefox decoding both Chromium peers' video",
        90,
    )
    await until(lambda: decrypted_in_firefox(firefox), lambda n: n > 0, "video frames opened in Firefox")
    # Its media connections (with Janus) all sealed, its pair connections (with each Chromium peer) media-free.
    connections = await firefox.evaluate(CONNECTIONS)
    assert [c for c in connections if c["transceivers"] == 0], connections
    assert [c for c in connections if c["transceivers"]] and all(c["sealed"] for c in connections), connections
    assert await firefox.evaluate(HIDDEN, "[data-testid=sfu-banner]"), "Firefox shows the SFU's failure notice"

    # Both Chromium pages decode Firefox's video (and each other's).
    for page in (therapist, chromium):
        for peer in (firefox_peer, therapist_peer if page is chromium else chromium_peer):
            tile = page.locator(f'[data-testid=tile][data-peer="{peer}"]')
            await expect(tile).to_have_attribute("data-state", "connected")
            await expect(tile).not_to_have_attribute("data-frames-decoded", "0", timeout=90_000)
        await expect(page.get_by_test_id("sfu-banner")).to_be_hidden()

    # And it goes on: frames keep arriving and opening on every side.
    for peer in (therapist_peer, chromium_peer):
        await still_decoding_in_firefox(firefox, peer)
    for page in (therapist, chromium):
        await rises(lambda p=page: p.evaluate(FRAMES_OF, firefox_peer), "Firefox's video decoded in Chromium")
        await rises(lambda p=page: decrypted_video(p), "video frames opened in Chromium")
    await rises(lambda: decrypted_in_firefox(firefox), "video frames opened in Firefox")
    # Janus never got the audio level (RFC 6464) from any browser: Firefox offers it (it has no
    # setHeaderExtensionsToNegotiate), janus_room.js takes it out of the offer and of Janus's answer.
    ours = {therapist_peer, chromium_peer, firefox_peer}
    publishers = {i["plugin_specific"]["display"]: i for i in await janus_publishers(sfu_broker)}
    publishers = {peer: info for peer, info in publishers.items() if peer in ours}  # not another test's
    assert set(publishers) == ours, set(publishers)
    for peer, info in publishers.items():
        sdps = info.get("sdps", {})
        assert sdps.get("remote") and sdps.get("local"), (peer, sorted(sdps))
        assert AUDIO_LEVEL not in sdps["remote"] + sdps["local"], f"Janus negotiated the audio level with {peer}"
    # Nothing refused on either side: one wire format, one key schedule.
    for counted in [await firefox_counts(firefox), *[dict(await p.evaluate(COUNTS)) for p in (therapist, chromium)]]:
        assert counted["bad_tag"] == 0 and counted["malformed"] == 0 and counted["unsent"] == 0, counted
        assert counted["encrypted"]["video"] > 0 and counted["encrypted"]["audio"] > 0, counted

    # Firefox logs each connection whose ICE checks failed (a starved machine makes some; the pair
    # connections restart theirs) as a page error: any other error still fails here.
    page_errors = [e for e in firefox.page_errors if not e.startswith(ICE_FAILED)]
    errors = [e for e in firefox.console_errors if EMPTY_BODY_SHA384 not in e]
    assert page_errors == [] and errors == [], (firefox.page_errors, firefox.console_errors)
    assert await firefox.csp_violations() == []
    hosts = {urlsplit(u).hostname for u in firefox.urls if u.startswith("http")}
    assert hosts == {"127.0.0.1"}, hosts
    await watch.assert_clean()
