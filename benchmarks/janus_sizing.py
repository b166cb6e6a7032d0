"""Janus sizing: Janus's CPU and memory while a VideoRoom room forwards N people's 360p video to each other.

Issue 22 sends groups above the mesh size through Janus; ``docs/deploy.md`` sizes Janus from this.
For each step N (2, 4, 6, 8; quick: 2, 4) a room is made as the broker makes it
(``broker.janus.rooms.JanusRooms``: ``require_e2ee``, private, a PIN and an access list) and N
participants are granted their credentials. Each publishes one VP8 video track (640x360, 30 frames
a second, ``--kbps`` 600 kbit/s), marked ``e2ee`` as the room requires, and receives every other
one on a single subscriber handle and peer connection (a multistream subscription), as
``web/js/janus_room.js`` does: N streams in, N x (N - 1) forwarded, 2 x N peer connections. After a warm-up, over a steady window: Janus's CPU
(utime + stime from ``/proc/<pid>/stat``, as a share of one core), its RSS, the packets and frames
the subscribers received, and the load generator's CPU.

What Janus does per packet (SRTP decrypt, relay to each subscriber with its own SSRC, sequence
number and SRTP context, RTCP) depends on the packet rate and size only: with ``e2ee`` Janus never
looks inside a payload (no keyframe or simulcast parsing), so browsers' encrypted frames cost it what
these do. The publishers replay a clip encoded once at start (no encoder in the load generator): a
simple 640x360 picture (a bar moving over a gradient, one keyframe every 2 s), each frame padded
after its last partition to ``kbps / 8 / 30`` bytes (the decoder never reads past the partitions, so
the picture decodes the same), so Janus sees a 360p stream's rate: 30 frames and about 60 packets a
second. aiortc always decodes received video; the simple picture keeps that cheap, and each
received track is drained. The participants run in ``--workers`` processes of their own
(``_janus_load.py``), whose CPU is reported beside Janus's (on 2 shared cores they compete with it:
the delivered share says whether every stream kept its rate). Audio is left out (Opus would add
about 50 small packets a second per stream: scale by Janus's CPU per packet).

"Participants per Janus core" for a session of S people: Janus's CPU over its idle CPU is fitted
as k x forwarded streams (least squares through the origin over the steps), a session of S costs
k x S x (S - 1), so one core holds 1 / (k x (S - 1)) participants in such sessions. S above the
largest step is an extrapolation of that fit (the cost per forwarded stream is flat across the steps
when it holds: compare ``cpu_per_stream`` per step).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import HERE, ROOT, Report, cleanup, cpu_seconds, free_port, parse_args, rss_bytes, workdir

from broker.janus.client import JanusClient, JanusSettings
from broker.janus.rooms import JanusRooms
from tests.janus_server import JanusServer

WIDTH, HEIGHT, FPS = 640, 360, 30
#: The clip's length: one keyframe each loop, as browsers send one every few seconds or on request.
CLIP_FRAMES = 2 * FPS
SESSION_SIZES = (8, 16)


class SizingJanus(JanusServer):
    """The tests' Janus with an RTP port range wide enough for the steps' peer connections (2 x N a room)."""

    @property
    def rtp_range(self) -> str:
        low = 20000 + secrets.randbelow(30) * 1000
        return f"{low}-{low + 4999}"


def encode_clip(kbps: int, path: Path) -> dict[str, Any]:
    """Encode the clip once (PyAV's libvpx) and pad each frame to the bitrate; write it as JSON hex."""
    import av
    import numpy as np

    codec = av.CodecContext.create("libvpx", "w")
    codec.width, codec.height, codec.pix_fmt = WIDTH, HEIGHT, "yuv420p"
    codec.framerate, codec.time_base = Fraction(FPS, 1), Fraction(1, FPS)
    codec.bit_rate, codec.gop_size = 150_000, CLIP_FRAMES
    codec.options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0", "kf-max-dist": str(CLIP_FRAMES)}
    gradient = np.tile(np.linspace(40, 200, WIDTH, dtype=np.uint8), (HEIGHT, 1))
    encoded: list[bytes] = []
    for i in range(CLIP_FRAMES):
        image = np.full((HEIGHT * 3 // 2, WIDTH), 128, np.uint8)
        image[:HEIGHT] = gradient
        x = (i * 8) % (WIDTH - 64)
        image[100:164, x : x + 64] = 235
        frame = av.VideoFrame.from_ndarray(image, format="yuv420p")
        frame.pts, frame.time_base = i, Fraction(1, FPS)
        encoded += [bytes(p) for p in codec.encode(frame)]
    encoded += [bytes(p) for p in codec.encode(None)]
    if not encoded or encoded[0][0] & 1:  # bit 0 of a VP8 frame tag: 0 for a keyframe
        raise RuntimeError("the clip does not start with a keyframe")
    size = kbps * 1000 // 8 // FPS
    padded = [frame + bytes(max(0, size - len(frame))) for frame in encoded]
    path.write_text(json.dumps([frame.hex() for frame in padded]))
    return {"frames": len(padded), "natural_bytes": sum(map(len, encoded)) // len(encoded), "frame_bytes": size}


class Worker:
    """A load-generator process (``_janus_load.py``), driven over its stdin and stdout."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls, config: dict[str, Any]) -> Worker:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(HERE / "_janus_load.py"),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        worker = cls(process)
        worker.write(config)
        return worker

    @property
    def pid(self) -> int:
        return self.process.pid

    def write(self, message: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps(message) + "\n").encode())

    async def ask(self, cmd: str, **fields: Any) -> dict[str, Any]:
        assert self.process.stdout is not None
        self.write({"cmd": cmd, **fields})
        line = await asyncio.wait_for(self.process.stdout.readline(), 120)
        if not line:
            raise RuntimeError(f"load generator exited ({cmd})")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"load generator, {cmd}: {reply['error']}")
        return reply

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.write({"cmd": "stop"})
            try:
                await asyncio.wait_for(self.process.wait(), 30)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


async def run_step(
    n: int, janus: SizingJanus, rooms: JanusRooms, clip: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """N participants in one room: publish, subscribe to each other, warm up, measure a window."""
    session = f"bench-{n}-{secrets.token_hex(4)}"
    await rooms.create(session)
    grants = [(await rooms.grant(session, f"p{i}")).wire() for i in range(n)]
    shares = [grants[i :: args.workers] for i in range(min(args.workers, n))]
    workers = [await Worker.start({"url": janus.url, "clip": str(clip), "participants": s}) for s in shares]
    try:
        feeds = [f for w in workers for f in (await w.ask("publish"))["feeds"]]
        await asyncio.gather(*(w.ask("subscribe", feeds=feeds) for w in workers))
        await asyncio.sleep(args.warmup)
        pids = [w.pid for w in workers]
        await asyncio.gather(*(w.ask("mark") for w in workers))
        janus0, load0, t0 = cpu_seconds(janus.pid or 0), sum(map(cpu_seconds, pids)), time.perf_counter()
        await asyncio.sleep(args.seconds)
        janus1, load1, elapsed = cpu_seconds(janus.pid or 0), sum(map(cpu_seconds, pids)), time.perf_counter() - t0
        rss = rss_bytes(janus.pid or 0)
        counts: dict[str, int] = {}
        for reply in await asyncio.gather(*(w.ask("report") for w in workers)):
            for key, value in reply.items():
                counts[key] = counts.get(key, 0) + value
    finally:
        await asyncio.gather(*(w.stop() for w in workers))
        await rooms.destroy(session)
    streams = n * (n - 1)
    packet_bytes = counts["bytes_sent"] / max(counts["packets_sent"], 1)
    return {
        "participants": n,
        "streams": streams,
        "seconds": round(elapsed, 2),
        "janus_cpu": (janus1 - janus0) / elapsed,
        "janus_rss_mib": rss / 2**20,
        "loadgen_cpu": (load1 - load0) / elapsed,
        "in_kbps": counts["bytes_sent"] * 8 / elapsed / 1000,
        "out_kbps": counts["packets_received"] * packet_bytes * 8 / elapsed / 1000,
        "packets_out_per_s": counts["packets_received"] / elapsed,
        "frames_out_per_s": counts["frames_received"] / elapsed,
        "delivered": counts["frames_received"] / max(streams * counts["frames_sent"] / n, 1),
        "janus_us_per_packet": (janus1 - janus0) / max(counts["packets_received"], 1) * 1e6,
    }


def _extra(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", help="participants per step, comma-separated (default 2,4,6,8; quick 2,4)")
    parser.add_argument("--seconds", type=float, help="the measured window per step (default 20; quick 6)")
    parser.add_argument("--warmup", type=float, help="seconds after every subscription starts (default 5; quick 3)")
    parser.add_argument("--kbps", type=int, default=600, help="each publisher's video bitrate (default 600)")
    parser.add_argument("--workers", type=int, default=2, help="load-generator processes (default 2)")


async def idle_cpu(pid: int, seconds: float) -> float:
    before, t0 = cpu_seconds(pid), time.perf_counter()
    await asyncio.sleep(seconds)
    return (cpu_seconds(pid) - before) / (time.perf_counter() - t0)


async def main(args: argparse.Namespace) -> None:
    steps = [int(s) for s in (args.steps or ("2,4" if args.quick else "2,4,6,8")).split(",")]
    args.seconds = args.seconds or (6.0 if args.quick else 20.0)
    args.warmup = args.warmup or (3.0 if args.quick else 5.0)
    tmp = workdir("janus")
    janus = SizingJanus(free_port(), free_port(), tmp)
    janus.start()
    settings = JanusSettings(
        url=janus.url,
        api_secret=janus.api_secret,
        admin_url=janus.admin_url,
        admin_secret=janus.admin_secret,
        room_admin_key=janus.room_admin_key,
    )
    rooms = JanusRooms(JanusClient(settings), secrets.token_bytes(32))
    results: list[dict[str, Any]] = []
    try:
        clip = encode_clip(args.kbps, tmp / "clip.json")
        idle = await idle_cpu(janus.pid or 0, 3.0)
        idle_rss = rss_bytes(janus.pid or 0) / 2**20
        for n in steps:
            results.append(await run_step(n, janus, rooms, tmp / "clip.json", args))
            print(f"step {n}: {json.dumps({k: round(v, 3) for k, v in results[-1].items()})}", file=sys.stderr)
    finally:
        await rooms.aclose()
        janus.stop()
        cleanup(tmp)
    report = Report("janus_sizing", "Janus sizing (group sessions at 360p)", args)
    report.add("kbps", "each publisher's video (640x360, 30 fps, VP8)", args.kbps, "kbit/s")
    report.add("idle_cpu_pct", "Janus idle CPU", round(idle * 100, 2), "% core")
    report.add("idle_rss_mib", "Janus idle RSS", round(idle_rss, 1), "MiB")
    for r in results:
        n = r["participants"]
        report.add(
            f"n{n}_janus_cpu_pct",
            f"N={n}: Janus CPU ({r['streams']} forwarded streams)",
            round(r["janus_cpu"] * 100, 1),
            "% core",
        )
        per_stream = (r["janus_cpu"] - idle) / r["streams"] * 100
        report.add(f"n{n}_cpu_per_stream", f"N={n}: Janus CPU per forwarded stream", round(per_stream, 3), "% core")
        report.add(
            f"n{n}_us_per_packet",
            f"N={n}: Janus CPU per forwarded packet (ingest included)",
            round(r["janus_us_per_packet"], 1),
            "µs",
        )
        report.add(f"n{n}_rss_mib", f"N={n}: Janus RSS", round(r["janus_rss_mib"], 1), "MiB")
        report.add(
            f"n{n}_in_out_kbps", f"N={n}: into / out of Janus", f"{r['in_kbps']:,.0f} / {r['out_kbps']:,.0f} kbit/s"
        )
        report.add(f"n{n}_delivered", f"N={n}: frames delivered / sent x (N-1)", round(r["delivered"], 3))
        report.add(
            f"n{n}_loadgen_cpu_pct",
            f"N={n}: load generator CPU ({min(args.workers, n)} processes)",
            round(r["loadgen_cpu"] * 100, 1),
            "% core",
        )
    points = [(r["streams"], r["janus_cpu"] - idle) for r in results]
    k = sum(s * c for s, c in points) / sum(s * s for s, _ in points)
    report.data["cpu_per_stream_fit"] = k
    report.data["steps"] = results
    largest = max(steps)
    for size in SESSION_SIZES:
        per_core = 1 / (k * (size - 1)) if k > 0 else None
        how = "measured range" if size <= largest else f"extrapolated beyond N={largest}"
        value = round(per_core, 1) if per_core is not None else None
        report.add(f"participants_per_core_{size}", f"participants per Janus core, sessions of {size} ({how})", value)
    last = results[-1]
    per_pc = (last["janus_rss_mib"] - idle_rss) / (2 * last["participants"])
    report.add("rss_per_pc_mib", "Janus RSS per peer connection over idle (2 x N a room)", round(per_pc, 2), "MiB")
    behind = [str(r["participants"]) for r in results if r["delivered"] < 0.95]
    if behind:
        report.notes.append(
            f"At N = {', '.join(behind)} under 95 % of the frames arrived: the load generator or the machine fell "
            "behind (compare the publishers' kbit/s in with N x kbps). CPU per forwarded stream counts every stream; "
            "CPU per packet counts only the packets received, so it reads high there."
        )
    rss_per = [(r["janus_rss_mib"] - idle_rss) / r["participants"] for r in results]
    report.add(
        "rss_per_participant_mib", "Janus RSS per participant over idle (largest step)", round(rss_per[-1], 2), "MiB"
    )
    report.notes.append(
        f"Fit: Janus CPU over idle = {k * 100:.3f} % of a core per forwarded stream (least squares through the "
        f"origin over N = {', '.join(map(str, steps))}); a session of S costs that x S x (S - 1). Window "
        f"{args.seconds:g} s after {args.warmup:g} s warm-up per step. Clip: {clip['frames']} frames, natural "
        f"{clip['natural_bytes']} bytes a frame padded to {clip['frame_bytes']}. Out kbit/s = packets received x "
        "the publishers' mean packet size. Video only (no audio)."
    )
    report.finish()


if __name__ == "__main__":
    asyncio.run(main(parse_args(__doc__.splitlines()[0], _extra)))
