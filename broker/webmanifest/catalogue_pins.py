"""The client's catalogues pinned like its modules (issue 33).

web/js/i18n.js fetches ``/static/i18n/<tag>.json`` with ``fetch(url, {integrity})``: the digests
come from ``js/catalogues.js``, which this module writes from the catalogues on disk, and which
the pages' import map pins in turn. So a catalogue whose bytes differ from the release does not
load, as a module would not. ``broker web-manifest build`` writes it before the import map.
"""

from __future__ import annotations

import json
from pathlib import Path

from broker.http.pages import STATIC_PREFIX
from broker.i18n.catalogue import CATALOGUE_DIR, DEFAULT_LANGUAGE, DIR_KEY, NAME_KEY, load_catalogues
from broker.webmanifest.integrity import sri

#: The generated module, relative to the web root.
PINS_MODULE = "js/catalogues.js"

_HEADER = (
    "// The client's catalogues and their SHA-384, written by `python -m broker web-manifest build`\n"
    "// from i18n/*.json (broker/webmanifest/catalogue_pins.py): do not edit by hand.\n"
)


def catalogue_pins_text(root: Path) -> str:
    """What ``js/catalogues.js`` must hold for the catalogues of ``root``."""
    folder = root / CATALOGUE_DIR
    catalogues = load_catalogues(folder) if folder.is_dir() else {}
    entries = {
        tag: {
            "dir": messages.get(DIR_KEY, "ltr"),
            "integrity": sri((folder / f"{tag}.json").read_bytes()),
            "name": messages.get(NAME_KEY, tag),
            "url": f"{STATIC_PREFIX}{CATALOGUE_DIR}/{tag}.json",
        }
        for tag, messages in catalogues.items()
    }
    return (
        _HEADER
        + f"export const DEFAULT_LANGUAGE = {json.dumps(DEFAULT_LANGUAGE)};\n"
        + "export const CATALOGUES = "
        + json.dumps(entries, indent=2, sort_keys=True, ensure_ascii=False)
        + ";\n"
    )


def catalogue_pins_stale(root: Path) -> bool:
    """Whether ``js/catalogues.js`` differs from the catalogues of ``root`` (a root without
    catalogues needs none)."""
    if not (root / CATALOGUE_DIR).is_dir():
        return False
    path = root / PINS_MODULE
    return not path.is_file() or path.read_text(encoding="utf-8") != catalogue_pins_text(root)


def pin_catalogues(root: Path) -> bool:
    """Write ``js/catalogues.js`` for the catalogues of ``root``; whether it changed."""
    if not catalogue_pins_stale(root):
        return False
    (root / PINS_MODULE).write_bytes(catalogue_pins_text(root).encode("utf-8"))
    return True
