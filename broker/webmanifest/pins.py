"""Every script pinned: the pages carry the SHA-384 of each module and stylesheet they load.

The pages stay written by hand; ``broker web-manifest build`` writes the pins into them. A page's
entry module (``<script type="module" src>``) and each stylesheet get an ``integrity`` attribute.
The modules it imports get theirs from an import map (HTML's ``{"integrity": {URL: digest}}``):
one map, listing every module of ``js/``, identical in every page that loads a module, placed just
before its first module script. It is inline, as browsers read import maps only so; the CSP allows
it by its hash (``import_map_hash``), which the broker computes from the same files when it starts,
and allows no other inline script. With ``Integrity-Policy: blocked-destinations=(script)`` a
browser then runs no script without a digest, and none whose bytes differ from it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from broker.http.pages import STATIC_PREFIX
from broker.webmanifest.integrity import sri
from broker.webmanifest.layout import RELEASE_DIR
from broker.webmanifest.references import module_imports

MODULES_DIR = "js"
IMPORT_MAP_OPEN = '<script type="importmap">'
_IMPORT_MAP = re.compile(r'<script type="importmap">.*?</script>\n?', re.S)
_MODULE_SCRIPT = re.compile(r'<script type="module"[^>]*></script>')
_SCRIPT_WITH_SRC = re.compile(r"<script\b[^>]*\bsrc=\"([^\"]*)\"[^>]*></script>")
_STYLESHEET = re.compile(r"<link\b(?=[^>]*\brel=\"stylesheet\")[^>]*\bhref=\"([^\"]*)\"[^>]*>")
_INTEGRITY_ATTR = re.compile(r"\s+integrity=\"[^\"]*\"")


class PinError(ValueError):
    """A page loads a script or stylesheet the web root does not have, or from elsewhere."""


def module_files(root: Path) -> list[str]:
    """Every module of the web root (paths relative to it, sorted)."""
    folder = root / MODULES_DIR
    if not folder.is_dir():
        return []
    return sorted(p.relative_to(root).as_posix() for p in folder.rglob("*.js") if p.is_file())


def import_map_text(root: Path) -> str:
    """The text of the pages' import map: each module's URL and its digest, one a line, sorted."""
    integrity = {STATIC_PREFIX + rel: sri((root / rel).read_bytes()) for rel in module_files(root)}
    return "\n" + json.dumps({"integrity": integrity}, indent=1, sort_keys=True) + "\n"


def import_map_hash(root: Path) -> str:
    """The CSP source (without quotes) that allows exactly the pages' import map."""
    return sri(import_map_text(root).encode("utf-8"))


def html_pages(root: Path) -> list[str]:
    """The pages of the web root (its top-level ``*.html``, the notice template included)."""
    return sorted(p.name for p in root.glob("*.html") if p.is_file())


def pin_page(text: str, root: Path, name: str = "page") -> str:
    """``text`` with every script's and stylesheet's ``integrity`` and the import map written anew
    from the files of ``root``; a pinned page comes back unchanged."""

    def digest(url: str, tag: str) -> str:
        if not url.startswith(STATIC_PREFIX):
            raise PinError(f"{name} loads {url!r} ({tag}): only files of the web root under {STATIC_PREFIX}")
        relative = url[len(STATIC_PREFIX) :]
        path = root / relative
        if not path.is_file() or Path(relative).parts[:1] == (RELEASE_DIR,):
            raise PinError(f"{name} loads {url}, which is not a file of the web root {root}")
        return sri(path.read_bytes())

    def pinned(match: re.Match[str], tag: str) -> str:
        element = _INTEGRITY_ATTR.sub("", match.group(0))
        attribute = f' integrity="{digest(match.group(1), tag)}"'
        if tag == "script":
            return element.replace("></script>", attribute + "></script>", 1)
        end = len(element) - (2 if element.endswith("/>") else 1)
        return element[:end] + attribute + element[end:]

    text = _IMPORT_MAP.sub("", text)
    text = _SCRIPT_WITH_SRC.sub(lambda m: pinned(m, "script"), text)
    text = _STYLESHEET.sub(lambda m: pinned(m, "stylesheet"), text)
    first_module = _MODULE_SCRIPT.search(text)
    if first_module is not None and _imports_anything(text, root):
        block = IMPORT_MAP_OPEN + import_map_text(root) + "</script>\n"
        text = text[: first_module.start()] + block + text[first_module.start() :]
    return text


def _imports_anything(text: str, root: Path) -> bool:
    """Whether a module the page loads imports another: only then does the page need the import
    map (the neutral exit page's one module imports nothing, and its source names no other)."""
    for match in _MODULE_SCRIPT.finditer(text):
        source = _SCRIPT_WITH_SRC.match(match.group(0))
        if source is None:
            continue
        url = source.group(1)
        module = root / url[len(STATIC_PREFIX) :]
        if module_imports(url, module.read_text(encoding="utf-8")):
            return True
    return False


def stale_pages(root: Path) -> list[str]:
    """The pages whose pins differ from the files they load (by name)."""
    return [name for name in html_pages(root) if _read(root / name) != pin_page(_read(root / name), root, name)]


def pin_pages(root: Path) -> list[str]:
    """Write the pins into every page of ``root``; the names of the pages that changed."""
    changed = []
    for name in html_pages(root):
        text = _read(root / name)
        new = pin_page(text, root, name)
        if new != text:
            (root / name).write_bytes(new.encode("utf-8"))
            changed.append(name)
    return changed


def _read(path: Path) -> str:
    return path.read_bytes().decode("utf-8")
