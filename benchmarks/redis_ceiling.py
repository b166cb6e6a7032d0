"""P4's ceiling: the bare stack across two processes on Redis, against the bare stack in one.

P4 (``redis_scale.py``) asks what the broker keeps of one process's speed when every
relayed message crosses to another process through Redis. This script asks the same
of the stack alone, as P1 does for one process:

- one process: P1's bare relay (aiohttp on uvloop, a dict of peers, no checks);
- two processes: two such relays joined by Redis sharded pub/sub. Each subscribes
  its own channel; a frame for a peer held by the other process is published there,
  pipelined on one connection, and read back with hiredis. No sealing, no resume
  buffer, no admission, no Lua: only the crossing.

Same pairs, same load as P4 (closed loop for throughput, open loop at a fixed rate for
latency; every pair split across the two processes). The ratios say how much of P4's
goals this machine and stack leave within reach; the broker's own ratios are judged in
``redis_scale.py``. Informational: no goal of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    LeanSocket,
    Report,
    ServerProcess,
    candidate_frame,
    cleanup,
    closed_loop,
    free_port,
    parse_args,
    raise_file_limit,
    use_uvloop,
    workdir,
)
from redis_scale import (
    GOAL_LATENCY,
    GOAL_THROUGHPUT,
    WINDOW,
    RedisServer,
    add_path_figures,
    measured_open_loop,
    path_figures,
    path_ratios,
)
from relay import bare_relay, serve_bare_app

HERE = Path(__file__).resolve().parent


def _resp(*parts: bytes) -> bytes:
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


def serve_bare_on_redis(port: int, redis_port: int, mine: str, theirs: str) -> None:
    """P1's bare relay, plus a Redis channel to the other process for peers it does not hold."""
    import hiredis

    their_channel = theirs.encode()
    outbox: list[bytes] = []
    links: dict[str, asyncio.StreamWriter] = {}
    tasks: list[asyncio.Task[None]] = []

    def flush() -> None:
        links["publish"].write(b"".join(outbox))
        outbox.clear()

    def publish(text: str) -> None:
        if not outbox:  # one write per pass of the event loop, as the broker's publisher
            asyncio.get_running_loop().call_soon(flush)
        outbox.append(_resp(b"SPUBLISH", their_channel, text.encode()))

    app, peers, decode = bare_relay(elsewhere=publish)

    async def discard_replies(reader: asyncio.StreamReader) -> None:
        while await reader.read(65536):
            pass

    async def listen(reader: asyncio.StreamReader) -> None:
        parser = hiredis.Reader()
        while True:
            data = await reader.read(65536)
            if not data:
                return
            parser.feed(data)
            message = parser.gets()
            while message is not False:
                if isinstance(message, list) and message[0] == b"smessage":
                    target = peers.get(decode(message[2]).to)
                    if target is not None:
                        await target.send_str(message[2].decode())
                message = parser.gets()

    async def connect(app: object) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", redis_port)
        links["publish"] = writer
        tasks.append(asyncio.get_running_loop().create_task(discard_replies(reader)))
        reader, writer = await asyncio.open_connection("127.0.0.1", redis_port)
        writer.write(_resp(b"SSUBSCRIBE", mine.encode()))
        links["subscribe"] = writer
        tasks.append(asyncio.get_running_loop().create_task(listen(reader)))

    app.on_startup.append(connect)
    serve_bare_app(app, port)


