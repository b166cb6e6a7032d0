"""A call over an emulated bad network, in Chromium (issue 31, items 1, 2 and 4).

The client's browser runs inside a network namespace of its own (tests/netem/): a separate Debian
Chromium started through ``ip netns exec`` (Playwright launches it through a two-line wrapper, so it
keeps its pipe to Playwright while every packet it sends or receives crosses the shaped veth). The
broker and the therapist's browser stay on the host; the broker also listens on the host end of the
veth, which is the only address the client can reach. Media goes straight between the client's
address in the namespace and the therapist's host candidate on the veth, so the shaped link carries
the call both ways: the client's up is the therapist's down and the reverse.

The page is loaded over the unshaped link (a bad network slows the page load, which is not the thing
measured here), then the link turns "bad" (300 kbit/s each way, 5% random loss each way) for 30 s.

What is checked:
- both sides' descriptions ask for Opus with in-band FEC and DTX, and the call connected with the
  link key, so the signed SDP carried them (the MAC covers the SDP, adapt.js changes it first);
- audio flows both ways for the 30 s, with concealed samples under 10% of those received (the
  figure is printed, see the report in docs/deploy.md);
- video steps down (a lower maxBitrate / resolution on the client's video sender) or pauses with
  the notice "Video paused to keep your voice clear" shown on both sides;
- the connection indicator says "weak" with its tip during the bad spell;
- then at 64 kbit/s ("audio only") video pauses by itself with the notice on both sides, the call
  stays connected, and once the link is good again video resumes by itself (the notice goes away
  and frames decode again).
"""

from __future__ import annotations

import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page, Playwright, expect

from tests.browser.kit import (
    CHROMIUM_ARGS,
    DESKTOP,
    RECORD_PEER_CONNECTIONS,
    frames_decoded,
    pass_checklist,
    wait_screen,
)
from tests.conftest import RunningBroker, schedule
from tests.netem.call import start_broker_on
from tests.netem.conftest import netem  # noqa: F401  (the fixture: fails when the machine cannot emulate)
from tests.netem.link import AUDIO_ONLY, BAD, GOOD, Link, peer_link

pytestmark = [
    pytest.mark.browser,
    pytest.mark.asyncio(loop_scope="session"),
    pytest.mark.usefixtures("netem"),
    pytest.mark.alone,
]

#: How long the call runs on the bad link (issue 31: "audio flows both ways for 30 s").
BAD_SECONDS = 30
#: Concealed samples allowed, as a share of the samples received over the bad spell.
MAX_CONCEALED = 0.10
#: adapt.js pauses after 2-3 s below what video needs; generous for two browsers on two busy cores.
PAUSE_WAIT_MS = 20_000
#: adapt.js tries video again 20 s after a pause (40 s after a second one): the wait plus a margin.
RESUME_WAIT_MS = 60_000

#: The figures of the call's connection, through the standard getStats() API and sender parameters.
CALL_FIGURES = """async () => {
  const pcs = window.__peerConnections.filter((pc) => pc.connectionState !== 'closed'
    && pc.getTransceivers().some((t) => t.receiver.track && t.receiver.track.kind === 'video'));
  const pc = pcs[pcs.length - 1];
  if (!pc) return null;
  const out = { state: pc.connectionState, local: pc.localDescription.sdp, remote: pc.remoteDescription.sdp,
                audio: null, video: null, available: null };
  (await pc.getStats()).forEach((s) => {
    if (s.type === 'inbound-rtp' && s.kind === 'audio') out.audio = {
      received: s.packetsReceived, lost: s.packetsLost, samples: s.totalSamplesReceived,
      concealed: s.concealedSamples, silentConcealed: s.silentConcealedSamples };
    if (s.type === 'candidate-pair' && s.nominated && s.state === 'succeeded') out.available = s.availableOutgoingBitrate ?? null;
  });
  const sender = pc.getSenders().find((s) => s.track && s.track.kind === 'video');
  const enc = sender ? sender.getParameters().encodings[0] : null;
  out.video = enc ? { active: enc.active, maxBitrate: enc.maxBitrate ?? null, scale: enc.scaleResolutionDownBy ?? 1 } : null;
  return out;
}"""


@dataclass
class Network:
    link: Link
    broker: RunningBroker
    client_browser: Browser
    #: The broker's address as the client in the namespace reaches it.
    client_base: str


@pytest_asyncio.fixture(loop_scope="session")
async def network(playwright: Playwright, tmp_path: Path) -> AsyncIterator[Network]:
    """One shaped link, a broker both sides reach, and a Chromium inside the client's namespace."""
    with peer_link() as link:
        running = await start_broker_on(tmp_path / "broker", link)
        base = f"http://{link.host_ip}:{running.config.port}"
        wrapper = tmp_path / "chromium-in-namespace"
        wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {link.namespace} /usr/bin/chromium "$@"\n')
        wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
        # The broker's veth address is plain http: tell this Chromium to treat it as secure, as
        # http://127.0.0.1 is (getUserMedia and WebCrypto need a secure context).
        args = [*CHROMIUM_ARGS, f"--unsafely-treat-insecure-origin-as-secure={base}"]
        browser = await playwright.chromium.launch(executable_path=str(wrapper), headless=True, args=args)
        try:
            yield Network(link, running, browser, base)
        finally:
            await browser.close()
            await running.stop()


async def figures(page: Page) -> dict[str, Any]:
    found = await page.evaluate(CALL_FIGURES)
    assert found is not None, "the page has no call connection"
    return dict(found)


