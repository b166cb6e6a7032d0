"""ICU MessageFormat, the subset the catalogues use, and CLDR plural categories for our languages.

The same subset as web/js/i18n.js: ``{name}``, ``{name, number}``, ``{name, plural, ...}`` with
``=N`` and category cases and ``#``, apostrophe quoting. Python has no ``Intl``: the plural rules
of the languages we ship are written out here from CLDR (``plural_category``), and a catalogue
for a language without rules here is refused by the tests until its rules are added.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

__all__ = ["MessageError", "PLURAL_LANGUAGES", "format_message", "parse_message", "plural_category", "placeholders"]


class MessageError(ValueError):
    """A message that is not valid in our MessageFormat subset (the text says where)."""


@dataclass(frozen=True)
class Argument:
    name: str
    type: str | None = None
    cases: dict[str, list[Node]] = field(default_factory=dict)


@dataclass(frozen=True)
class Hash:
    """``#`` inside a plural case: the number, formatted."""


Node = str | Argument | Hash

_WORD = re.compile(r"\s*([^\s,{}]+)\s*")


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.at = 0

    def nodes(self, inside: bool) -> list[Node]:
        out: list[Node] = []
        literal = ""
        text = self.text
        while self.at < len(text):
            ch = text[self.at]
            if ch == "'" and text[self.at + 1 : self.at + 2] == "'":
                literal += "'"
                self.at += 2
            elif ch == "'" and text[self.at + 1 : self.at + 2] in ("{", "}", "#"):
                end = text.find("'", self.at + 1)
                literal += text[self.at + 1 : end if end >= 0 else len(text)]
                self.at = end + 1 if end >= 0 else len(text)
            elif ch == "{":
                if literal:
                    out.append(literal)
                literal = ""
                self.at += 1
                out.append(self.argument())
            elif ch == "}":
                if not inside:
                    raise MessageError(f"unbalanced '}}' at {self.at}")
                break
            elif ch == "#":
                if literal:
                    out.append(literal)
                literal = ""
                out.append(Hash())
                self.at += 1
            else:
                literal += ch
                self.at += 1
        if literal:
            out.append(literal)
        return out

    def word(self) -> str:
        found = _WORD.match(self.text, self.at)
        if not found:
            raise MessageError(f"expected a name at {self.at}")
        self.at = found.end()
        return found.group(1)

    def expect(self, ch: str) -> None:
        if self.text[self.at : self.at + 1] != ch:
            raise MessageError(f"expected {ch!r} at {self.at}")
        self.at += 1

    def argument(self) -> Argument:
        name = self.word()
        if self.text[self.at : self.at + 1] == "}":
            self.at += 1
            return Argument(name)
        self.expect(",")
        kind = self.word()
        if self.text[self.at : self.at + 1] == "}":
            self.at += 1
            if kind != "number":
                raise MessageError(f"unsupported argument type {kind!r}")
            return Argument(name, kind)
        self.expect(",")
        if kind != "plural":
            raise MessageError(f"unsupported argument type {kind!r}")
        cases: dict[str, list[Node]] = {}
        while True:
            while self.text[self.at : self.at + 1].isspace():
                self.at += 1
            if self.text[self.at : self.at + 1] == "}":
                self.at += 1
                break
            if self.at >= len(self.text):
                raise MessageError("a plural is not closed")
            selector = self.word()
            self.expect("{")
            cases[selector] = self.nodes(inside=True)
            self.expect("}")
        if "other" not in cases:
            raise MessageError(f"the plural {name!r} has no 'other' case")
        return Argument(name, kind, cases)


def parse_message(text: str) -> list[Node]:
    """The message as a tree; MessageError if it is not in our subset."""
    parser = _Parser(text)
    tree = parser.nodes(inside=False)
    if parser.at < len(text):
        raise MessageError(f"unexpected text at {parser.at}")
    return tree


def placeholders(text: str) -> set[str]:
    """The argument names a message uses (a translation must use the same ones)."""
    names: set[str] = set()

    def walk(tree: list[Node]) -> None:
        for node in tree:
            if isinstance(node, Argument):
                names.add(node.name)
                for case in node.cases.values():
                    walk(case)

    walk(parse_message(text))
    return names


def _operands(n: int | float | Decimal) -> tuple[Decimal, int, int]:
    """CLDR's n (absolute value), i (integer digits) and v (number of visible fraction digits)."""
    number = abs(Decimal(str(n)))
    exponent = number.as_tuple().exponent
    v = -exponent if isinstance(exponent, int) and exponent < 0 else 0
    return number, int(number), v


def _english(n: int | float | Decimal) -> str:
    _, i, v = _operands(n)
    return "one" if i == 1 and v == 0 else "other"


def _spanish(n: int | float | Decimal) -> str:
    number, i, v = _operands(n)
    if number == 1:
        return "one"
    if i != 0 and i % 1_000_000 == 0 and v == 0:
        return "many"
    return "other"


#: CLDR cardinal plural rules of the languages we ship (CLDR 46: en "one: i = 1 and v = 0";
#: es "one: n = 1; many: e = 0 and i != 0 and i % 1000000 = 0 and v = 0 or e != 0..5").
PLURAL_LANGUAGES = {"en": _english, "es": _spanish}


def plural_category(n: int | float | Decimal, language: str) -> str:
    """The CLDR plural category of ``n`` in ``language`` (its base tag); 'other' for one we lack."""
    rule = PLURAL_LANGUAGES.get(language.split("-")[0].lower())
    return rule(n) if rule is not None else "other"


def _number(value: Any, language: str) -> str:
    """Numbers as people of our languages write them: en 1,234.5; es 1234,5 and 12.345 (the RAE
    groups only from five digits)."""
    number = Decimal(str(value))
    base = language.split("-")[0].lower()
    whole, _, fraction = f"{abs(number):f}".partition(".")
    group, decimal = (".", ",") if base == "es" else (",", ".")
    if base != "es" or len(whole) > 4:
        whole = f"{int(whole):,}".replace(",", group)
    text = whole + (decimal + fraction if fraction else "")
    return ("-" if number < 0 else "") + text


def _render(tree: list[Node], args: Mapping[str, Any], language: str, count: Any) -> str:
    out = []
    for node in tree:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, Hash):
            out.append("#" if count is None else _number(count, language))
        elif node.name not in args:
            out.append("{" + node.name + "}")
        elif node.type == "number":
            out.append(_number(args[node.name], language))
        elif node.type == "plural":
            value = args[node.name]
            chosen = node.cases.get(f"={value}") or node.cases.get(plural_category(value, language))
            out.append(_render(chosen if chosen is not None else node.cases["other"], args, language, value))
        else:
            out.append(str(args[node.name]))
    return "".join(out)


def format_message(text: str, args: Mapping[str, Any], language: str) -> str:
    """``text`` with ``args`` for ``language``; unknown arguments stay as ``{name}``."""
    return _render(parse_message(text), args, language, None)
