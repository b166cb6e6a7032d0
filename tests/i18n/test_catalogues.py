"""The catalogues (issue 33): complete and consistent in every language, messages in our ICU
MessageFormat subset formatted right (plurals by CLDR category, numbers), pinned for the browser,
and the CLI's language taken from the terminal's locale."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from broker.i18n.catalogue import (
    Catalogue,
    CatalogueError,
    catalogue_problems,
    cli_language,
    load_catalogues,
    messages,
)
from broker.i18n.message_format import MessageError, format_message, parse_message, placeholders, plural_category
from broker.webmanifest.catalogue_pins import PINS_MODULE, catalogue_pins_stale, catalogue_pins_text
from broker.webmanifest.integrity import sri
from broker.webmanifest.release import build_release, stale_release
from tests.i18n.pseudo import pseudo_rtl
from tests.webmanifest.web_copies import copy_web

REPO = Path(__file__).resolve().parents[2]
WEB_CATALOGUES = REPO / "web" / "i18n"
CLI_CATALOGUES = REPO / "broker" / "i18n" / "messages"


@pytest.mark.parametrize("folder", [WEB_CATALOGUES, CLI_CATALOGUES], ids=["web", "cli"])
def test_every_catalogue_is_complete_and_consistent(folder: Path) -> None:
    catalogues = load_catalogues(folder)
    assert {"en", "es"} <= set(catalogues)
    assert catalogue_problems(catalogues) == []


def test_catalogue_problems_name_a_missing_key_a_bad_message_and_other_placeholders() -> None:
    en = {"language.name": "English", "language.dir": "ltr", "a": "Hello {name}", "b": "Two", "c": "x"}
    es = {"language.name": "Español", "language.dir": "ltr", "a": "Hola {nombre}", "c": "{broken"}
    problems = catalogue_problems({"en": en, "es": es})
    assert "es: lacks 'b'." in problems
    assert any(p.startswith("es: 'a' uses ['nombre']") for p in problems)
    assert any(p.startswith("es: 'c' is not a valid message") for p in problems)


def test_a_catalogue_must_be_named_by_a_language_tag_and_hold_text_only(tmp_path: Path) -> None:
    (tmp_path / "en.json").write_text('{"a": "b"}', encoding="utf-8")
    (tmp_path / "Spanish.json").write_text('{"a": "b"}', encoding="utf-8")
    with pytest.raises(CatalogueError, match="language tag"):
        load_catalogues(tmp_path)
    (tmp_path / "Spanish.json").unlink()
    (tmp_path / "es.json").write_text('{"a": 1}', encoding="utf-8")
    with pytest.raises(CatalogueError, match="text keys and text messages"):
        load_catalogues(tmp_path)


@pytest.mark.parametrize(
    ("n", "language", "category"),
    [
        (1, "en", "one"),
        (0, "en", "other"),
        (2, "en", "other"),
        ("1.0", "en", "other"),  # CLDR: v = 1, so not "one" ("1.0 checks")
        (1, "es", "one"),
        (0, "es", "other"),
        (5, "es", "other"),
        (1_000_000, "es", "many"),  # "1 millón de comprobaciones"
        (2_000_000, "es", "many"),
        (1_000_001, "es", "other"),
        ("1.5", "es", "other"),
        (1, "es-MX", "one"),
        (1, "xx", "other"),
    ],
)
def test_plural_categories_follow_cldr(n: object, language: str, category: str) -> None:
    from decimal import Decimal

    assert plural_category(Decimal(str(n)) if isinstance(n, str) else n, language) == category  # type: ignore[arg-type]


FAILED = "{count, plural, =0 {Nothing failed} one {One check failed} other {# checks failed}}"


@pytest.mark.parametrize(
    ("count", "language", "text"),
    [
        (0, "en", "Nothing failed"),
        (1, "en", "One check failed"),
        (1234, "en", "1,234 checks failed"),
        (12345, "es", "12.345 checks failed"),
        (1234, "es", "1234 checks failed"),
    ],
)
def test_plural_and_number_formatting(count: int, language: str, text: str) -> None:
    assert format_message(FAILED, {"count": count}, language) == text


def test_the_spanish_catalogue_has_plurals_right() -> None:
    es = Catalogue("es", json.loads((WEB_CATALOGUES / "es.json").read_text(encoding="utf-8")), {})
    assert es.text("device.summary_failed", count=1) == "Una comprobación necesita su atención"
    assert es.text("device.summary_failed", count=3) == "3 comprobaciones necesitan su atención"
    assert es.text("check.network_busy_retry", seconds=1).endswith("en 1 segundo…")
    assert es.text("check.network_works_ms", ms=1500) == "Su conexión funciona (1500 ms)"


def test_message_syntax_quoting_and_unknown_arguments() -> None:
    assert format_message("It''s {name}'s '{'turn'}'", {"name": "Sam"}, "en") == "It's Sam's {turn}"
    assert format_message("Hello {name}", {}, "en") == "Hello {name}"
    assert placeholders(FAILED) == {"count"}
    for broken in ("{", "}", "{n, plural, one {x}}", "{n, select, a {x} other {y}}", "{n, plural, one {x} other {y}"):
        with pytest.raises(MessageError):
            parse_message(broken)


def test_notice_messages_are_one_sentence_in_every_language() -> None:
    """The broker's notice pages say one clear sentence (tests/notice_page.py) in every language."""
    for language, catalogue in load_catalogues(WEB_CATALOGUES).items():
        for key, text in catalogue.items():
            if re.fullmatch(r"notice\.[a-z_]+\.message", key):
                assert text.endswith("."), (language, key)
                assert not re.search(r"[.!?]\s", text), f"{language} {key}: more than one sentence"