async def measure(
    label: str, servers: list[ServerProcess], pairs: int, args: argparse.Namespace, redis: RedisServer | None
) -> dict[str, float]:
    for server in servers:
        await server.start()
    sockets: list[LeanSocket] = []
    try:
        first, last = servers[0].port, servers[-1].port
        streams = []
        for i in range(pairs):
            a = await LeanSocket.connect(first, path=f"/ws?peer=a{i}")
            b = await LeanSocket.connect(last, path=f"/ws?peer=b{i}")
            sockets += [a, b]
            streams += [(a, b, candidate_frame(f"b{i}")), (b, a, candidate_frame(f"a{i}"))]
        await asyncio.sleep(0.5)  # the subscriptions are confirmed
        warm, span = (2.0, 5.0) if args.quick else (3.0, 12.0)
        loop = await closed_loop(
            streams, window=args.window, warmup_s=warm, measure_s=span, pids=[s.pid for s in servers]
        )
        latencies, latency_cpu = await measured_open_loop(
            streams,
            args.rate,
            4.0 if args.quick else 10.0,
            [s.pid for s in servers],
            None if redis is None else redis.process.pid,
        )
        return path_figures(loop, latencies, latency_cpu)
    finally:
        for s in sockets:
            s.close()
        for server in servers:
            server.stop()
        print(f"{label}: done", file=sys.stderr)


def _extra(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pairs", type=int, help="peer pairs (default 40 quick, 100 full, as P4)")
    parser.add_argument("--window", type=int, default=WINDOW, help="messages in flight per direction (throughput runs)")
    parser.add_argument("--rate", type=float, default=1000.0, help="offered messages/s for the latency runs")
    parser.add_argument("--serve", nargs=4, metavar=("PORT", "REDIS_PORT", "MINE", "THEIRS"), help=argparse.SUPPRESS)


async def main(args: argparse.Namespace) -> None:
    pairs = args.pairs or (40 if args.quick else 100)
    rounds = 1 if args.quick else 3
    tmp = workdir("redis-ceiling")
    redis = RedisServer(tmp)
    await redis.ready()
    results: dict[str, list[dict[str, float]]] = {"one": [], "two": []}
    try:
        for r in range(rounds):
            port = free_port()
            one = ServerProcess(
                [sys.executable, str(HERE / "relay.py"), "--serve-bare", str(port)], port, log=tmp / f"one{r}.log"
            )
            results["one"].append(await measure("bare, one process", [one], pairs, args, None))
            ports = [free_port(), free_port()]
            two = [
                ServerProcess(
                    [
                        sys.executable,
                        __file__,
                        "--serve",
                        str(p),
                        str(redis.port),
                        f"bare:{{{r}}}:{mine}",
                        f"bare:{{{r}}}:{theirs}",
                    ],
                    p,
                    log=tmp / f"two{r}{mine}.log",
                )
                for p, mine, theirs in ((ports[0], "a", "b"), (ports[1], "b", "a"))
            ]
            results["two"].append(await measure("bare, two processes on Redis", two, pairs, args, redis))
    finally:
        redis.stop()
        cleanup(tmp)

    tput, lat = path_ratios(results, "two", "one")
    report = Report(
        "redis_ceiling", "P4 ceiling: the bare stack across two processes on Redis", args, tools=("redis-server",)
    )
    report.add("pairs", "peer pairs (each split across the two processes)", pairs)
    for kind, label in (("one", "bare relay, one process"), ("two", "bare relays, two processes on Redis")):
        add_path_figures(report, kind, label, "CPU per message (relay processes)", results[kind], args.rate)
    report.add(
        "ratio",
        "throughput ratio bare two processes on Redis / bare one process",
        round(tput, 3),
        "",
        f"(P4: >= {GOAL_THROUGHPUT})",
    )
    report.add(
        "latency_ratio",
        "p95 latency ratio bare two processes on Redis / bare one process",
        round(lat, 3),
        "",
        f"(P4: <= {GOAL_LATENCY:g})",
    )
    report.notes.append(
        f"{rounds} round(s); medians. The same load as P4 on the bare stack: what crossing processes through Redis "
        "costs on this machine before the broker does anything. P4's goals are shown in brackets for comparison; "
        "they are judged on the broker in redis_scale.py. One 2-core machine runs the relays, redis-server and the "
        "load generator together."
    )
    report.finish()


if __name__ == "__main__":
    arguments = parse_args(__doc__.splitlines()[0], _extra)
    if arguments.serve:
        port_text, redis_port_text, mine, theirs = arguments.serve
        serve_bare_on_redis(int(port_text), int(redis_port_text), mine, theirs)
    else:
        raise_file_limit()
        use_uvloop()
        asyncio.run(main(arguments))
