"""A pseudo-RTL catalogue made from the English one (issue 33): every word accented and
lengthened by about a third, written right to left. A layout that holds with it holds with a real
Arabic or Hebrew catalogue: the texts are longer than English, and every box is mirrored."""

from __future__ import annotations

from broker.i18n.message_format import Hash, Node, parse_message

#: The pseudo language's tag: Chromium's own pseudo-RTL locale is ar-XB.
PSEUDO_RTL = "ar-XB"

_ACCENTS = str.maketrans("aeiouAEIOUcnyCNY", "áéíóúÁÉÍÓÚçñýÇÑÝ")
_TAGS = ("<strong>", "</strong>")


def _pseudo_text(text: str) -> str:
    out = []
    for piece in _split_tags(text):
        if piece in _TAGS:
            out.append(piece)
            continue
        words = []
        for word in piece.split(" "):
            longer = word + "~" * (len(word) // 3) if word.isalpha() else word
            words.append(longer.translate(_ACCENTS))
        out.append(" ".join(words))
    return "".join(out)


def _split_tags(text: str) -> list[str]:
    pieces: list[str] = []
    rest = text
    while rest:
        at = min((i for i in (rest.find(t) for t in _TAGS) if i >= 0), default=-1)
        if at < 0:
            pieces.append(rest)
            break
        tag = next(t for t in _TAGS if rest.startswith(t, at))
        pieces += [rest[:at], tag]
        rest = rest[at + len(tag) :]
    return [p for p in pieces if p]


def _quote(text: str) -> str:
    return text.replace("'", "''").replace("{", "'{'").replace("}", "'}'").replace("#", "'#'")


def _write(tree: list[Node]) -> str:
    out = []
    for node in tree:
        if isinstance(node, str):
            out.append(_quote(_pseudo_text(node)))
        elif isinstance(node, Hash):
            out.append("#")
        elif node.type is None:
            out.append("{" + node.name + "}")
        elif node.type == "number":
            out.append("{" + node.name + ", number}")
        else:
            cases = " ".join(f"{selector} {{{_write(case)}}}" for selector, case in node.cases.items())
            out.append("{" + node.name + ", plural, " + cases + "}")
    return "".join(out)


def pseudo_rtl(english: dict[str, str]) -> dict[str, str]:
    """The pseudo-RTL catalogue of ``english`` (same keys and placeholders)."""
    out = {key: _write(parse_message(text)) for key, text in english.items()}
    out["language.name"] = "Pseudo RTL"
    out["language.dir"] = "rtl"
    return out
