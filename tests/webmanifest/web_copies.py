"""Copies of web/ for tests: a web root a test may change (a byte of a module, a page) without
touching the repository's, and a broker started on it."""

from __future__ import annotations

import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WEB = REPO / "web"


def copy_web(into: Path, name: str = "web") -> Path:
    target = into / name
    shutil.copytree(WEB, target)
    return target


def flip_byte(path: Path, offset: int = 100) -> None:
    """Change one byte of a file (one bit of it: the file keeps its length)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