async def video_paused(page: Page) -> bool:
    video = (await figures(page))["video"]
    return bool(video) and video["active"] is False


def audio_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    a, b = before["audio"], after["audio"]
    samples = b["samples"] - a["samples"]
    concealed = b["concealed"] - a["concealed"]
    return {
        "packets": b["received"] - a["received"],
        "lost": b["lost"] - a["lost"],
        "samples": samples,
        "concealed_share": concealed / samples if samples else 1.0,
        "audible_concealed_share": (concealed - (b["silentConcealed"] - a["silentConcealed"])) / samples
        if samples
        else 1.0,
    }


async def test_a_call_on_a_bad_network_keeps_audio_first(network: Network, chromium: Browser) -> None:
    links = await schedule(network.broker, clients=1)
    client_context = await network.client_browser.new_context(viewport=DESKTOP)
    therapist_context = await chromium.new_context(viewport=DESKTOP)
    try:
        for context in (client_context, therapist_context):
            await context.add_init_script(RECORD_PEER_CONNECTIONS)
        client = await client_context.new_page()
        therapist = await therapist_context.new_page()
        await client.goto(links.client.replace(network.broker.url, network.client_base))
        await pass_checklist(client)
        await therapist.goto(links.therapist)
        await wait_screen(therapist, "dashboard")
        await therapist.get_by_test_id("admit").click()
        await wait_screen(client, "call")
        await frames_decoded(client, 1)
        await frames_decoded(therapist, 1)

        # Opus FEC and DTX asked for by both sides, in the descriptions that were signed and accepted.
        for page in (client, therapist):
            sdp = await figures(page)
            for side in ("local", "remote"):
                assert "useinbandfec=1" in sdp[side] and "usedtx=1" in sdp[side], f"{side} SDP lacks Opus FEC/DTX"
        await expect(client.get_by_test_id("connection-indicator")).to_have_attribute("data-quality", "good")

        network.link.apply(BAD)
        start = {"client": await figures(client), "therapist": await figures(therapist)}
        seen_quality: set[str] = set()
        seen_video: list[dict[str, Any] | None] = []
        notice_both = False
        for _ in range(BAD_SECONDS):
            await client.wait_for_timeout(1000)
            seen_quality.add(str(await client.get_by_test_id("connection-indicator").get_attribute("data-quality")))
            seen_video.append((await figures(client))["video"])
            here = await client.get_by_test_id("video-paused-notice").is_visible()
            there = await therapist.get_by_test_id("video-paused-notice").is_visible()
            if here and there:
                notice_both = True
                await expect(client.get_by_test_id("video-paused-notice")).to_contain_text(
                    "Video paused to keep your voice clear"
                )
                await expect(therapist.get_by_test_id("video-paused-notice")).to_contain_text(
                    "Video paused to keep your voice clear"
                )
        end = {"client": await figures(client), "therapist": await figures(therapist)}

        report = {who: audio_delta(start[who], end[who]) for who in start}
        print(
            f"\nbad network, {BAD_SECONDS} s: audio received {report}; client video {seen_video[-1]}; quality {seen_quality}"
        )
        for who, got in report.items():
            assert got["packets"] > 100, f"audio to the {who} stopped on the bad link: {got}"
            assert got["concealed_share"] < MAX_CONCEALED, (
                f"the {who} heard {got['concealed_share']:.1%} concealed audio"
            )
        stepped = [v for v in seen_video if v and (not v["active"] or (v["maxBitrate"] or 10**9) < 1_200_000)]
        assert stepped, f"the client's video never stepped down nor paused: {seen_video}"
        paused = [v for v in seen_video if v and not v["active"]]
        assert not paused or notice_both, "video paused without the notice on both sides"
        assert "weak" in seen_quality, f"the indicator never said weak on a 300 kbit/s, 5% loss link: {seen_quality}"
        assert end["client"]["state"] == "connected" and end["therapist"]["state"] == "connected"

        # 64 kbit/s: not even the lowest video step fits beside the voice, so video pauses, and says so.
        network.link.apply(AUDIO_ONLY)
        for page in (client, therapist):
            notice = page.get_by_test_id("video-paused-notice")
            await expect(notice).to_be_visible(timeout=PAUSE_WAIT_MS)
            await expect(notice).to_contain_text("Video paused to keep your voice clear")
        # Paused, though the pause's timed retry (adapt.js: at the lowest step, every 20 s and up) may be
        # under way at the moment of a single look: it fails on this link and pauses again.
        for _ in range(60):
            if await video_paused(client):
                break
            await client.wait_for_timeout(250)
        assert await video_paused(client), "the client's video is not paused at 64 kbit/s"
        await expect(client.get_by_test_id("connection-indicator")).to_have_attribute("data-quality", "weak")
        await expect(client.get_by_test_id("connection-tip")).to_be_visible()

        # The link recovers: video comes back by itself (the next try at the lowest step holds).
        network.link.apply(GOOD)
        decoded = int(str(await therapist.get_by_test_id("tile").get_attribute("data-frames-decoded")))
        for page in (client, therapist):
            await expect(page.get_by_test_id("video-paused-notice")).to_be_hidden(timeout=RESUME_WAIT_MS)
        assert (await figures(client))["video"]["active"] is True
        await therapist.wait_for_function(
            "(n) => Number(document.querySelector('[data-testid=tile]').dataset.framesDecoded) > n + 10", arg=decoded
        )
        await expect(client.get_by_test_id("connection-indicator")).to_have_attribute("data-quality", "good")
    finally:
        await client_context.close()
        await therapist_context.close()
