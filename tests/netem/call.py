"""A two-browser call across an emulated link, shared by the network-change test and the
network-profiles benchmark.

The client's Chromium runs inside the link's namespace (``ip netns exec`` through a two-line wrapper
that Playwright launches, so it keeps its pipe to Playwright while every packet it sends or receives
crosses the shaped veth); the broker and the therapist's Chromium stay on the host. The broker
listens on loopback (the therapist) and on the host end of the first veth (the client), in this
process: the namespace can reach nothing else, and what is measured here is the call, not the broker.

Each page samples its call connection every 100 ms through the standard ``getStats()`` API (inbound
audio packets, with the page's own clock): :func:`audio_gap` reads from those samples how long
inbound audio stopped after a moment, such as a network change.
"""

from __future__ import annotations

import dataclasses
import stat
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from playwright.async_api import Browser, BrowserContext, Page, Playwright

from broker.config import Config
from broker.http.app import build_app, create_broker
from broker.http.security_headers import PrivateAccessLogger
from tests.browser.kit import (
    CHROMIUM_ARGS,
    DESKTOP,
    RECORD_PEER_CONNECTIONS,
    frames_decoded,
    pass_checklist,
    wait_screen,
)
from tests.conftest import RunningBroker, free_port, schedule
from tests.netem.link import Link

#: Every page records its connections (kit.RECORD_PEER_CONNECTIONS) and samples the call's inbound
#: audio every 100 ms: [page clock in ms, packets received, connection state], the last 3,000 kept.
SAMPLE_AUDIO = (
    RECORD_PEER_CONNECTIONS
    + """
(() => {
  const samples = [];
  Object.defineProperty(window, '__audioSamples', { value: samples });
  Object.defineProperty(window, '__pageId', { value: Math.random().toString(36).slice(2) });
  setInterval(async () => {
    const calls = window.__peerConnections.filter((pc) => pc.connectionState !== 'closed'
      && pc.getTransceivers().some((t) => t.receiver.track && t.receiver.track.kind === 'audio'));
    const pc = calls[calls.length - 1];
    if (!pc) return;
    let packets = 0;
    (await pc.getStats()).forEach((s) => { if (s.type === 'inbound-rtp' && s.kind === 'audio') packets += s.packetsReceived || 0; });
    samples.push([Date.now(), packets, pc.connectionState]);
    if (samples.length > 3000) samples.splice(0, samples.length - 3000);
  }, 100);
})();
"""
)

#: The call's figures through getStats(): inbound audio and video, the selected pair, connections made.
CALL_FIGURES = """async () => {
  const made = window.__peerConnections;
  const calls = made.filter((pc) => pc.connectionState !== 'closed'
    && pc.getTransceivers().some((t) => t.receiver.track && t.receiver.track.kind === 'audio'));
  const pc = calls[calls.length - 1];
  if (!pc) return null;
  const out = { made: made.length, state: pc.connectionState, audio: null, video: null, local: null,
                ufrag: (/a=ice-ufrag:(\\S+)/.exec(pc.localDescription ? pc.localDescription.sdp : '') || [])[1] || null };
  const byId = new Map();
  (await pc.getStats()).forEach((s) => byId.set(s.id, s));
  for (const s of byId.values()) {
    if (s.type === 'inbound-rtp' && s.kind === 'audio') out.audio = {
      received: s.packetsReceived || 0, lost: s.packetsLost || 0, samples: s.totalSamplesReceived || 0,
      concealed: s.concealedSamples || 0, silentConcealed: s.silentConcealedSamples || 0 };
    if (s.type === 'inbound-rtp' && s.kind === 'video') out.video = {
      decoded: s.framesDecoded || 0, width: s.frameWidth || 0, height: s.frameHeight || 0 };
  }
  const transport = [...byId.values()].find((s) => s.type === 'transport' && s.selectedCandidatePairId);
  const pair = transport ? byId.get(transport.selectedCandidatePairId) : null;
  const local = pair ? byId.get(pair.localCandidateId) : null;
  out.local = local ? local.address || local.ip || null : null;
  return out;
}"""


