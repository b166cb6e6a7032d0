"""What every notice page (a link or an address that cannot be used) must look like: the normal
page layout with the client's pages' neutral title and icon, a language, one header, one heading,
one clear sentence, and the quick exit."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from html.parser import HTMLParser


@dataclass
class NoticeShape:
    lang: str | None = None
    title: str = ""
    headers: int = 0
    headings: list[str] = field(default_factory=list)
    paragraphs: list[str] = field(default_factory=list)
    main_code: str | None = None
    stylesheets: list[str] = field(default_factory=list)
    icons: list[str] = field(default_factory=list)
    quick_exits: list[str] = field(default_factory=list)

    @property
    def heading(self) -> str:
        return self.headings[0] if self.headings else ""


class _Reader(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.shape = NoticeShape()
        self._in: list[str] = []
        self._text = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "html":
            self.shape.lang = values.get("lang")
        elif tag == "header":
            self.shape.headers += 1
        elif tag == "main":
            self.shape.main_code = values.get("data-code")
        elif tag == "link" and values.get("rel") == "stylesheet":
            self.shape.stylesheets.append(values.get("href") or "")
        elif tag == "link" and values.get("rel") == "icon":
            self.shape.icons.append(values.get("href") or "")
        elif tag == "a" and "data-quick-exit" in values:
            self.shape.quick_exits.append(values.get("href") or "")
        if tag in ("title", "h1", "h2", "h3", "p"):
            self._in.append(tag)
            self._text = ""

    def handle_endtag(self, tag: str) -> None:
        if self._in and self._in[-1] == tag:
            self._in.pop()
            text = " ".join(self._text.split())
            if tag == "title":
                self.shape.title = text
            elif tag == "p":
                self.shape.paragraphs.append(text)
            else:
                self.shape.headings.append(text)

    def handle_data(self, data: str) -> None:
        if self._in:
            self._text += data


def read_notice(body: str) -> NoticeShape:
    reader = _Reader()
    reader.feed(body)
    return reader.shape


#: The client's pages' title unless the practice sets one (broker/http/client_pages.py).
NEUTRAL_TITLE = "Video call"


def check_notice(body: str, code: str, *, title: str = NEUTRAL_TITLE) -> NoticeShape:
    """Assert the layout of a notice page for ``code``; returns what it read. Its ``<title>`` is
    the neutral one (what the tab and the browser's history show), not its heading."""
    shape = read_notice(body)
    assert "404: Not Found" not in body, body[:200]
    assert shape.lang == "en"
    assert shape.title == title, f"the neutral title, not {shape.title!r}"
    assert shape.icons == ["/static/img/neutral.svg"], "the neutral icon"
    assert shape.quick_exits == ["/today"], "the quick exit, first on the page"
    assert shape.headers == 1, f"one header, not {shape.headers}"
    assert len(shape.headings) == 1, f"one heading: {shape.headings}"
    assert len(shape.paragraphs) == 1, f"one sentence, not {shape.paragraphs}"
    sentence = shape.paragraphs[0]
    # One sentence: it ends with a full stop and has no other sentence end inside.
    assert sentence.endswith("."), sentence
    assert not re.search(r"[.!?]\s", sentence), f"more than one sentence: {sentence!r}"
    assert shape.heading.rstrip(".").lower() not in sentence.lower(), "the sentence repeats the heading"
    assert shape.main_code == code
    assert shape.stylesheets == ["/static/css/app.css"], "the client pages' own layout"
    return shape
