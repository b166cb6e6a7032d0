"""The policy's texts per language (issue 33): each item's text and help and the consent text with
translations, all covered by the policy version; what the join page gets; what ``broker
check-config`` names when a language the practice offers lacks a translation; and the language
the client read the checklist in, kept with the checklist result."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import pytest

from broker.checklist.policy import PolicyError, load_policy, parse_policy
from broker.checklist.preflight import PreflightResult
from broker.config import Config, load_config
from broker.config_check import check_config, untranslated_texts
from broker.signaling.admission import PolicyChecklist
from broker.signaling.protocol import ChecklistSubmit, ErrorCode, ProtocolError, decode_client
from tests.cli.test_cli import run

POLICIES = Path(__file__).resolve().parents[1] / "data" / "policies"
MINIMAL = (POLICIES / "minimal.toml").read_text(encoding="utf-8")
SEALED = "A" * 21 + "bcdefghij-_klmnop0123456789"

PRIVATE_PLACE_ES = """
[item.translations.es]
text = "Estoy en un lugar privado."
help = "Busque una habitación con una puerta que pueda cerrar."
"""
CONSENT_ES = """
[consent.translations.es]
text = "Su terapeuta puede tener que compartir información si alguien corre peligro."
"""


def with_private_place_es(text: str = MINIMAL, translation: str = PRIVATE_PLACE_ES) -> str:
    """MINIMAL with a Spanish translation right after the private_place item."""
    anchor = 'help = "Find a room with a door you can close."\n'
    return text.replace(anchor, anchor + translation, 1)


def _problems(text: str) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, source="p.toml")
    return caught.value.problems


def test_translations_reach_the_page_with_the_policys_own_language() -> None:
    policy = parse_policy(with_private_place_es() + CONSENT_ES)
    page = policy.for_seat(minor=False)
    assert page["language"] == "en"
    item = next(i for i in page["items"] if i["id"] == "private_place")
    assert item["translations"] == {
        "es": {"help": "Busque una habitación con una puerta que pueda cerrar.", "text": "Estoy en un lugar privado."}
    }
    assert "translations" not in next(i for i in page["items"] if i["id"] == "headset")
    assert page["consent"]["translations"]["es"]["text"].startswith("Su terapeuta")


def test_the_policy_version_covers_every_translation() -> None:
    plain = parse_policy(MINIMAL)
    translated = parse_policy(with_private_place_es())
    reworded = parse_policy(with_private_place_es(translation=PRIVATE_PLACE_ES.replace("privado.", "tranquilo.")))
    consent = parse_policy(MINIMAL + CONSENT_ES)
    own_language = parse_policy('language = "es"\n' + MINIMAL)
    versions = {p.version for p in (plain, translated, reworded, consent, own_language)}
    assert len(versions) == 5
    assert own_language.language == "es" and own_language.for_seat(False)["language"] == "es"


def test_a_policy_without_translations_keeps_its_version() -> None:
    """Translations are hashed only where given: a practice's existing policy keeps its version,
    so no client mid-checklist gets policy_outdated from an upgrade."""
    assert parse_policy(MINIMAL).version == _old_version()


def _old_version() -> str:
    """The version as the broker hashed a policy before translations existed."""
    import hashlib
    import json

    policy = parse_policy(MINIMAL)
    doc = {
        "consent": {"version": policy.consent.version, "text": policy.consent.text} if policy.consent else None,
        "practice": {"name": policy.practice_name},
        "items": [
            {
                "id": i.id,
                "kind": i.kind,
                "level": i.level,
                "text": i.text,
                "help": i.help,
                "check": i.check,
                "minor_only": i.minor_only,
            }
            for i in policy.items
        ],
        "safety": policy.safety.for_page(),
    }
    raw = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(raw).hexdigest()[:16]


@pytest.mark.parametrize(
    ("translation", "problem"),
    [
        ('[item.translations.Spanish]\ntext = "x"\n', "'Spanish' is not a language tag"),
        ('[item.translations.es]\ntext = "x"\nlabel = "y"\n', "translation 'es' has an unknown key 'label'"),
        ('[item.translations.es]\ntext = "  "\n', "translation 'es' has an empty 'text'"),
        ("[item.translations]\nes = 3\n", "translation 'es' must be a table"),
        (f'[item.translations.es]\ntext = "{"x" * 2001}"\n', "longer than 2000 characters"),
    ],
)
def test_a_bad_translation_is_refused_in_plain_words(translation: str, problem: str) -> None:
    problems = _problems(with_private_place_es(translation=translation))
    assert any(problem in p and "private_place" in p for p in problems), problems


def test_a_bad_policy_language_and_consent_translation_are_refused() -> None:
    assert any("'language' must be a language tag" in p for p in _problems('language = "Spanish"\n' + MINIMAL))
    bad = MINIMAL + '\n[consent.translations.es]\nversion = "v2"\n'
    assert any("[consent]: translation 'es' has an unknown key 'version'" in p for p in _problems(bad))


def test_the_built_in_policy_is_translated_into_spanish_completely() -> None:
    policy = load_policy(None)
    assert all("es" in item.translations and set(item.translations["es"]) == {"text", "help"} for item in policy.items)
    assert policy.consent is not None and "Riesgo de daño" in policy.consent.translations["es"]["text"]
    assert untranslated_texts(Config()) == []


def test_check_config_names_each_text_missing_a_translation_for_an_offered_language(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(with_private_place_es(), encoding="utf-8")
    config = dataclasses.replace(Config(data_dir=tmp_path), policy_file=str(path))
    missing = untranslated_texts(config)
    assert any("item 'headset' has no es translation of its text and help." in m for m in missing), missing
    assert any("the consent text has no es translation." in m for m in missing)
    assert not any("'private_place'" in m for m in missing)
    # Not a problem that stops the broker: the page shows the untranslated text, marked as English.
    assert check_config(config) == []
    # A practice that offers English only has nothing missing.
    assert untranslated_texts(dataclasses.replace(config, languages=("en",))) == []
    help_only = with_private_place_es(translation='[item.translations.es]\ntext = "Estoy en un lugar privado."\n')
    path.write_text(help_only, encoding="utf-8")
    assert any("item 'private_place' has no es translation of its help." in m for m in untranslated_texts(config))


def test_check_config_refuses_a_language_the_client_pages_cannot_show(tmp_path: Path) -> None:
    config = load_config({"BROKER_LANGUAGES": "en,fr,Spanish"}, {"data_dir": tmp_path})
    assert config.languages == ("en", "fr", "Spanish")
    problems = check_config(config)
    assert any("no catalogue for fr" in p for p in problems), problems
    assert any("Spanish is not a language tag" in p for p in problems), problems
    assert any("languages is empty" in p for p in check_config(dataclasses.replace(config, languages=())))


def test_broker_check_config_prints_the_untranslated_texts_and_still_passes(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(MINIMAL, encoding="utf-8")
    env = {**os.environ, "BROKER_POLICY_FILE": str(path), "LANG": "C.UTF-8"}
    result = run("check-config", "--data-dir", str(tmp_path / "data"), env=env)
    assert result.returncode == 0, result.stderr
    assert "Not translated for a language the practice offers (en, es)" in result.stdout
    assert "item 'private_place' has no es translation of its text and help." in result.stdout
    spanish = run("check-config", "--data-dir", str(tmp_path / "data"), env={**env, "LANG": "es_ES.UTF-8"})
    assert "el punto 'private_place' no tiene traducción al es de su texto ni de su ayuda." in spanish.stdout


def _submit(policy_version: str, consent_version: str, language: str | None) -> ChecklistSubmit:
    return ChecklistSubmit(
        policy_version=policy_version,
        answers={"private_place": True, "preflight": True, "consent": True},
        consent_version=consent_version,
        details=SEALED,
        language=language,
    )


def test_the_checklist_result_keeps_the_language_the_consent_was_read_in() -> None:
    policy = parse_policy(with_private_place_es() + CONSENT_ES)
    gate = PolicyChecklist(policy, "", ("en", "es"))
    assert gate.policy_for(False)["languages"] == ["en", "es"]
    network = dataclasses.asdict(PreflightResult(True, 10.0, False, time.time()))
    assert policy.consent is not None
    kept = gate.verify(_submit(policy.version, policy.consent.version, "es"), minor=False, preflight=network)
    assert kept["language"] == "es" and kept["policy_version"] == policy.version and kept["all_required_met"]
    unnamed = gate.verify(_submit(policy.version, policy.consent.version, None), minor=False, preflight=network)
    assert unnamed["language"] is None
    with pytest.raises(ProtocolError) as refused:
        gate.verify(_submit(policy.version, policy.consent.version, "fr"), minor=False, preflight=network)
    assert refused.value.code is ErrorCode.BAD_MESSAGE


@pytest.mark.parametrize("tag", ["es", "pt-BR", "zh-Hant-TW", "es-419"])
def test_the_wire_takes_a_language_tag(tag: str) -> None:
    message = decode_client(json.dumps({"type": "checklist", "policy_version": "v", "answers": {}, "language": tag}))
    assert isinstance(message, ChecklistSubmit) and message.language == tag


@pytest.mark.parametrize("tag", ["", "Spanish", "es_ES", "es-es", "es;q=1", "e" * 13, "es-ES-x-private-name"])
def test_the_wire_refuses_anything_but_a_language_tag(tag: str) -> None:
    with pytest.raises(ProtocolError) as refused:
        decode_client(json.dumps({"type": "checklist", "policy_version": "v", "answers": {}, "language": tag}))
    assert refused.value.code is ErrorCode.BAD_MESSAGE
