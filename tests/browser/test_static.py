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
        r"|\.srcdoc\b|DOMParser|setAttribute\(\s*[\"'`]on|setTimeout\(\s*[\"'`]|setInterval\(\s*[\"'`]",
        text,
    ), "builds code or markup from strings (Trusted Types refuses it in the browser)"
    assert "@import" not in text and "@font-face" not in text
    if path != FRAME_CRYPTO:
        assert not re.search(r"trustedTypes|new (Shared)?Worker\b|serviceWorker\.register", text), (
            "a Trusted Types policy or a worker: only the frame encryption's module has one"
        )


FRAME_CRYPTO = "js/frame_crypto.js"


def test_the_one_trusted_types_policy_makes_script_urls_of_its_own_blobs_only() -> None:
    """The CSP allows one policy (frame-crypto); its module makes it once, for script URLs only,
    and lets through only the blob: URLs it made itself from the pinned worker and sframe.js."""
    text = (WEB / FRAME_CRYPTO).read_text(encoding="utf-8")
    assert len(re.findall(r"trustedTypes\.createPolicy\(", text)) == 1
    assert re.search(r'POLICY_NAME = "frame-crypto"', text)
    assert not re.search(r"createHTML|createScript\b|createScript\s*\(", text)
    assert "if (!madeUrls.has(candidate)) throw" in text
    assert len(re.findall(r"new Worker\(", text)) == 1 and "new Worker(scriptUrl(workerUrl)" in text
