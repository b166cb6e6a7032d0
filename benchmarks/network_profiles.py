"""P6 network profiles: a two-browser call on each emulated network, and how long a network change interrupts it.

Per profile (tests/netem/link.py: good, mobile, bad, audio_only), a fresh emulated link: the client's
Chromium runs inside the link's namespace, the therapist's on the host, both with fake camera and
microphone, through the real join and therapist pages (checklist, admit, sealed signaling). The pages
load over the unshaped link; then the link takes the profile, the call settles for a few seconds, and
for ``--seconds`` (60 full, 15 quick) each side's inbound media is measured through getStats():

- audio packets received and lost, and the concealed samples share
  (concealedSamples / totalSamplesReceived over the window) — the client receives over the profile's
  down direction, the therapist over its up direction;
- video frames decoded per second and the resolution decoded at the end.

Then the client's network changes twice (``Link.switch_network``: the route moves to another veth pair
and the address changes, as a phone leaving Wi-Fi for mobile data): first to a network that appears
with the change, then, once the call is back, to one that was up for NOTICE_S before (mobile data
while on Wi-Fi; browsers notice a new interface only after a few seconds). Each time, the time from
the change until inbound audio flows again is measured on both sides (from each page's 100 ms
getStats() samples; tests/netem/call.py ``audio_gap``).

The broker runs in this process (tests/netem/call.py), not as its own process like the other
benchmarks': the client's namespace reaches only the host end of its veth, and what is measured here is
the call between the browsers, not the broker. Needs root, ip, tc and nft (it says what is missing and
fails otherwise), and the Debian Chromium.

Goals (issue 31): back within 5 s of a network change on every profile; under "bad", concealed samples
under 10% both ways.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, Report, parse_args

sys.path.insert(0, str(ROOT))

from tests.netem.call import (  # noqa: E402  (after the path is set)
    Call,
    audio_flowing_since,
    audio_gap,
    audio_samples,
    chromium_in,
    figures,
    open_call,
    start_broker_on,
)
from tests.netem.link import GOOD, PROFILES, NetemUnavailable, Profile, peer_link, require_netem  # noqa: E402

GOAL_RECOVER_MS = 5000.0
GOAL_CONCEALED = 0.10
#: How long the call runs on the profile before the measured window (adaptation settles).
SETTLE_S = 8
#: How long to wait for audio after the network change before calling it lost.
RECOVER_WAIT_S = 30
#: The two network changes made per profile, in this order (see the docstring).
CHANGES = ("new_network", "already_up")
#: How long a network that is already up gets to be noticed by the browsers before the change.
NOTICE_S = 6


def _extra(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=int, help="measured seconds per profile (default 15 quick, 60 full)")
    parser.add_argument(
        "--profiles", default=",".join(PROFILES), help=f"comma-separated, of {', '.join(PROFILES)} (default all)"
    )


def inbound(before: dict[str, Any], after: dict[str, Any], seconds: float) -> dict[str, Any]:
    """One side's inbound media over the window."""
    a, b = before["audio"] or {}, after["audio"] or {}
    samples = b.get("samples", 0) - a.get("samples", 0)
    received = b.get("received", 0) - a.get("received", 0)
    lost = b.get("lost", 0) - a.get("lost", 0)
    va, vb = before["video"] or {}, after["video"] or {}
    return {
        "audio_received": received,
        "audio_lost": lost,
        "audio_lost_share": lost / (received + lost) if received + lost > 0 else None,
        "concealed_share": (b.get("concealed", 0) - a.get("concealed", 0)) / samples if samples > 0 else None,
        "video_fps": (vb.get("decoded", 0) - va.get("decoded", 0)) / seconds,
        "resolution": f"{vb.get('width', 0)}x{vb.get('height', 0)}" if vb.get("width") else "none",
    }


async def recovery(call: Call, changed_at: float) -> dict[str, float | None]:
    """Each side's audio gap after the change, in ms (None: audio did not come back in RECOVER_WAIT_S);
    returns once audio flows again on both sides (or at the deadline)."""
    pages = {"client": call.client, "therapist": call.therapist}
    gaps: dict[str, float | None] = {}
    deadline = time.monotonic() + RECOVER_WAIT_S
    while time.monotonic() < deadline and len(gaps) < len(pages):
        await asyncio.sleep(0.25)
        for who, page in pages.items():
            samples = await audio_samples(page)
            gap = audio_gap(samples, changed_at)
            if who not in gaps and gap is not None and audio_flowing_since(samples, changed_at + gap + 1000, 10):
                gaps[who] = gap
    return {who: gaps.get(who) for who in pages}


