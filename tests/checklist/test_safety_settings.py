"""The policy's ``[safety]`` settings (the safety plan and the discreet signal, issue 29) and how the
broker takes a sealed safety plan with a checklist: optional, never required, only its shape checked."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest

from broker.checklist.policy import ChecklistRejected, PolicyError, Submission, load_policy, parse_policy, verify
from broker.checklist.preflight import PreflightResult
from broker.checklist.safety import SIGNAL_PLACES, SafetySettings
from broker.config import Config
from broker.config_check import check_config

POLICIES = Path(__file__).resolve().parents[1] / "data" / "policies"
MINIMAL = (POLICIES / "minimal.toml").read_text(encoding="utf-8")
SEALED = "A" * 21 + "bcdefghij-_klmnop0123456789"  # well-formed unpadded base64url, 48 characters
NETWORK = PreflightResult(connected=True, rtt_ms_median=12.0, relayed=False, finished_at=time.time())


def _with(safety: str) -> str:
    return MINIMAL + "\n[safety]\n" + safety + "\n"


def _problems(text: str) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, source="p.toml")
    return caught.value.problems


def _submission(policy, **fields) -> Submission:  # type: ignore[no-untyped-def]
    return Submission(
        policy_version=policy.version,
        answers={"private_place": True, "headset": True, "preflight": True},
        consent_version=policy.consent.version,
        details=SEALED,
        **fields,
    )


def test_without_a_safety_table_the_plan_is_offered_and_the_signal_is_a_menu_item() -> None:
    policy = parse_policy(MINIMAL)
    assert policy.safety == SafetySettings(plan=True, signal_place="menu", signal_label="Report a connection problem")
    assert policy.for_seat(minor=False)["safety"] == {
        "plan": True,
        "signal_place": "menu",
        "signal_label": "Report a connection problem",
    }
    assert load_policy(None).safety == SafetySettings()  # the built-in policy says so too


def test_the_practice_chooses_the_signals_place_and_words_and_the_page_is_told() -> None:
    policy = parse_policy(_with('plan = false\nsignal_place = "controls"\nsignal_label = "  Picture settings "'))
    assert policy.safety == SafetySettings(plan=False, signal_place="controls", signal_label="Picture settings")
    assert policy.for_seat(minor=True)["safety"]["signal_label"] == "Picture settings"
    assert {p: parse_policy(_with(f'signal_place = "{p}"')).safety.signal_place for p in SIGNAL_PLACES} == {
        p: p for p in SIGNAL_PLACES
    }


def test_a_change_of_the_safety_settings_is_a_new_policy_version() -> None:
    """The page shows the label and offers the plan: an open page must not run an older choice."""
    versions = {
        parse_policy(MINIMAL).version,
        parse_policy(_with('signal_label = "Picture settings"')).version,
        parse_policy(_with("plan = false")).version,
        parse_policy(_with('signal_place = "none"')).version,
    }
    assert len(versions) == 4
    assert parse_policy(_with("plan = true")).version == parse_policy(MINIMAL).version  # the default, written out


@pytest.mark.parametrize(
    ("safety", "expected"),
    [
        ('signal_place = "banner"', "[safety] 'signal_place' = 'banner'; use one of menu, controls, none."),
        ('plan = "yes"', "[safety] 'plan' = 'yes'; it must be true or false."),
        ('signal_label = "   "', "[safety] 'signal_label' must be 1 to 60 characters"),
        ("signal_label = 3", "[safety] 'signal_label' must be 1 to 60 characters"),
        (f'signal_label = "{"x" * 61}"', "[safety] 'signal_label' must be 1 to 60 characters"),
        ('signal_label = "two\\nlines"', "[safety] 'signal_label' must be printable text on one line."),
        ('code_word = "blue"', "[safety] has an unknown key 'code_word'"),
    ],
)
def test_a_wrong_safety_setting_is_named_in_plain_words(safety: str, expected: str) -> None:
    problems = _problems(_with(safety))
    assert len(problems) == 1 and problems[0].startswith("p.toml: " + expected), problems


def test_a_safety_value_that_is_not_a_table_is_refused() -> None:
    assert _problems('safety = "on"\n' + MINIMAL) == ["p.toml: [safety] must be a table."]


def test_broker_check_config_reports_a_wrong_safety_setting(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(_with('signal_place = "popup"'), encoding="utf-8")
    problems = check_config(dataclasses.replace(Config(data_dir=tmp_path), policy_file=str(path)))
    assert any("checklist policy:" in p and "signal_place" in p and "popup" in p for p in problems), problems
    path.write_text(_with('signal_place = "controls"'), encoding="utf-8")
    problems = check_config(dataclasses.replace(Config(data_dir=tmp_path), policy_file=str(path)))
    assert not [p for p in problems if "checklist policy" in p]


def test_a_sealed_plan_is_kept_in_the_result_the_therapist_gets_and_is_never_required() -> None:
    policy = parse_policy(MINIMAL)
    without = verify(policy, _submission(policy), minor=False, preflight=NETWORK)
    assert without.all_required_met and without.summary()["safety_plan"] is None
    result = verify(policy, _submission(policy, safety_plan=SEALED), minor=False, preflight=NETWORK)
    assert result.summary()["safety_plan"] == SEALED
    assert SEALED not in repr(result)  # never in a log line made from the result
    assert Submission.from_dict({"policy_version": "v", "safety_plan": SEALED}).safety_plan == SEALED


@pytest.mark.parametrize("bad", ["not base64url!", "A" * 10, "A" * 4097, "A" * 25])
def test_a_plan_that_is_not_a_sealed_blob_is_refused_and_changes_nothing(bad: str) -> None:
    policy = parse_policy(MINIMAL)
    with pytest.raises(ChecklistRejected) as caught:
        verify(policy, _submission(policy, safety_plan=bad), minor=False, preflight=NETWORK)
    assert caught.value.code == "checklist_malformed"
    assert "safety plan" in caught.value.message


def test_a_plan_sent_where_the_practice_offers_none_is_refused() -> None:
    policy = parse_policy(_with("plan = false"))
    with pytest.raises(ChecklistRejected) as caught:
        verify(policy, _submission(policy, safety_plan=SEALED), minor=False, preflight=NETWORK)
    assert caught.value.code == "checklist_malformed"
    assert "does not offer one" in caught.value.message


def test_a_plan_sent_as_anything_but_text_is_malformed() -> None:
    with pytest.raises(ChecklistRejected) as caught:
        Submission.from_dict({"policy_version": "v", "safety_plan": {"code_word": "blue"}})
    assert caught.value.code == "checklist_malformed"
