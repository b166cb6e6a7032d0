"""What the extension's tests share: a practice's signed copy of web/, brokers serving it as it
was signed or altered, and a copy of extension/ with that practice preconfigured (its origin and
signing key in ``preconfigured.json``, as extension/README.md tells a practice to do)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from broker.webmanifest.pins import pin_pages
from broker.webmanifest.release import sign_release
from broker.webmanifest.signing import generate_key
from tests.webmanifest.web_copies import REPO, copy_web

EXTENSION = REPO / "extension"
#: A mark the altered module logs when it runs: the tests look for it in the console.
ALTERED_MARK = "altered module ran"
ALTERED_LINE = f'console.error("{ALTERED_MARK}");\n'.encode()
#: The module the join page loads that the attacker alters.
ALTERED_MODULE = "ui.js"
#: A module the join page does not load, loaded later by the test (as a page may import lazily).
LATER_MODULE = "today.js"
#: What the extension promises (extension/README.md), and the slack the tests allow on a loaded machine.
STOP_WITHIN_S = 1.0
MARGIN_S = 0.5


@dataclass
class Practice:
    """A practice's web root signed with its key: the unaltered release."""

    root: Path
    public_key: str


def signed_practice(into: Path) -> Practice:
    root = copy_web(into, "practice-web")
    public = generate_key(into / "practice.pem")
    sign_release(root, into / "practice.pem")
    return Practice(root, public)


def altered_and_repinned(practice: Practice, into: Path) -> Path:
    """The host broken into: one module changed (it logs ALTERED_MARK first) and every page's
    pins rewritten to fit it, so a browser's own integrity checks pass; the signed manifest is the
    practice's (the attacker cannot sign another)."""
    root = into / "altered-web"
    shutil.copytree(practice.root, root)
    module = root / "js" / ALTERED_MODULE
    module.write_bytes(ALTERED_LINE + module.read_bytes())
    assert pin_pages(root), "re-pinning changed no page"
    return root


def pinned_extension(into: Path, origins: list[str], key: str) -> Path:
    """A copy of extension/ with the practice preconfigured at each origin (brokers on several ports)."""
    target = into / "extension"
    shutil.copytree(EXTENSION, target)
    pins = [{"origin": origin, "keys": [key]} for origin in origins]
    (target / "preconfigured.json").write_text(json.dumps({"pins": pins}), encoding="utf-8")
    return target


def flip_in_place(path: Path) -> bytes:
    """Change one byte of a served file on the running broker's disk; the original bytes."""
    original = path.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return original
