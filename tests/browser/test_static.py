"""The pages as files: no inline script but the pinned import map, no inline style, no
event-handler attributes, nothing loaded from another origin, no string turned into markup or
code (the CSP and Trusted Types forbid them; these tests say where)."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest

from broker.webmanifest.pins import html_pages, import_map_text
from tests.browser.kit import REPO

WEB = REPO / "web"
OUR_PAGES = html_pages(WEB)


class _Audit(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.problems: list[str] = []
        self._in_script = False
        self._script_type = ""
        self.import_maps: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        for name, _ in attrs:
            if name.startswith("on"):
                self.problems.append(f"inline handler {name} on <{tag}>")
            if name == "style":
                self.problems.append(f"style attribute on <{tag}>")
        if tag == "style":
            self.problems.append("<style> element")
        # A form the browser submits itself (its script not run yet, or lost) must never put what
        # was typed in an address (history, a proxy's log): dialogs close, the others POST (405).
        if tag == "form" and (named.get("method") or "get").lower() not in ("post", "dialog"):
            self.problems.append(f"<form id={named.get('id')}> would send its fields in the address")
        if tag == "script":
            src = named.get("src")
            if not src:
                self._in_script = True
                self._script_type = named.get("type") or ""
            elif not src.startswith("/static/"):
                self.problems.append(f"script from {src}")
        for name in ("src", "href"):
            value = named.get(name) or ""
            if re.match(r"^(https?:)?//", value):
                self.problems.append(f"{name}={value} on <{tag}> loads from another origin")

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and self._script_type == "importmap":
            self.import_maps.append(data)
        elif self._in_script and data.strip():
            self.problems.append("inline script")


@pytest.mark.parametrize("name", OUR_PAGES)
def test_page_has_no_inline_script_or_style_and_nothing_foreign(name: str) -> None:
    audit = _Audit()
    audit.feed((WEB / name).read_text(encoding="utf-8"))
    assert audit.problems == []
    # The one inline script allowed: the import map the CSP allows by its hash (broker/webmanifest/pins.py).
    assert all(text == import_map_text(WEB) for text in audit.import_maps), "an import map the CSP does not allow"


@pytest.mark.parametrize("path", sorted(p.relative_to(WEB).as_posix() for p in WEB.glob("*/*.[jc]s*")))
def test_scripts_and_styles_load_nothing_from_elsewhere(path: str) -> None:
    text = (WEB / path).read_text(encoding="utf-8")
    assert not re.search(r"""(url\(|import\s*\(?|from\s+)\s*["']?(https?:)?//""", text), "loads from another origin"
    assert not re.search(
        r"\.(inner|outer)HTML\s*=|insertAdjacentHTML|\beval\(|new Function|document\.write|createContextualFragment"
        r"|\.srcdoc\b|DOMParser|setAttribute\(\s*[\"'`]on|setTimeout\(\s*[\"'`]|setInterval\(\s*[\"'`]|trustedTypes",
        text,
    ), "builds code or markup from strings (Trusted Types refuses it in the browser)"
    assert "@import" not in text and "@font-face" not in text
