"""What every notice page (a link or an address that cannot be used) must look like: the normal
page layout with a title, a language, one header, one heading and one clear sentence."""

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


def check_notice(body: str, code: str) -> NoticeShape:
    """Assert the layout of a notice page for ``code``; returns what it read."""
    shape = read_notice(body)
    assert "404: Not Found" not in body, body[:200]
    assert shape.lang == "en"
    assert shape.title, "a notice page has a title"
    assert shape.headers == 1, f"one header, not {shape.headers}"
    assert shape.headings == [shape.title], f"one heading, the title: {shape.headings}"
    assert len(shape.paragraphs) == 1, f"one sentence, not {shape.paragraphs}"
    sentence = shape.paragraphs[0]
    # One sentence: it ends with a full stop and has no other sentence end inside.
    assert sentence.endswith("."), sentence
    assert not re.search(r"[.!?]\s", sentence), f"more than one sentence: {sentence!r}"
    assert shape.title.rstrip(".").lower() not in sentence.lower(), "the sentence repeats the title"
    assert shape.main_code == code
    assert shape.stylesheets == ["/static/css/app.css"], "the client pages' own layout"
    return shape