async def one_profile(playwright: Any, host_browser: Any, profile: Profile, seconds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-netprof-") as scratch, peer_link(GOOD) as link:
        running = await start_broker_on(Path(scratch) / "broker", link)
        try:
            base = f"http://{link.host_ip}:{running.config.port}"
            async with chromium_in(link, playwright, Path(scratch), base) as client_browser:
                call = await open_call(running, link, client_browser, host_browser)
                try:
                    link.apply(profile)
                    await asyncio.sleep(SETTLE_S)
                    start = {"client": await figures(call.client), "therapist": await figures(call.therapist)}
                    began = time.monotonic()
                    await asyncio.sleep(seconds)
                    end = {"client": await figures(call.client), "therapist": await figures(call.therapist)}
                    elapsed = time.monotonic() - began
                    result: dict[str, Any] = {who: inbound(start[who], end[who], elapsed) for who in start}
                    for change in CHANGES:  # the new network appears with the change, then one already up
                        if change == "already_up":
                            link.add_network()
                            await asyncio.sleep(NOTICE_S)
                        link.switch_network()
                        assert link.switched_at is not None
                        result[change] = await recovery(call, link.switched_at * 1000)
                    return result
                finally:
                    await call.close()
        finally:
            await running.stop()


def _share(value: float | None) -> float | None:
    return None if value is None else round(100 * value, 2)


async def main(args: argparse.Namespace) -> None:
    from playwright.async_api import async_playwright

    from tests.browser.kit import CHROMIUM_ARGS

    if args.broker_tree:
        raise SystemExit("--broker-tree: not for this benchmark (its broker runs in this process, from this tree)")
    names = [n.strip() for n in args.profiles.split(",") if n.strip()]
    unknown = [n for n in names if n not in PROFILES]
    if unknown:
        raise SystemExit(f"--profiles: unknown {', '.join(unknown)} (known: {', '.join(PROFILES)})")
    try:
        require_netem()
    except NetemUnavailable as missing:
        raise SystemExit(f"cannot emulate the network on this machine: {missing}") from None
    seconds = args.seconds or (15 if args.quick else 60)
    results: dict[str, dict[str, Any]] = {}
    async with async_playwright() as p:
        host_browser = await p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS)
        try:
            for name in names:
                print(f"profile {name}: {seconds} s ...", file=sys.stderr, flush=True)
                results[name] = await one_profile(p, host_browser, PROFILES[name], seconds)
        finally:
            await host_browser.close()

    report = Report("network_profiles", "P6 network profiles", args, tools=("chromium",))
    report.add("seconds", "measured seconds per profile", seconds, "s")
    worst_recover = 0.0
    for name, got in results.items():
        profile = PROFILES[name]
        for who, direction in (("client", profile.down), ("therapist", profile.up)):
            side = got[who]
            shaped = f"{direction.rate_kbit} kbit/s" if direction.rate_kbit else "unshaped"
            label = f"{name}, to the {who} ({shaped}, {direction.loss_percent}% loss)"
            report.add(f"{name}.{who}.audio_received", f"{label}: audio packets received", side["audio_received"])
            report.add(f"{name}.{who}.audio_lost", f"{label}: audio packets lost", side["audio_lost"])
            concealed = side["concealed_share"]
            goal = f"< {GOAL_CONCEALED:.0%}" if name == "bad" else ""
            met = (concealed is not None and concealed < GOAL_CONCEALED) if name == "bad" else None
            report.add(f"{name}.{who}.concealed_pct", f"{label}: concealed samples", _share(concealed), "%", goal, met)
            report.add(f"{name}.{who}.video_fps", f"{label}: video frames decoded", round(side["video_fps"], 1), "/s")
            report.add(f"{name}.{who}.resolution", f"{label}: video resolution at the end", side["resolution"])
        for change, what in zip(CHANGES, ("a new network", "a network already up"), strict=True):
            for who, gap in got[change].items():
                met = gap is not None and gap <= GOAL_RECOVER_MS
                worst_recover = max(worst_recover, gap if gap is not None else float("inf"))
                report.add(
                    f"{name}.{who}.recover_{change}_ms",
                    f"{name}: change to {what}, audio back at the {who} after",
                    None if gap is None else round(gap),
                    "ms",
                    f"<= {GOAL_RECOVER_MS:g} ms",
                    met,
                )
    report.data["ratio"] = round(worst_recover / GOAL_RECOVER_MS, 3) if worst_recover != float("inf") else None
    report.notes.append(
        "`ratio` in the JSON line is the slowest recovery after a network change / the 5 s goal. "
        f"Each profile: pages loaded unshaped, then {SETTLE_S} s on the profile before the window; the client "
        "receives over the profile's down direction, the therapist over its up direction. Concealed samples "
        "include those of silence (DTX). A recovery is the time from the change until inbound audio packets "
        "arrive again (100 ms samples; audio with DTX sends at least every 400 ms)."
    )
    report.finish()


if __name__ == "__main__":
    arguments = parse_args(__doc__.splitlines()[0], _extra)
    asyncio.run(main(arguments))
