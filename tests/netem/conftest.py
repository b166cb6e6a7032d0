"""The emulated network's fixture: a test that needs it fails (never skips) when the machine lacks it."""

from __future__ import annotations

import pytest

from tests.netem.link import NetemUnavailable, require_netem


@pytest.fixture(scope="session")
def netem() -> None:
    """Checked once per run: root, ip/tc/nft, and a kernel that makes namespaces, veth, tbf and nft rules."""
    try:
        require_netem()
    except NetemUnavailable as missing:
        pytest.fail(f"cannot emulate the network on this machine: {missing}", pytrace=False)
