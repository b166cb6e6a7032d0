"""A small UDP sender and receiver that measure an emulated link (run as processes, one on each side).

    python -m tests.netem.probe receive --bind IP --port P --seconds S    (prints one JSON line)
    python -m tests.netem.probe send --to IP --port P --rate-kbit R --size N --count C

The sender paces numbered datagrams at a fixed rate; the receiver reports how many arrived, how many
bytes, and the time from the first to the last, so a test can compute the delivered rate and the
share lost. A process because a namespace is per process: ``ip netns exec`` puts either side behind
the link.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import time
from dataclasses import asdict, dataclass

HEADER = struct.Struct("!I")


@dataclass
class Received:
    packets: int
    bytes: int
    first: float
    last: float
    highest_seq: int

    @property
    def rate_kbit(self) -> float:
        span = self.last - self.first
        return self.bytes * 8 / 1000 / span if span > 0 else 0.0


def receive(bind: str, port: int, seconds: float, quiet_after: float) -> Received:
    """Count datagrams for at most ``seconds``, stopping ``quiet_after`` s after the last one."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((bind, port))
    print("ready", flush=True)
    got = Received(0, 0, 0.0, 0.0, -1)
    deadline = time.monotonic() + seconds
    while (now := time.monotonic()) < deadline:
        wait = deadline - now if got.packets == 0 else min(deadline - now, quiet_after)
        sock.settimeout(max(wait, 0.01))
        try:
            data = sock.recv(65535)
        except TimeoutError:
            if got.packets:
                break
            continue
        now = time.monotonic()
        if got.packets == 0:
            got.first = now
        got.packets += 1
        got.bytes += len(data) + 28  # IP and UDP headers: the rate limit counts them too
        got.last = now
        got.highest_seq = max(got.highest_seq, HEADER.unpack_from(data)[0])
    sock.close()
    return got


def send(to: str, port: int, rate_kbit: float, size: int, count: int) -> None:
    """``count`` datagrams of ``size`` bytes paced at ``rate_kbit`` (IP and UDP headers included)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    interval = (size + 28) * 8 / 1000 / rate_kbit
    padding = b"\0" * (size - HEADER.size)
    start = time.monotonic()
    for seq in range(count):
        pause = start + seq * interval - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        try:
            sock.sendto(HEADER.pack(seq) + padding, (to, port))
        except OSError:
            pass  # a full local queue drops the datagram, as a router would
    sock.close()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.netem.probe")
    sub = parser.add_subparsers(dest="role", required=True)
    rx = sub.add_parser("receive")
    rx.add_argument("--bind", required=True)
    rx.add_argument("--port", type=int, required=True)
    rx.add_argument("--seconds", type=float, default=20)
    rx.add_argument("--quiet-after", type=float, default=1.0)
    tx = sub.add_parser("send")
    tx.add_argument("--to", required=True)
    tx.add_argument("--port", type=int, required=True)
    tx.add_argument("--rate-kbit", type=float, required=True)
    tx.add_argument("--size", type=int, default=1000)
    tx.add_argument("--count", type=int, required=True)
    args = parser.parse_args(argv)
    if args.role == "receive":
        print(json.dumps(asdict(receive(args.bind, args.port, args.seconds, args.quiet_after))), flush=True)
    else:
        send(args.to, args.port, args.rate_kbit, args.size, args.count)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
