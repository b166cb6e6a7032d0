"""P3 call set-up: two aiortc peers connecting through the broker, against the same peers exchanging SDP directly.

Direct: two RTCPeerConnections in this process, configured as the Python client (``broker.client``)
configures them (no ICE servers, recvonly audio and video, the negotiated "chat"
data channel); timed from creating them to both data channels open.

Through the broker: a therapist and a client (``broker.client.broker_client.BrokerClient``,
the product's Python client, with authenticated SDP) joined and waiting on a
broker process; timed from the therapist's ``admit`` to both data channels open.
The difference of the medians is what the broker (and the signaling round
trips through it) adds.

Signaling round trip: with 200 live sessions (a therapist and an admitted client
each, on lean sockets), every session bounces a ``candidate`` therapist -> client
-> therapist through the broker every 200 ms, each session in its own slot of a
fixed grid (a steady 1000 round trips/s: sessions that simply waited 200 ms after
each return fell into step after any stall and turned the load into bursts); the
round trip is timed at the therapist.

Goals: the broker adds <= 10 ms at p50; signaling round trip p99 < 5 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    Admin,
    BrokerProcess,
    LeanSocket,
    Pair,
    Report,
    ServerProcess,
    admitted_pair,
    candidate_frame,
    cleanup,
    free_port,
    parse_args,
    percentile,
    raise_file_limit,
    use_uvloop,
    workdir,
)

GOAL_ADDED_MS = 10.0
GOAL_RTT_MS = 5.0
SESSIONS = 200
PROBE_EVERY_S = 0.2


async def direct_setup() -> float:
    """Seconds from creating two peer connections to both data channels open, SDP passed by hand."""
    from aiortc import RTCConfiguration, RTCPeerConnection

    opened = [asyncio.Event(), asyncio.Event()]
    started = time.perf_counter()
    pcs = [RTCPeerConnection(RTCConfiguration(iceServers=[])) for _ in range(2)]
    try:
        for pc, event in zip(pcs, opened, strict=True):
            channel = pc.createDataChannel("chat", negotiated=True, id=0)
            channel.on("open", event.set)
        offerer, answerer = pcs
        offerer.addTransceiver("audio", direction="recvonly")
        offerer.addTransceiver("video", direction="recvonly")
        await offerer.setLocalDescription(await offerer.createOffer())
        await answerer.setRemoteDescription(offerer.localDescription)
        await answerer.setLocalDescription(await answerer.createAnswer())
        await offerer.setRemoteDescription(answerer.localDescription)
        await asyncio.wait_for(asyncio.gather(opened[0].wait(), opened[1].wait()), 15)
        return time.perf_counter() - started
    finally:
        for pc in pcs:
            await pc.close()


async def broker_setup(admin: Admin, base_url: str) -> float:
    """Seconds from the therapist's admit to both data channels open, through the broker."""
    from broker.client.broker_client import BrokerClient
    from broker.crypto.link_key import b64url_encode, decode_link_key, new_link_key
    from broker.crypto.seat_keys import seat_key
    from broker.signaling.protocol import SeatState, Status

    created = await admin.create(clients=1)
    secret = new_link_key()  # the therapist's link; the client's carries its own seat key (protocol 7.1)
    mine = b64url_encode(seat_key(decode_link_key(secret), created["session"], created["client_peers"][0]))
    therapist = BrokerClient(f"{base_url}/t/{created['therapist']}#{secret}", ice_servers=[])
    client = BrokerClient(f"{base_url}/j/{created['clients'][0]}#{mine}", ice_servers=[])
    try:
        await therapist.connect()
        await client.connect()
        await client.submit_checklist()
        await client.expect(Status, where=lambda m: m.seat_state is SeatState.WAITING)
        await asyncio.sleep(0.05)
        started = time.perf_counter()
        await therapist.admit(client.peer_id)
        await asyncio.gather(therapist.wait_connected(client.peer_id), client.wait_connected(therapist.peer_id))
        return time.perf_counter() - started
    finally:
        await client.close()
        await therapist.close()


async def signaling_rtt(admin: Admin, port: int, sessions: int, seconds: float) -> list[float]:
    """Round trips (s) therapist -> client -> therapist through the broker, with ``sessions`` live sessions."""
    pairs = [await admitted_pair(admin, port) for _ in range(sessions)]
    return await bounce_all(pairs, seconds)


async def bare_rtt(sessions: int, seconds: float, tmp: Path) -> list[float]:
    """The same round trips through relay.py's bare aiohttp relay: this machine's floor for the figure."""
    from relay import __file__ as relay_script

    port = free_port()
    server = ServerProcess([sys.executable, relay_script, "--serve-bare", str(port)], port, log=tmp / "bare.log")
    await server.start()
    try:
        pairs = []
        for i in range(sessions):
            a = await LeanSocket.connect(port, path=f"/ws?peer=t{i}")
            b = await LeanSocket.connect(port, path=f"/ws?peer=c{i}")
            pairs.append(Pair(f"s{i}", a, b, f"t{i}", f"c{i}"))
        return await bounce_all(pairs, seconds)
    finally:
        server.stop()


