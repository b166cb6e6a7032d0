"""The ``languages`` setting (BROKER_LANGUAGES) checked against the client's catalogues."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from broker.i18n.catalogue import CATALOGUE_DIR, DEFAULT_LANGUAGE, LANGUAGE_TAG, messages


def language_problems(languages: Iterable[str], root: Path) -> list[str]:
    """Every enabled language that is not a tag, or that the web root has no catalogue for."""
    text = messages()
    tags = list(languages)
    problems = []
    if not tags:
        problems.append(text.text("config.languages_empty", default=DEFAULT_LANGUAGE))
    for tag in tags:
        if LANGUAGE_TAG.fullmatch(tag) is None:
            problems.append(text.text("config.language_not_a_tag", tag=tag))
        elif not (root / CATALOGUE_DIR / f"{tag}.json").is_file():
            problems.append(text.text("config.language_no_catalogue", tag=tag, folder=str(root / CATALOGUE_DIR)))
    return problems
