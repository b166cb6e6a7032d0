"""A call set to audio only holds on the "audio only" network profile (64 kbit/s each way), in
Chromium (issue 31, item 3 with the emulated network of item 1).

The client's Chromium runs in its own network namespace (the ``network`` fixture of
test_weak_network.py: only the shaped veth leads out). The client chooses audio only on the device
check; the link is then shaped to 64 kbit/s both ways *before* the therapist lets the client in, so
the call is set up and held entirely on the narrow link. Checked for 30 s, in 5 s windows: audio
packets arrive on both sides in every window, both connections stay connected, no video is sent
either way (the client's video sender has no track; the therapist's encoding towards an audio-only
client is inactive), and no "Video paused" notice appears: audio only is a choice, not a slow link.
The concealed-samples share of each side is printed.
"""

from __future__ import annotations

from typing import Any

import pytest
from playwright.async_api import Browser, Page, expect

from tests.browser.kit import DESKTOP, RECORD_PEER_CONNECTIONS, start_checklist, wait_device_checks, wait_screen
from tests.browser.test_media_mode import finish_checklist
from tests.browser.test_weak_network import Network, audio_delta, figures, network  # noqa: F401  (the fixture)
from tests.conftest import schedule
from tests.netem.conftest import netem  # noqa: F401  (the fixture: fails when the machine cannot emulate)
from tests.netem.link import AUDIO_ONLY

pytestmark = [
    pytest.mark.browser,
    pytest.mark.asyncio(loop_scope="session"),
    pytest.mark.usefixtures("netem"),
    pytest.mark.alone,
]

HOLD_SECONDS = 30
WINDOW_SECONDS = 5
#: At 64 kbit/s and no loss the voice should barely need concealment; generous for two busy cores.
MAX_CONCEALED = 0.10
#: Setting up on a 64 kbit/s link (ICE, DTLS, the first media) takes longer than on loopback.
CONNECT_WAIT_MS = 60_000


async def video_sender(page: Page) -> dict[str, Any]:
    return dict(
        await page.evaluate(
            """() => {
              const pc = window.__peerConnections.filter((p) => p.connectionState !== 'closed').pop();
              const t = pc.getTransceivers().find((x) => x.receiver.track && x.receiver.track.kind === 'video');
              const enc = t.sender.getParameters().encodings[0] || {};
              return { track: t.sender.track ? t.sender.track.readyState : null, active: enc.active !== false };
            }"""
        )
    )


async def test_an_audio_only_call_holds_at_64_kbits(network: Network, chromium: Browser) -> None:  # noqa: F811
    links = await schedule(network.broker, clients=1)
    client_context = await network.client_browser.new_context(viewport=DESKTOP)
    therapist_context = await chromium.new_context(viewport=DESKTOP)
    try:
        for context in (client_context, therapist_context):
            await context.add_init_script(RECORD_PEER_CONNECTIONS)
        client = await client_context.new_page()
        therapist = await therapist_context.new_page()
        await client.goto(links.client.replace(network.broker.url, network.client_base))
        await start_checklist(client)
        await client.get_by_test_id("mode-audio_only").check()
        await wait_device_checks(client)
        await finish_checklist(client)
        await therapist.goto(links.therapist)
        await wait_screen(therapist, "dashboard")

        network.link.apply(AUDIO_ONLY)
        await therapist.get_by_test_id("admit").click()
        await wait_screen(client, "call")
        client_tile = therapist.get_by_test_id("tile")
        await expect(client_tile).to_have_attribute("data-state", "connected", timeout=CONNECT_WAIT_MS)
        await expect(client.get_by_test_id("tile")).to_have_attribute(
            "data-state", "connected", timeout=CONNECT_WAIT_MS
        )
        await expect(client_tile.locator(".camera-off")).to_have_text(
            "Client chose audio only", timeout=CONNECT_WAIT_MS
        )

        start = {"client": await figures(client), "therapist": await figures(therapist)}
        before = dict(start)
        for window in range(HOLD_SECONDS // WINDOW_SECONDS):
            await client.wait_for_timeout(WINDOW_SECONDS * 1000)
            now = {"client": await figures(client), "therapist": await figures(therapist)}
            for who in now:
                got = audio_delta(before[who], now[who])
                assert got["packets"] > 0, f"no audio reached the {who} in window {window}: {got}"
                assert now[who]["state"] == "connected", f"the {who}'s connection is {now[who]['state']}"
            before = now
            for page in (client, therapist):
                await expect(page.get_by_test_id("video-paused-notice")).to_be_hidden()
        report = {who: audio_delta(start[who], before[who]) for who in start}
        print(f"\naudio only at 64 kbit/s, {HOLD_SECONDS} s: {report}")
        for who, got in report.items():
            assert got["packets"] > 100, f"audio to the {who} stalled: {got}"
            assert got["concealed_share"] < MAX_CONCEALED, f"the {who} heard {got['concealed_share']:.1%} concealed"
        assert (await video_sender(client))["track"] is None, "the audio-only client sends video"
        assert (await video_sender(therapist))["active"] is False, "the therapist sends video to an audio-only client"
    finally:
        await client_context.close()
        await therapist_context.close()