async def bounce_all(pairs: list[Pair], seconds: float) -> list[float]:
    samples: list[float] = []
    running = True
    loop = asyncio.get_running_loop()

    async def bounce(pair) -> None:
        back = candidate_frame(pair.therapist_peer)
        there = candidate_frame(pair.client_peer)
        returned = asyncio.Event()
        arrived = [0.0]

        def on_return(payload: bytes) -> None:
            arrived[0] = time.perf_counter()  # stamped on arrival, not when this task next runs
            returned.set()

        pair.client.on_frame = lambda payload: pair.client.send(back)
        pair.therapist.on_frame = on_return
        # Each session keeps its own slot on a fixed grid (not "200 ms after the last return"):
        # otherwise sessions delayed by one stall stay in step and the load turns into bursts.
        slot = loop.time() + random.random() * PROBE_EVERY_S
        while running:
            await asyncio.sleep(max(0.0, slot - loop.time()))
            slot += PROBE_EVERY_S
            returned.clear()
            sent = time.perf_counter()
            pair.therapist.send(there)
            await asyncio.wait_for(returned.wait(), 10)
            samples.append(arrived[0] - sent)

    tasks = [asyncio.ensure_future(bounce(p)) for p in pairs]
    await asyncio.sleep(1.0)  # warm-up
    samples.clear()
    await asyncio.sleep(seconds)
    measured = list(samples)
    running = False
    await asyncio.gather(*tasks, return_exceptions=True)
    for p in pairs:
        p.close()
    return measured


def _extra(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calls", type=int, help="set-ups of each kind (default 15 quick, 60 full)")
    parser.add_argument("--sessions", type=int, default=SESSIONS, help="live sessions for the round trip")


def summary(samples: list[float]) -> tuple[float, float]:
    return percentile(samples, 50) * 1e3, percentile(samples, 95) * 1e3


async def main(args: argparse.Namespace) -> None:
    calls = args.calls or (15 if args.quick else 60)
    rtt_seconds = 5.0 if args.quick else 20.0
    tmp = workdir("setup")
    broker = BrokerProcess(tmp)
    await broker.start()
    admin = Admin(broker)
    direct: list[float] = []
    through: list[float] = []
    try:
        await direct_setup()  # warm both paths once (imports, first certificates)
        await broker_setup(admin, broker.url)
        for _ in range(calls):  # interleaved, so machine noise hits both alike
            direct.append(await direct_setup())
            through.append(await broker_setup(admin, broker.url))
        rtts = await signaling_rtt(admin, broker.port, args.sessions, rtt_seconds)
        floor = await bare_rtt(args.sessions, rtt_seconds, tmp)
    finally:
        await admin.close()
        broker.stop()
        cleanup(tmp)
    d50, d95 = summary(direct)
    b50, b95 = summary(through)
    added = b50 - d50
    rtt99 = percentile(rtts, 99) * 1e3
    report = Report("setup", "P3 call set-up", args)
    report.add("calls", "set-ups of each kind (interleaved)", calls)
    report.add("direct_p50_ms", "direct SDP exchange p50", round(d50, 1), "ms")
    report.add("direct_p95_ms", "direct SDP exchange p95", round(d95, 1), "ms")
    report.add("broker_p50_ms", "through the broker p50 (admit -> both channels open)", round(b50, 1), "ms")
    report.add("broker_p95_ms", "through the broker p95", round(b95, 1), "ms")
    report.add(
        "added_p50_ms",
        "added by the broker at p50",
        round(added, 1),
        "ms",
        f"<= {GOAL_ADDED_MS:g} ms",
        added <= GOAL_ADDED_MS,
    )
    report.add("rtt_sessions", "live sessions during the round-trip probe", args.sessions)
    report.add("rtt_samples", "round trips measured", len(rtts))
    report.add("rtt_p50_ms", "signaling round trip p50", round(percentile(rtts, 50) * 1e3, 2), "ms")
    report.add(
        "rtt_p99_ms", "signaling round trip p99", round(rtt99, 2), "ms", f"< {GOAL_RTT_MS:g} ms", rtt99 < GOAL_RTT_MS
    )
    report.add(
        "bare_rtt_p50_ms",
        "same round trip via the bare relay, p50 (machine floor)",
        round(percentile(floor, 50) * 1e3, 2),
        "ms",
    )
    report.add(
        "bare_rtt_p99_ms",
        "same round trip via the bare relay, p99 (machine floor)",
        round(percentile(floor, 99) * 1e3, 2),
        "ms",
    )
    report.data["ratio"] = round(b50 / d50, 3)
    report.notes.append(
        "`ratio` in the JSON line is the broker p50 / direct p50. Round trip = two relays (therapist -> client -> "
        f"therapist); every live session bounces one each {PROBE_EVERY_S * 1e3:.0f} ms "
        f"({args.sessions / PROBE_EVERY_S:.0f} round trips/s in all, each session in its own slot of a fixed grid) "
        f"for {rtt_seconds:.0f} s after 1 s warm-up."
    )
    report.finish()


if __name__ == "__main__":
    arguments = parse_args(__doc__.splitlines()[0], _extra)
    raise_file_limit()
    use_uvloop()
    asyncio.run(main(arguments))
