"""No text a person can see outside the catalogues (issue 33): every visible string of the client's
pages and modules is a catalogue key, and what a page carries before its script runs (the
English fallback) is exactly the English catalogue's text for that key.

Files not converted yet are named in NOT_CONVERTED with the reason; issue 33's next step converts
them, and the list may only shrink (test_the_unconverted_list_only_shrinks).
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WEB = REPO / "web"
EN = json.loads((WEB / "i18n" / "en.json").read_text(encoding="utf-8"))

#: Files not converted yet (issue 33). Every page and module is converted: THIS LIST MAY ONLY SHRINK.
NOT_CONVERTED: frozenset[str] = frozenset()
#: How long the list was when the check below was written.
NOT_CONVERTED_AT_MOST = 0
#: Not client pages in this sense, on purpose: the quick exit's neutral page (and its module) loads
#: no catalogue and no other module, and takes its words (the date, the calendar) from Intl in the
#: browser's own language; its one fallback word ("Today") is replaced before it is seen.
NEUTRAL = frozenset({"today.html", "js/today.js"})

#: Attributes a person can see or hear.
VISIBLE_ATTRIBUTES = ("aria-label", "title", "placeholder", "alt", "aria-description")
#: Elements whose text is not shown as text (script, style) or shown only without JavaScript, where
#: no catalogue can reach (noscript: English and Spanish, written in the page).
NOT_TEXT = ("script", "style", "noscript")
#: A template's placeholder (notice.html), filled by the broker from the catalogue.
PLACEHOLDER = re.compile(r"^\$[a-z_]+$")


def client_files(suffix: str) -> list[str]:
    base = WEB if suffix == ".html" else WEB / "js"
    found = sorted(p.relative_to(WEB).as_posix() for p in base.glob(f"*{suffix}"))
    return [f for f in found if f not in NOT_CONVERTED | NEUTRAL]


class _Texts(HTMLParser):
    """Each visible text of a page: the loose ones, and each data-i18n element's text as the
    catalogue writes it (slots as {name}, emphasis as <strong>)."""

    VOID = ("area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr")

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        #: (tag, attributes, the text buffer of the element if it has a catalogue key)
        self.stack: list[tuple[str, dict[str, str], list[str] | None]] = []
        self.loose: list[str] = []
        self.keys: list[tuple[str, list[str]]] = []
        self.attributes: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = {k: v or "" for k, v in attrs}
        kept = json.loads(named["data-i18n-attrs"]) if "data-i18n-attrs" in named else {}
        for attribute in VISIBLE_ATTRIBUTES:
            value = named.get(attribute, "")
            if value and not PLACEHOLDER.match(value):
                if attribute not in kept:
                    self.attributes.append(f"<{tag} {attribute}={value!r}> has no catalogue key")
                elif EN.get(kept[attribute][0]) != value:
                    self.attributes.append(f"<{tag} {attribute}={value!r}> differs from en {kept[attribute][0]!r}")
        if tag in self.VOID:
            return
        if "data-i18n-slot" in named:
            self._add("{" + named["data-i18n-slot"] + "}")
        elif tag == "strong":
            self._add("<strong>")
        buffer: list[str] | None = None
        if "data-i18n" in named:
            buffer = []
            self.keys.append((named["data-i18n"], buffer))
        self.stack.append((tag, named, buffer))

    def handle_endtag(self, tag: str) -> None:
        while self.stack:
            open_tag, named, _ = self.stack.pop()
            if open_tag == "strong" and "data-i18n-slot" not in named and not self._in_slot():
                self._add("</strong>")
            if open_tag == tag:
                break

    def _in_slot(self) -> bool:
        return any("data-i18n-slot" in named for _, named, _ in self.stack)

    def _buffer(self) -> list[str] | None:
        for _, _, buffer in reversed(self.stack):
            if buffer is not None:
                return buffer
        return None

    def _add(self, text: str) -> None:
        buffer = self._buffer()
        if buffer is not None:
            buffer.append(text)

    def handle_data(self, data: str) -> None:
        if not data.strip() or any(tag in NOT_TEXT for tag, _, _ in self.stack) or self._in_slot():
            return
        buffer = self._buffer()
        if buffer is None:
            if not PLACEHOLDER.match(data.strip()):
                self.loose.append(" ".join(data.split()))
            return
        buffer.append(data)


def read_page(name: str) -> _Texts:
    reader = _Texts()
    reader.feed((WEB / name).read_text(encoding="utf-8"))
    return reader


@pytest.mark.parametrize("name", client_files(".html"))
def test_every_visible_text_of_a_page_is_a_catalogue_key(name: str) -> None:
    page = read_page(name)
    assert page.loose == [], f"{name}: text outside any data-i18n element"
    assert page.attributes == [], name
    assert page.keys, f"{name}: no catalogue key at all"


@pytest.mark.parametrize("name", client_files(".html"))
def test_a_pages_fallback_text_is_the_english_catalogues(name: str) -> None:
    """What the page shows before its script runs is the catalogue's English, word for word, so
    the two never drift apart (a key whose text is a template placeholder is filled by the broker)."""
    text = (WEB / name).read_text(encoding="utf-8")
    for key in re.findall(r'data-i18n="([^"]+)"', text):
        if "$" in key:
            code_keys = [k for k in EN if re.fullmatch(re.escape(key).replace(r"\$notice", r"[a-z_]+"), k)]
            assert code_keys, f"{name}: no catalogue key matches the template key {key!r}"
            continue
        assert key in EN, f"{name}: {key!r} is not in web/i18n/en.json"
    reader = read_page(name)
    for key, buffer in reader.keys:
        if "$" in key:
            continue
        shown = " ".join("".join(buffer).split())
        wanted = " ".join(EN[key].split())
        assert shown == wanted, f"{name}: the text of {key!r} is {shown!r}, the catalogue's {wanted!r}"


#: A string literal that reads as English prose: a capitalised word, a space, and another word
#: ("Leave now", "The link does not work."). Keys ("check.waiting"), selectors, event names and
#: log lines ("event=...") do not look like that.
PROSE = re.compile(r"^[A-Z][a-z’']*\s+[A-Za-z’'($]")
_STRING = re.compile(r'"((?:[^"\\\n]|\\.)*)"|`((?:[^`\\]|\\.)*)`')
_COMMENT = re.compile(r"/\*.*?\*/|(?<![:\"'])//[^\n]*", re.S)


def prose_literals(source: str) -> list[str]:
    code = _COMMENT.sub("", source)
    found = []
    for match in _STRING.finditer(code):
        literal = match.group(1) if match.group(1) is not None else match.group(2)
        line_start = code.rfind("\n", 0, match.start()) + 1
        line = code[line_start : code.find("\n", match.end())]
        if "console." in line or "new Error(" in line:
            continue  # for developers, never shown
        if PROSE.match(literal):
            found.append(literal)
    return found


@pytest.mark.parametrize("name", client_files(".js"))
def test_no_english_prose_in_a_client_module(name: str) -> None:
    assert prose_literals((WEB / name).read_text(encoding="utf-8")) == [], name


def test_the_prose_finder_finds_prose() -> None:
    """The scanner above is not blind: it flags English in code and lets keys and selectors be."""
    code = 'show(node, "check.waiting"); node.textContent = "Waiting to check…"; q("#step-space input");'
    assert prose_literals(code) == ["Waiting to check…"]
    assert prose_literals("const a = `Step ${n} of ${m}`; // Not this comment") == ["Step ${n} of ${m}"]


def test_the_hardcoded_text_check_catches_a_loose_string() -> None:
    reader = _Texts()
    reader.feed('<p data-i18n="page.brand">Your session</p><p>Loose words</p><img alt="A picture">')
    assert reader.loose == ["Loose words"] and reader.attributes == ["<img alt='A picture'> has no catalogue key"]


def test_the_unconverted_list_only_shrinks() -> None:
    assert len(NOT_CONVERTED) <= NOT_CONVERTED_AT_MOST
    for name in NOT_CONVERTED:
        assert (WEB / name).is_file(), f"{name} is gone: take it off NOT_CONVERTED and lower the count"
