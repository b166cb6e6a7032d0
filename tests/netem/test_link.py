"""The emulated network measured from inside: a shaped direction really carries about its rate, a
lossy one really drops about its share, the other direction is left alone, everything made is gone
afterwards (also after a failure), a network change really replaces the peer's address while the
host stays reachable, and a machine without the tools is told what it lacks.

Bounds are generous and functional (the shaping works at all, in the right direction), not speed
figures: the exact delivered rates are the benchmark's business.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.netem.link import BAD, MOBILE, Direction, Link, NetemUnavailable, Profile, peer_link, require_netem
from tests.netem.probe import Received

# alone: making and removing network namespaces and veth pairs is a network change to every Chromium
# on the machine, which then fails its requests in flight (net::ERR_NETWORK_CHANGED): beside the
# browser tests of the parallel part that left pages on "Opening your session…" (found by
# tests/browser/kit.py's page journal).
pytestmark = [pytest.mark.usefixtures("netem"), pytest.mark.alone]

ROOT = Path(__file__).resolve().parents[2]
PORT = 40_931


def measure(link: Link, direction: str, rate_kbit: float, count: int, size: int = 1000) -> Received:
    """Send ``count`` datagrams at ``rate_kbit`` across the link, ``down`` (host → peer) or ``up``."""
    probe = [sys.executable, "-m", "tests.netem.probe"]
    receiver_ip = link.peer_ip if direction == "down" else link.host_ip
    receive = [*probe, "receive", "--bind", receiver_ip, "--port", str(PORT), "--seconds", "30"]
    send = [*probe, "send", "--to", receiver_ip, "--port", str(PORT), "--rate-kbit", str(rate_kbit),
            "--size", str(size), "--count", str(count)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    receiver = subprocess.Popen(
        link.argv(receive) if direction == "down" else receive, stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert receiver.stdout is not None
        assert receiver.stdout.readline().strip() == "ready"
        subprocess.run(send if direction == "down" else link.argv(send), check=True, env=env, timeout=60)
        out, _ = receiver.communicate(timeout=40)
    finally:
        receiver.kill()
        receiver.wait()
    return Received(**json.loads(out))


def test_a_shaped_link_carries_about_its_rate_in_each_direction() -> None:
    """mobile: 1 Mbit/s down, 300 kbit/s up. Offered three times that, each side gets about its rate."""
    with peer_link(MOBILE) as link:
        up = measure(link, "up", rate_kbit=900, count=330)  # about 3 s of sending
        down = measure(link, "down", rate_kbit=3000, count=1100)
    assert 150 <= up.rate_kbit <= 420, f"up carried {up.rate_kbit:.0f} kbit/s through a 300 kbit/s limit"
    assert 500 <= down.rate_kbit <= 1350, f"down carried {down.rate_kbit:.0f} kbit/s through a 1 Mbit/s limit"
    assert up.packets < 330 * 0.6, f"{up.packets} of 330 datagrams offered at 3x the rate arrived"
    assert down.rate_kbit > 2 * up.rate_kbit


def test_random_loss_drops_about_its_share_and_only_in_its_direction() -> None:
    """5% loss down (bad's figure), none up; no rate limit, so only the nft rule drops."""
    with peer_link(Profile("lossy-down", Direction(None, BAD.down.loss_percent), Direction())) as link:
        down = measure(link, "down", rate_kbit=4000, count=3000, size=200)
        up = measure(link, "up", rate_kbit=4000, count=3000, size=200)
    lost_down = 1 - down.packets / 3000
    lost_up = 1 - up.packets / 3000
    assert 0.025 <= lost_down <= 0.085, f"lost {lost_down:.1%} down where the rule drops 5%"
    assert lost_up <= 0.01, f"lost {lost_up:.1%} up where nothing should drop"


def test_everything_made_is_removed_also_when_the_test_fails() -> None:
    with peer_link(BAD) as link:
        assert link.exists()
        inside = link.run_in(["ip", "-o", "-4", "addr", "show", "dev", link.peer_if], "reading the peer's address")
        assert link.peer_ip in inside
    assert not link.exists()

    kept: list[Link] = []
    with pytest.raises(RuntimeError, match="the body failed"), peer_link(BAD) as failing:
        kept.append(failing)
        raise RuntimeError("the body failed")
    assert not kept[0].exists()


def source_address_towards_host(link: Link) -> str:
    """Open a TCP connection from inside the namespace to the host's first address: the peer's source address."""
    with socket.socket() as server:
        server.bind((link.host_ip, 0))
        server.listen()
        port = server.getsockname()[1]
        connect = f"import socket; s = socket.create_connection(('{link.host_ip}', {port}), timeout=5); print(s.getsockname()[0])"
        return link.run_in([sys.executable, "-c", connect], "connecting to the host").strip()


def test_a_network_change_replaces_the_address_and_keeps_the_host_reachable() -> None:
    """add_network, then switch_network: a new pair and address, the old address gone, the host still
    at host_ip, all removed after; a second switch makes its pair at the change."""
    with peer_link(MOBILE) as link:
        first = link.leg
        assert source_address_towards_host(link) == first.peer_ip
        second = link.add_network()  # up, but the route stays on the first pair until the switch
        assert source_address_towards_host(link) == first.peer_ip and link.peer_ip == first.peer_ip
        assert link.switch_network() == second
        assert second.peer_ip != first.peer_ip and second.host_if != first.host_if
        assert link.peer_ip == second.peer_ip and link.host_ip == first.host_ip
        assert source_address_towards_host(link) == second.peer_ip
        inside = link.run_in(["ip", "-o", "-4", "addr", "show"], "reading the namespace's addresses")
        assert first.peer_ip not in inside and second.peer_ip in inside
        shaped = subprocess.run(["tc", "qdisc", "show", "dev", second.host_if], capture_output=True, text=True)
        assert "tbf" in shaped.stdout and "rate 1Mbit" in shaped.stdout, f"the new pair is not shaped: {shaped.stdout}"
        up = measure(link, "up", rate_kbit=900, count=330)
        assert 150 <= up.rate_kbit <= 420, f"the new pair's up carried {up.rate_kbit:.0f} kbit/s (300 kbit/s limit)"
        third = link.switch_network()
        assert third not in (first, second) and source_address_towards_host(link) == third.peer_ip
    assert not link.exists()
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    assert not any(leg.host_if in links for leg in (first, second, third))


def test_two_links_at_once_do_not_collide() -> None:
    with peer_link() as first, peer_link() as second:
        assert first.namespace != second.namespace and first.host_if != second.host_if
        assert first.host_ip != second.host_ip
        assert first.exists() and second.exists()


def test_a_machine_without_nft_is_told_what_it_lacks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness names the missing tool and its package instead of passing or skipping."""
    only = tmp_path / "bin"
    only.mkdir()
    for tool in ("ip", "tc"):
        found = subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True, text=True, check=True)
        (only / tool).symlink_to(found.stdout.strip())
    monkeypatch.setenv("PATH", str(only))
    with pytest.raises(NetemUnavailable, match=r"needs nft on PATH \(Debian packages: nftables"):
        require_netem()