def test_the_pins_module_is_built_from_the_catalogues() -> None:
    root = REPO / "web"
    assert not catalogue_pins_stale(root), "run: python -m broker web-manifest build"
    text = (root / PINS_MODULE).read_text(encoding="utf-8")
    for tag in ("en", "es"):
        assert sri((WEB_CATALOGUES / f"{tag}.json").read_bytes()) in text
        assert f'"url": "/static/i18n/{tag}.json"' in text


def test_a_changed_or_added_catalogue_makes_the_release_stale_until_rebuilt(tmp_path: Path) -> None:
    root = copy_web(tmp_path)
    assert stale_release(root) == []
    english = json.loads((root / "i18n" / "en.json").read_text(encoding="utf-8"))
    (root / "i18n" / "ar-XB.json").write_text(json.dumps(pseudo_rtl(english)), encoding="utf-8")
    problems = stale_release(root)
    assert any(PINS_MODULE in p for p in problems), problems
    built = build_release(root)
    assert PINS_MODULE in built.pages
    assert stale_release(root) == []
    pins = (root / PINS_MODULE).read_text(encoding="utf-8")
    assert '"dir": "rtl"' in pins and "/static/i18n/ar-XB.json" in pins
    manifest = json.loads((root / "release" / "web-manifest.json").read_text(encoding="utf-8"))
    assert manifest["files"]["/static/i18n/ar-XB.json"] == sri((root / "i18n" / "ar-XB.json").read_bytes())
    assert catalogue_pins_text(root) == pins


@pytest.mark.parametrize(
    ("environ", "language"),
    [
        ({"LANG": "es_ES.UTF-8"}, "es"),
        ({"LANG": "es_MX.UTF-8", "LC_ALL": "en_GB.UTF-8"}, "en"),
        ({"LC_MESSAGES": "es", "LANG": "en_US"}, "es"),
        ({"LANG": "fr_FR.UTF-8"}, "en"),
        ({}, "en"),
        ({"LANG": "C"}, "en"),
    ],
)
def test_the_cli_speaks_the_terminals_language(environ: dict[str, str], language: str) -> None:
    assert cli_language(environ) == language


def test_cli_messages_in_spanish() -> None:
    assert messages("es").text("policy.consent_untranslated", tag="fr") == (
        "el texto del consentimiento no tiene traducción al fr."
    )
    assert messages("en").text("policy.item_untranslated", id="camera", tag="es") == (
        "item 'camera' has no es translation of its text and help."
    )
