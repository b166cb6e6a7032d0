"""The policy's texts in several languages (issue 33): each item's ``text`` and ``help`` and the
consent text may come with translations, and the policy version covers them all.

In the policy file, the untranslated texts are in the policy's ``language`` (a top-level key,
default ``en``); a translation follows its item or the consent table::

    [[item]]
    id = "private_place"
    text = "I am in a private place where I cannot be overheard."
    help = "..."
    [item.translations.es]
    text = "Estoy en un lugar privado donde nadie puede oírme."
    help = "..."

    [consent.translations.es]
    text = \"\"\"...\"\"\"

The join page shows the translation for its language and falls back to the untranslated text
(marked with the policy's language, so a screen reader reads it right). ``broker check-config``
names every text lacking a translation for a language the practice enables (``missing``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from broker.i18n.catalogue import DEFAULT_LANGUAGE, LANGUAGE_TAG, messages

#: Language tag -> field -> text.
Translations = dict[str, dict[str, str]]

_MAX_LANGUAGES = 20


class _Translated(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def translations(self) -> Translations: ...


class _Consent(Protocol):
    @property
    def translations(self) -> Translations: ...


def parse_language(raw: Any, source: str, problems: list[str]) -> str:
    """The policy's own language (top-level ``language``), a BCP 47 tag; default en."""
    if raw is None:
        return DEFAULT_LANGUAGE
    if not isinstance(raw, str) or LANGUAGE_TAG.fullmatch(raw) is None:
        problems.append(f'{source}: \'language\' must be a language tag such as "en" or "es" (got {raw!r}).')
        return DEFAULT_LANGUAGE
    return raw


def parse_translations(
    raw: Any, where: str, fields: Iterable[str], max_length: int, problems: list[str]
) -> Translations:
    """The ``translations`` table of an item or of the consent: language tag -> {field: text}.
    Every problem goes to ``problems`` in plain words; a bad entry is left out."""
    if raw is None:
        return {}
    allowed = tuple(fields)
    if not isinstance(raw, dict):
        problems.append(f"{where}: 'translations' must be tables written as [....translations.es].")
        return {}
    if len(raw) > _MAX_LANGUAGES:
        problems.append(f"{where}: at most {_MAX_LANGUAGES} translations are allowed.")
    out: Translations = {}
    for tag, entry in raw.items():
        if LANGUAGE_TAG.fullmatch(str(tag)) is None:
            problems.append(f'{where}: translation {tag!r} is not a language tag such as "es" or "pt-BR".')
            continue
        if not isinstance(entry, dict):
            problems.append(f"{where}: translation {tag!r} must be a table with {', '.join(map(repr, allowed))}.")
            continue
        before = len(problems)
        for key in sorted(set(entry) - set(allowed)):
            problems.append(f"{where}: translation {tag!r} has an unknown key {key!r}.")
        texts: dict[str, str] = {}
        for key in allowed:
            value = entry.get(key)
            if value is None:
                continue
            if not isinstance(value, str) or not value.strip():
                problems.append(f"{where}: translation {tag!r} has an empty {key!r}.")
            elif len(value) > max_length:
                problems.append(f"{where}: translation {tag!r} has a {key!r} longer than {max_length} characters.")
            else:
                texts[key] = value.strip()
        if len(problems) == before:
            out[str(tag)] = texts
    return out


def item_translations(raw: Any, where: str, max_length: int, problems: list[str]) -> Translations:
    """An item's ``[item.translations.<tag>]`` tables (``text`` and ``help``)."""
    return parse_translations(raw, where, ("text", "help"), max_length, problems)


def consent_translations(raw: Any, source: str, max_length: int, problems: list[str]) -> Translations:
    """The ``[consent.translations.<tag>]`` tables (only ``text``)."""
    return parse_translations(raw, f"{source}: [consent]", ("text",), max_length, problems)


def consent_doc(version: str, text: str, translations: Mapping[str, Mapping[str, str]]) -> dict[str, Any]:
    """The consent as the page gets it and the policy version hashes it."""
    extra = {"translations": canonical(translations)} if translations else {}
    return {"version": version, "text": text, **extra}


def canonical(translations: Mapping[str, Mapping[str, str]]) -> dict[str, dict[str, str]]:
    """Translations as the policy version hashes them (sorted, plain dicts)."""
    return {tag: dict(sorted(texts.items())) for tag, texts in sorted(translations.items())}


def missing(
    items: Iterable[_Translated],
    consent: _Consent | None,
    own_language: str,
    languages: Iterable[str],
) -> list[str]:
    """Every text a client reading one of ``languages`` would see untranslated, in plain words
    (in the admin's language: broker/i18n/messages)."""
    text = messages()
    problems = []
    for tag in languages:
        if tag == own_language:
            continue
        for item in items:
            has = item.translations.get(tag, {})
            key = _MISSING.get(("text" in has, "help" in has))
            if key is not None:
                problems.append(text.text(key, id=item.id, tag=tag))
        if consent is not None and "text" not in consent.translations.get(tag, {}):
            problems.append(text.text("policy.consent_untranslated", tag=tag))
    return problems


#: (has text, has help) -> the message for what is missing.
_MISSING = {
    (False, False): "policy.item_untranslated",
    (False, True): "policy.item_text_untranslated",
    (True, False): "policy.item_help_untranslated",
}
