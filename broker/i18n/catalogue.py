"""Catalogues: one JSON file per language, a flat map from a key to an ICU MessageFormat message.

The browser client's catalogues are ``web/i18n/<tag>.json`` (served, pinned by the web manifest,
loaded by web/js/i18n.js); the broker's own messages to people (the CLI) are in
``broker/i18n/messages/<tag>.json``. Both are read here: by the CLI to speak the admin's language,
by ``broker web-manifest build`` to pin the client's catalogues, and by the tests that keep every
catalogue complete and every page free of text outside them.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.i18n.message_format import MessageError, format_message, placeholders

__all__ = [
    "CATALOGUE_DIR",
    "DEFAULT_LANGUAGE",
    "Catalogue",
    "CatalogueError",
    "LANGUAGE_TAG",
    "catalogue_problems",
    "cli_language",
    "load_catalogues",
    "messages",
]

#: The language every catalogue falls back to, and in which every key must exist.
DEFAULT_LANGUAGE = "en"
#: The folder of the web root holding the client's catalogues.
CATALOGUE_DIR = "i18n"
#: A language tag as we accept it anywhere (the link's ?lang=, the policy, the configuration):
#: a BCP 47 language with an optional script or region, nothing a person could be told apart by.
LANGUAGE_TAG = re.compile(r"[a-z]{2,3}(-[A-Z][a-z]{3})?(-([A-Z]{2}|[0-9]{3}))?")
#: Keys every catalogue has: its name in its own language and its writing direction.
NAME_KEY = "language.name"
DIR_KEY = "language.dir"

_MESSAGES_DIR = Path(__file__).with_name("messages")


class CatalogueError(ValueError):
    """A catalogue that cannot be used (the message says which and why)."""


@dataclass(frozen=True)
class Catalogue:
    """One language's messages, with the default language's for keys it lacks."""

    language: str
    messages: Mapping[str, str]
    fallback: Mapping[str, str]

    def text(self, key: str, **args: Any) -> str:
        """The message ``key`` formatted with ``args`` (KeyError if no catalogue has it)."""
        own = self.messages.get(key)
        if own is not None:
            return format_message(own, args, self.language)
        return format_message(self.fallback[key], args, DEFAULT_LANGUAGE)

    @property
    def name(self) -> str:
        return self.messages.get(NAME_KEY, self.language)

    @property
    def direction(self) -> str:
        return self.messages.get(DIR_KEY, "ltr")


def _read(path: Path) -> dict[str, str]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CatalogueError(f"{path}: not a readable JSON catalogue ({exc}).") from None
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
        raise CatalogueError(f"{path}: a catalogue is one JSON object of text keys and text messages.")
    return raw


def load_catalogues(folder: Path) -> dict[str, dict[str, str]]:
    """Every catalogue of ``folder`` by language tag (the file name without .json), sorted."""
    found: dict[str, dict[str, str]] = {}
    for path in sorted(folder.glob("*.json")):
        if LANGUAGE_TAG.fullmatch(path.stem) is None:
            raise CatalogueError(f"{path}: the file name must be a language tag such as es or pt-BR.")
        found[path.stem] = _read(path)
    if DEFAULT_LANGUAGE not in found:
        raise CatalogueError(f"{folder}: there is no {DEFAULT_LANGUAGE}.json, the catalogue the others fall back to.")
    return found


def catalogue_problems(catalogues: Mapping[str, Mapping[str, str]]) -> list[str]:
    """What keeps a set of catalogues from being complete and consistent: a key missing from a
    language, a message that does not parse, or a translation using other placeholders."""
    problems: list[str] = []
    base = catalogues.get(DEFAULT_LANGUAGE, {})
    for language, messages in sorted(catalogues.items()):
        for key in (NAME_KEY, DIR_KEY):
            if key not in messages:
                problems.append(f"{language}: lacks {key!r}.")
        if messages.get(DIR_KEY, "ltr") not in ("ltr", "rtl"):
            problems.append(f"{language}: {DIR_KEY!r} must be 'ltr' or 'rtl'.")
        for key in sorted(set(base) - set(messages)):
            problems.append(f"{language}: lacks {key!r}.")
        for key in sorted(set(messages) - set(base)):
            problems.append(f"{language}: has {key!r}, which {DEFAULT_LANGUAGE} lacks.")
        for key, text in sorted(messages.items()):
            try:
                used = placeholders(text)
                wanted = placeholders(base[key]) if key in base else used
            except MessageError as exc:
                problems.append(f"{language}: {key!r} is not a valid message ({exc}).")
                continue
            if used != wanted:
                problems.append(
                    f"{language}: {key!r} uses {sorted(used)}, the {DEFAULT_LANGUAGE} text {sorted(wanted)}."
                )
    return problems


def cli_language(environ: Mapping[str, str] = os.environ) -> str:
    """The language of the person at the terminal, from the POSIX locale variables (LC_ALL,
    LC_MESSAGES, LANG, in that order of precedence), as one of the CLI's catalogues."""
    available = {p.stem for p in _MESSAGES_DIR.glob("*.json")}
    for name in ("LC_ALL", "LC_MESSAGES", "LANG"):
        value = environ.get(name, "")
        if not value:
            continue
        base = value.split(".")[0].split("@")[0].replace("_", "-").split("-")[0].lower()
        return base if base in available else DEFAULT_LANGUAGE
    return DEFAULT_LANGUAGE


_cli: dict[str, Catalogue] = {}


def messages(language: str | None = None) -> Catalogue:
    """The CLI's catalogue for ``language`` (default: the terminal's, see ``cli_language``)."""
    tag = language or cli_language()
    if tag not in _cli:
        everything = load_catalogues(_MESSAGES_DIR)
        chosen = tag if tag in everything else DEFAULT_LANGUAGE
        _cli[tag] = Catalogue(chosen, everything[chosen], everything[DEFAULT_LANGUAGE])
    return _cli[tag]
