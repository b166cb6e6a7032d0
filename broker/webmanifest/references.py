"""What a page or a module makes a browser load: scripts, stylesheets, icons and images, the
modules an import map pins, and each module's own imports, as URLs resolved against the file."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from urllib.parse import urljoin

#: ``import ... from "x"``, ``import "x"``, ``export ... from "x"`` and ``import("x")`` with a literal.
_IMPORT = re.compile(
    r"""(?:^|[;\s])(?:import|export)\b[^"'`;]*?\bfrom\s*["']([^"']+)["']"""
    r"""|(?:^|[;\s])import\s*["']([^"']+)["']"""
    r"""|\bimport\s*\(\s*["']([^"']+)["']\s*\)""",
    re.M,
)
_COMMENT = re.compile(r"/\*.*?\*/|^\s*//[^\n]*", re.S | re.M)


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.urls: list[tuple[str, str]] = []
        self.unpinned: list[str] = []
        self.inline_scripts: list[tuple[str, str]] = []
        self._script_type: str | None = None
        self._script_text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = {k: v or "" for k, v in attrs}
        if tag == "script":
            if named.get("src"):
                self.urls.append(("script", named["src"]))
                if not named.get("integrity"):
                    self.unpinned.append(named["src"])
            else:
                self._script_type = named.get("type", "")
                self._script_text = []
        elif tag == "link" and named.get("href"):
            rel = named.get("rel", "").lower().split()
            if "stylesheet" in rel:
                self.urls.append(("style", named["href"]))
            elif "modulepreload" in rel or "preload" in rel:
                self.urls.append(("script", named["href"]))
            elif "icon" in rel:
                self.urls.append(("image", named["href"]))
        elif tag in ("img", "source", "video", "audio") and named.get("src"):
            self.urls.append(("image", named["src"]))

    def handle_data(self, data: str) -> None:
        if self._script_type is not None:
            self._script_text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "script" and self._script_type is not None:
            self.inline_scripts.append((self._script_type, "".join(self._script_text)))
            self._script_type = None


class PageRefs:
    """Everything one HTML page loads, resolved against its URL."""

    def __init__(self, url: str, html: str) -> None:
        parser = _Page()
        parser.feed(html)
        parser.close()
        self.loads: list[tuple[str, str]] = [(kind, urljoin(url, ref)) for kind, ref in parser.urls]
        #: ``<script src>`` without an ``integrity`` attribute (Integrity-Policy refuses to run them).
        self.unpinned = [urljoin(url, ref) for ref in parser.unpinned]
        #: The text of each inline script, by type (the CSP allows the import map only, by its hash).
        self.inline_scripts = parser.inline_scripts
        self.import_map_integrity: dict[str, str] = {}
        for kind, text in parser.inline_scripts:
            if kind == "importmap":
                try:
                    integrity = json.loads(text).get("integrity", {})
                except (ValueError, AttributeError):
                    continue
                if isinstance(integrity, dict):
                    self.import_map_integrity.update({urljoin(url, k): str(v) for k, v in integrity.items()})


def module_imports(url: str, source: str) -> list[str]:
    """The modules a module imports (static imports, and dynamic ones with a literal specifier)."""
    text = _COMMENT.sub(" ", source)
    found = []
    for match in _IMPORT.finditer(text):
        specifier = next(group for group in match.groups() if group)
        found.append(urljoin(url, specifier))
    return found