async def start_broker_on(data_dir: Path, link: Link) -> RunningBroker:
    """A broker on loopback (for the therapist) and on the host end of the veth (for the client)."""
    port = free_port()
    origins = (f"http://127.0.0.1:{port}", f"http://{link.host_ip}:{port}")
    config = dataclasses.replace(
        Config(),
        data_dir=data_dir,
        host="127.0.0.1",
        port=port,
        allowed_origins=origins,
        max_connections_per_address=2000,
    )
    broker = await create_broker(config)
    runner = web.AppRunner(build_app(broker), access_log_class=PrivateAccessLogger)
    await runner.setup()
    for host in ("127.0.0.1", link.host_ip):
        await web.TCPSite(runner, host, port).start()
    return RunningBroker(f"http://127.0.0.1:{port}", broker, config, runner)


@asynccontextmanager
async def chromium_in(link: Link, playwright: Playwright, scratch: Path, base: str) -> AsyncIterator[Browser]:
    """A Chromium whose every packet crosses ``link`` (started through ``ip netns exec``)."""
    wrapper = scratch / f"chromium-in-{link.namespace}"
    wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {link.namespace} /usr/bin/chromium "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    # The broker's veth address is plain http: treat it as secure, as http://127.0.0.1 is.
    args = [*CHROMIUM_ARGS, f"--unsafely-treat-insecure-origin-as-secure={base}"]
    browser = await playwright.chromium.launch(executable_path=str(wrapper), headless=True, args=args)
    try:
        yield browser
    finally:
        await browser.close()


@dataclass
class Call:
    """An admitted client (in the namespace) and its therapist (on the host), both decoding video."""

    client: Page
    therapist: Page
    client_peer: str
    therapist_peer: str
    contexts: Sequence[BrowserContext]

    async def close(self) -> None:
        for context in self.contexts:
            await context.close()


async def open_call(running: RunningBroker, link: Link, client_browser: Browser, host_browser: Browser) -> Call:
    """Schedule a session; the client passes the checklist from the namespace, the therapist admits."""
    links = await schedule(running, clients=1)
    client_base = f"http://{link.host_ip}:{running.config.port}"
    client_context = await client_browser.new_context(viewport=DESKTOP)
    therapist_context = await host_browser.new_context(viewport=DESKTOP)
    call = Call(
        await client_context.new_page(),
        await therapist_context.new_page(),
        links.peers[links.client],
        links.peers[links.therapist],
        (client_context, therapist_context),
    )
    try:
        for context in call.contexts:
            await context.add_init_script(SAMPLE_AUDIO)
        await call.client.goto(links.client.replace(running.url, client_base))
        await pass_checklist(call.client)
        await call.therapist.goto(links.therapist)
        await wait_screen(call.therapist, "dashboard")
        await call.therapist.get_by_test_id("admit").click()
        await wait_screen(call.client, "call")
        await frames_decoded(call.client, 1)
        await frames_decoded(call.therapist, 1)
    except BaseException:
        await call.close()
        raise
    return call


async def figures(page: Page) -> dict[str, Any]:
    found = await page.evaluate(CALL_FIGURES)
    assert found is not None, "the page has no call connection"
    return dict(found)


async def audio_samples(page: Page) -> list[tuple[float, int, str]]:
    return [(float(t), int(n), str(s)) for t, n, s in await page.evaluate("window.__audioSamples")]


#: Inbound audio counts as stopped after this long without a packet (Opus with DTX sends at least
#: one packet every 400 ms in silence; the fake microphone's tone keeps it at 50 a second).
STOPPED_MS = 600


def audio_gap(samples: Sequence[tuple[float, int, str]], since_ms: float) -> float | None:
    """How long after ``since_ms`` (page clock) inbound audio came back, in ms, once it had stopped.

    The gap ends at the first sample after the stop whose packet count rose. 0.0 when audio never
    stopped for STOPPED_MS; None when it stopped and has not come back in the samples taken.
    """
    after = [(t, n) for t, n, _ in samples if t >= since_ms]
    if not after:
        return None
    last_rise_t, last_n = after[0]
    stopped = False
    for t, n in after[1:]:
        if n > last_n:
            if stopped:
                return t - since_ms
            last_rise_t, last_n = t, n
        elif t - last_rise_t >= STOPPED_MS:
            stopped = True
    return None if stopped else 0.0


def audio_flowing_since(samples: Sequence[tuple[float, int, str]], since_ms: float, packets: int) -> bool:
    """Whether at least ``packets`` audio packets arrived after ``since_ms``."""
    after = [n for t, n, _ in samples if t >= since_ms]
    return len(after) >= 2 and after[-1] - after[0] >= packets
