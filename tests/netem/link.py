"""A peer behind an emulated network link: its own network namespace, joined to the host's by a veth
pair, each direction shaped separately.

Why this shape: a browser or probe started with ``ip netns exec`` inside the namespace sees one
interface whose only way out is the veth, so everything it sends and receives crosses the shaped
link, and nothing else on the machine does. The host keeps its own end (an address in a private /30
chosen so that parallel runs never collide), so a broker or a second browser on the host reaches the
peer directly.

- **down** (host → peer): ``tc tbf`` on the host end's egress (rate and queue limit), random loss by
  an ``nft`` rule on the namespace's *input* hook.
- **up** (peer → host): ``tc tbf`` on the peer end's egress, random loss on the namespace's *output*
  hook.

Every ``nft`` rule lives inside the namespace the harness made, so the host's own firewall is never
touched. ``netem`` is not used: the kernels these tests run on lack it (no delay emulation here).

A **network change** (:meth:`Link.switch_network`, like a phone leaving Wi-Fi for mobile data): a
second veth pair with a /30 of its own joins the namespace (beforehand with :meth:`Link.add_network`,
as mobile data is up while a phone is on Wi-Fi, or at the change), the first pair's peer end loses
its address and goes down, and the namespace's default route moves to the second pair. The peer's
address is replaced; sockets bound to the old one go dead with no close. The host keeps the first
pair's host end and its address, so the broker stays reachable at :attr:`Link.host_ip` (the host
answers on any of its addresses, now through the second pair).

Everything is made under one random tag and removed by name in :meth:`Link.close` (deleting the
namespace removes the veth pairs, their qdiscs and its ruleset; the host ends are deleted by name
too); :func:`peer_link` closes on failure too.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

#: Where the /30 links are taken from (RFC 1918; a random one not already on this machine).
LINK_POOL = ipaddress.ip_network("10.231.0.0/16")
#: Every name this harness makes starts with this (namespaces, interfaces, the nft table).
PREFIX = "ttn"
NFT_TABLE = "ttnetem"
#: The longest a packet may wait in a shaped queue before tbf drops it, like a modest router buffer.
QUEUE_MS = 300


class NetemUnavailable(RuntimeError):
    """This machine cannot emulate the network: the message says what is missing."""


@dataclass(frozen=True)
class Direction:
    """One direction of a link: a rate limit (None = not shaped) and a random loss in percent."""

    rate_kbit: int | None = None
    loss_percent: int = 0


@dataclass(frozen=True)
class Profile:
    """A named network as a peer sees it: ``down`` is what it receives, ``up`` what it sends."""

    name: str
    down: Direction
    up: Direction


GOOD = Profile("good", Direction(), Direction())
MOBILE = Profile("mobile", Direction(1000, 2), Direction(300, 2))
BAD = Profile("bad", Direction(300, 5), Direction(300, 5))
AUDIO_ONLY = Profile("audio_only", Direction(64), Direction(64))
PROFILES: dict[str, Profile] = {p.name: p for p in (GOOD, MOBILE, BAD, AUDIO_ONLY)}


def _run(args: Sequence[str], what: str) -> str:
    result = subprocess.run(list(args), capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise NetemUnavailable(
            f"{what} failed: `{' '.join(args)}` said: {result.stderr.strip() or result.stdout.strip()}"
        )
    return result.stdout


def require_netem() -> None:
    """Raise :class:`NetemUnavailable` naming exactly what this machine lacks, else return.

    Tests call this and *fail* with the message (they never skip): a machine without namespaces,
    tbf or nft must not look like a machine where calls hold on bad networks.
    """
    missing = [tool for tool in ("ip", "tc", "nft") if shutil.which(tool) is None]
    if missing:
        packages = {"ip": "iproute2", "tc": "iproute2", "nft": "nftables"}
        wanted = sorted({packages[t] for t in missing})
        raise NetemUnavailable(
            f"the emulated network needs {', '.join(missing)} on PATH (Debian packages: {', '.join(wanted)}; "
            "scripts/test installs them)"
        )
    if os.geteuid() != 0:
        raise NetemUnavailable(
            "the emulated network needs root (network namespaces, veth, tc, nft); run the tests as root"
        )
    # The kernel side: make a throwaway link with one shaped direction and one loss rule.
    with peer_link(Profile("probe", Direction(1000, 1), Direction(1000, 1))):
        pass


def _free_subnet() -> ipaddress.IPv4Network:
    used = _run(["ip", "-o", "-4", "addr", "show"], "listing addresses")
    for _ in range(64):
        subnet = ipaddress.ip_network(f"10.231.{secrets.randbelow(256)}.{4 * secrets.randbelow(64)}/30")
        assert subnet.subnet_of(LINK_POOL)
        if not any(str(host) in used for host in subnet.hosts()):
            return subnet
    raise NetemUnavailable(f"no free /30 left in {LINK_POOL}")


def _tbf(rate_kbit: int) -> list[str]:
    """tbf arguments for a rate: a burst of at least one full packet, a queue of about QUEUE_MS."""
    bytes_per_ms = rate_kbit / 8
    burst = max(3000, int(bytes_per_ms * 10))
    limit = max(3000, int(bytes_per_ms * QUEUE_MS))
    return ["tbf", "rate", f"{rate_kbit}kbit", "burst", str(burst), "limit", str(limit)]


@dataclass(frozen=True)
class Leg:
    """One veth pair between the host and the namespace, with its /30."""

    host_if: str
    peer_if: str
    host_ip: str
    peer_ip: str
    prefix_len: int

    @classmethod
    def make_names(cls, tag: str, suffix: str) -> Leg:
        subnet = _free_subnet()
        host, peer = list(subnet.hosts())
        # 3 + 8 + 1 + 1 = 13 characters (interfaces allow 15)
        return cls(f"{PREFIX}{tag}{suffix}h", f"{PREFIX}{tag}{suffix}p", str(host), str(peer), subnet.prefixlen)


class Link:
    """One namespace (the peer) and its veth pair to the host; made by :func:`peer_link`.

    ``host_if``, ``host_ip`` and ``peer_if`` name the first pair for the link's whole life (the
    broker listens on ``host_ip``); ``peer_ip`` is the peer's address now, and ``leg`` the pair its
    traffic crosses now (the second one after :meth:`switch_network`).
    """

    def __init__(self) -> None:
        self._tag = secrets.token_hex(4)
        self.namespace = f"{PREFIX}-{self._tag}"
        self.legs = [Leg.make_names(self._tag, "a")]
        first = self.legs[0]
        self.host_if, self.peer_if, self.host_ip = first.host_if, first.peer_if, first.host_ip
        self.prefix_len = first.prefix_len
        self.profile = GOOD
        #: When the last :meth:`switch_network` took the old address away (``time.time()``), else None.
        self.switched_at: float | None = None
        self._current = 0  # which of legs carries the default route
        self._made = False

    @property
    def leg(self) -> Leg:
        return self.legs[self._current]

    @property
    def peer_ip(self) -> str:
        return self.leg.peer_ip

    # ---------------------------------------------------------------- life

    def open(self) -> None:
        self._made = True
        _run(["ip", "netns", "add", self.namespace], "making a network namespace")
        self._add_leg(self.leg)
        self.run_in(["ip", "link", "set", "lo", "up"], "raising the namespace's loopback")
        self.run_in(
            ["ip", "route", "add", "default", "via", self.host_ip], "routing the namespace through the host end"
        )
        self.run_in(["nft", "add", "table", "inet", NFT_TABLE], "making the nft table (nftables in the kernel)")
        for chain, hook in (("down", "input"), ("up", "output")):
            self.run_in(
                ["nft", f"add chain inet {NFT_TABLE} {chain} {{ type filter hook {hook} priority 0; policy accept; }}"],
                f"making the nft {hook} chain",
            )

    def _add_leg(self, leg: Leg) -> None:
        _run(
            ["ip", "link", "add", leg.host_if, "type", "veth", "peer", "name", leg.peer_if, "netns", self.namespace],
            "making a veth pair",
        )
        _run(["ip", "addr", "add", f"{leg.host_ip}/{leg.prefix_len}", "dev", leg.host_if], "addressing the host end")
        _run(["ip", "link", "set", leg.host_if, "up"], "raising the host end")
        self.run_in(
            ["ip", "addr", "add", f"{leg.peer_ip}/{leg.prefix_len}", "dev", leg.peer_if], "addressing the peer end"
        )
        self.run_in(["ip", "link", "set", leg.peer_if, "up"], "raising the peer end")

    def add_network(self) -> Leg:
        """Make the next veth pair, addressed and shaped as the link's profile says, without moving
        the route to it: a phone's mobile data that is up while it is still on Wi-Fi."""
        new = Leg.make_names(self._tag, chr(ord("a") + len(self.legs)))
        self.legs.append(new)
        self._add_leg(new)
        self._shape_leg(new, self.profile)
        return new

    def switch_network(self) -> Leg:
        """Move the peer to the next veth pair and its address, as when a phone leaves Wi-Fi for mobile data.

        The pair :meth:`add_network` made, else a new one made now (its address appears with the
        change); then, in one ``ip -batch`` inside the namespace, the current pair's peer end loses its
        address and goes down (what was bound to the old address can send and receive nothing more,
        and is told nothing) and the default route moves to the next pair. :attr:`switched_at` is the
        wall-clock time (``time.time()``) just before that batch: the moment of the change. Returns the
        pair the peer is on now.
        """
        old = self.leg
        new = self.legs[self._current + 1] if self._current + 1 < len(self.legs) else self.add_network()
        change = f"addr flush dev {old.peer_if}\nlink set {old.peer_if} down\nroute replace default via {new.host_ip}\n"
        self.switched_at = time.time()
        result = subprocess.run(
            ["ip", "-n", self.namespace, "-batch", "-"], input=change, capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise NetemUnavailable(f"moving the peer to the new pair failed: {result.stderr.strip()}")
        self._current += 1
        return new

    def close(self) -> None:
        """Remove everything this link made, by name; safe to call twice and after a failed open."""
        if not self._made:
            return
        self._made = False
        for leg in self.legs:
            subprocess.run(["ip", "link", "del", leg.host_if], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", self.namespace], capture_output=True, check=False)

    # ---------------------------------------------------------------- shaping

    def apply(self, profile: Profile) -> None:
        """Shape both directions as ``profile`` says (on every pair), replacing whatever was there."""
        for leg in self.legs:
            self._shape_leg(leg, profile)
        self.profile = profile

    def _shape_leg(self, leg: Leg, profile: Profile) -> None:
        self._shape("down", leg.host_if, profile.down, inside=False)
        self._shape("up", leg.peer_if, profile.up, inside=True)

    def _shape(self, chain: str, device: str, direction: Direction, inside: bool) -> None:
        prefix = ["ip", "netns", "exec", self.namespace] if inside else []
        subprocess.run([*prefix, "tc", "qdisc", "del", "dev", device, "root"], capture_output=True, check=False)
        if direction.rate_kbit is not None:
            _run(
                [*prefix, "tc", "qdisc", "add", "dev", device, "root", *_tbf(direction.rate_kbit)],
                "shaping with tc tbf",
            )
        self.run_in(["nft", "flush", "chain", "inet", NFT_TABLE, chain], "clearing the loss rule")
        if direction.loss_percent:
            self.run_in(
                [
                    "nft",
                    "add",
                    "rule",
                    "inet",
                    NFT_TABLE,
                    chain,
                    *f"numgen random mod 100 < {direction.loss_percent} drop".split(),
                ],
                "adding random loss with nft numgen",
            )

    # ---------------------------------------------------------------- inside

    def argv(self, command: Sequence[str]) -> list[str]:
        """``command`` as run inside the namespace (its traffic crosses the shaped link)."""
        return ["ip", "netns", "exec", self.namespace, *command]

    def run_in(self, command: Sequence[str], what: str) -> str:
        return _run(self.argv(command), what)

    def exists(self) -> bool:
        """Whether anything of this link is still on the machine (for the teardown test)."""
        namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
        links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=False).stdout
        return self.namespace in namespaces or any(
            f" {leg.host_if}@" in links or f" {leg.host_if}:" in links for leg in self.legs
        )


@contextlib.contextmanager
def peer_link(profile: Profile = GOOD) -> Iterator[Link]:
    """A peer namespace shaped as ``profile``, removed on the way out (also when the body fails)."""
    link = Link()
    try:
        link.open()
        link.apply(profile)
        yield link
    finally:
        link.close()
