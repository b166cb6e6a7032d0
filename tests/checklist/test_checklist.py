"""Checklist policy loading and server-side verification of checklist submissions."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from broker.checklist.policy import (
    CHECKS,
    ChecklistRejected,
    PolicyError,
    Submission,
    load_policy,
    parse_policy,
    verify,
)
from broker.checklist.preflight import PreflightResult

POLICIES = Path(__file__).resolve().parents[1] / "data" / "policies"
DETAILS = "A" * 21 + "bcdefghij-_klmnop0123456789"  # well-formed unpadded base64url, 48 chars

GOOD_NETWORK = PreflightResult(connected=True, rtt_ms_median=12.4, relayed=False, finished_at=time.time())
FAILED_NETWORK = PreflightResult(connected=False, rtt_ms_median=None, relayed=False, finished_at=time.time())


def _problems(name: str) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        load_policy(POLICIES / name)
    assert caught.value.problems, "a PolicyError must list its problems"
    assert str(caught.value) == "\n".join(caught.value.problems)
    return caught.value.problems


def _rejected(policy, submission, *, minor=False, preflight=GOOD_NETWORK) -> ChecklistRejected:
    with pytest.raises(ChecklistRejected) as caught:
        verify(policy, submission, minor=minor, preflight=preflight)
    assert caught.value.message.strip()
    return caught.value


@pytest.fixture(scope="module")
def minimal():
    return load_policy(POLICIES / "minimal.toml")


def _full(policy, *, minor=False, **overrides) -> Submission:
    """A submission that meets every item the seat is asked."""
    answers = {item.id: True for item in policy.items_for(minor) if item.kind in ("attested", "automatic")}
    fields = {
        "policy_version": policy.version,
        "answers": answers,
        "consent_version": policy.consent.version if policy.consent else None,
        "details": DETAILS if any(i.kind == "details" for i in policy.items_for(minor)) else None,
    }
    fields.update(overrides)
    return Submission(**fields)


# -- default policy -----------------------------------------------------------------------------------------


def test_default_policy_loads_with_a_stable_version():
    first, second = load_policy(None), load_policy(None)
    assert first.version == second.version
    assert len(first.version) == 16 and int(first.version, 16) >= 0
    assert first == second


def test_default_policy_covers_design_section_5():
    policy = load_policy(None)
    by_check = {i.check: i for i in policy.items if i.kind == "automatic"}
    assert set(by_check) == set(CHECKS)
    assert by_check["headset"].level == "recommended"
    assert all(i.level == "required" for c, i in by_check.items() if c != "headset")
    attested = [i for i in policy.items if i.kind == "attested" and not i.minor_only]
    assert [i.id for i in attested] == [
        "private_place",
        "private_device",
        "private_window",
        "notifications_off",
        "emergency_help",
    ]
    levels = {i.id: i.level for i in attested}
    assert levels["notifications_off"] == levels["private_window"] == "recommended"
    private_window = policy.item("private_window")
    assert private_window is not None
    for words in ("private", "history", "leave now", "esc"):
        assert words in (private_window.text + private_window.help).lower()
    assert policy.page_title is None and policy.exit_url is None, "the built-in neutral title and exit page"
    assert [i.level for i in policy.items if i.kind in ("consent", "details")] == ["required", "required"]
    minor_items = [i for i in policy.items if i.minor_only]
    assert [(i.id, i.level) for i in minor_items] == [("guardian_consent", "required")]
    consent = policy.consent
    assert consent is not None and consent.version
    for words in ("harm", "abuse", "court", "release"):
        assert words in consent.text.lower()


def test_default_policy_passes_a_complete_submission_for_adult_and_minor():
    policy = load_policy(None)
    adult = verify(policy, _full(policy), minor=False, preflight=GOOD_NETWORK)
    assert "guardian_consent" not in adult.passed and adult.all_required_met
    minor = verify(policy, _full(policy, minor=True), minor=True, preflight=GOOD_NETWORK)
    assert minor.passed["guardian_consent"] is True


def test_version_changes_with_any_visible_change():
    base = (POLICIES / "minimal.toml").read_text()
    original = parse_policy(base)
    assert parse_policy(base).version == original.version
    assert parse_policy("# a comment only\n" + base).version == original.version
    assert parse_policy(base.replace("I am in a private place.", "I am alone.")).version != original.version
    assert parse_policy(base.replace('level = "recommended"', 'level = "required"')).version != original.version
    assert parse_policy(base.replace("Riverside", "Lakeside")).version != original.version


def test_practice_sets_the_client_pages_title_and_exit_page_without_a_new_version():
    base = (POLICIES / "minimal.toml").read_text()
    plain = parse_policy(base)
    chosen = parse_policy(
        base.replace(
            'name = "Riverside Counselling"',
            'name = "Riverside Counselling"\npage_title = "  Notes  "\nexit_url = "https://www.example.org/weather?q=1"',
        )
    )
    assert (chosen.page_title, chosen.exit_url) == ("Notes", "https://www.example.org/weather?q=1")
    assert (plain.page_title, plain.exit_url) == (None, None)
    assert chosen.version == plain.version, "neither changes what the client answers"
    assert "page_title" not in chosen.for_seat(False) and "exit_url" not in chosen.for_seat(False)


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ('exit_url = "javascript:alert(1)"', "'exit_url' must be an https:// address"),
        ('exit_url = "http://www.example.org/"', "'exit_url' must be an https:// address"),
        ('exit_url = "/today"', "'exit_url' must be an https:// address"),
        ('exit_url = "https://user:pw@www.example.org/"', "no user name"),
        ('exit_url = "https:///nohost"', "with a host name"),
        ('exit_url = "https://www.example.org/a b"', "'exit_url' must be an https:// address"),
        ("exit_url = 3", "'exit_url' must be an https:// address"),
        ('page_title = ""', "'page_title' must be a non-empty line"),
        (f'page_title = "{"x" * 81}"', "at most 80 characters"),
        ('page_title = "two\\nlines"', "'page_title' must be a non-empty line"),
        ('colour = "red"', "unknown key 'colour'"),
    ],
)
def test_a_bad_practice_setting_is_refused_in_plain_words(line: str, words: str):
    base = (POLICIES / "minimal.toml").read_text()
    with pytest.raises(PolicyError) as caught:
        parse_policy(base.replace('name = "Riverside Counselling"', 'name = "Riverside Counselling"\n' + line))
    assert any(words in problem and "[practice]" in problem for problem in caught.value.problems), caught.value.problems


def test_for_seat_is_json_and_hides_minor_items_from_adults(minimal):
    adult = minimal.for_seat(False)
    child = minimal.for_seat(True)
    json.dumps(adult), json.dumps(child)
    assert adult["version"] == child["version"] == minimal.version
    assert adult["practice_name"] == "Riverside Counselling"
    assert adult["consent"] == {"version": "v1", "text": minimal.consent.text}
    assert [i["id"] for i in adult["items"]] == ["private_place", "headset", "preflight", "consent", "details"]
    assert [i["id"] for i in child["items"]] == [
        "private_place",
        "headset",
        "preflight",
        "consent",
        "details",
        "guardian",
    ]
    assert adult["items"][1] == {
        "id": "headset",
        "kind": "automatic",
        "level": "recommended",
        "text": "You are using headphones.",
        "help": "Headphones keep the session private.",
        "check": "headset",
    }
    assert "check" not in adult["items"][0]
    assert [i.id for i in minimal.items_for(False)] == [i["id"] for i in adult["items"]]


# -- bad policies -------------------------------------------------------------------------------------------


def test_bad_toml_syntax_names_the_file():
    (problem,) = _problems("bad_syntax.toml")
    assert "bad_syntax.toml" in problem and "not valid TOML" in problem


def test_missing_file_is_a_policy_error(tmp_path):
    with pytest.raises(PolicyError) as caught:
        load_policy(tmp_path / "nowhere.toml")
    assert "nowhere.toml" in caught.value.problems[0] and "cannot read" in caught.value.problems[0]


def test_empty_item_list():
    (problem,) = _problems("empty_items.toml")
    assert "no items" in problem


def test_every_problem_is_reported_not_just_the_first():
    problems = _problems("many_problems.toml")
    text = "\n".join(problems)
    expected = [
        "unknown top-level key 'colour'",
        "[consent] is missing its 'version'",
        "item id 'dup' is used more than once",
        "item 'odd_kind' has an unknown kind 'telepathic'",
        "item 'odd_level' has an unknown level 'mandatory'",
        "item 'no_check' is automatic but has no 'check'",
        "item 'odd_check' has an unknown check 'bluetooth'",
        "item #7 needs an 'id'",
        "item 'no_text' is missing its 'text'",
        "item 'check_on_attested' has a 'check' but only automatic items",
        "item 'minor_typo' has 'minor_only' = 'yes'",
        "item 'typo_key' has an unknown key 'lvl'",
    ]
    for fragment in expected:
        assert fragment in text, fragment
    assert all(p.startswith(str(POLICIES / "many_problems.toml")) for p in problems)
    assert len(problems) == len(expected)


def test_consent_item_without_consent_text():
    (problem,) = _problems("consent_without_text.toml")
    assert "item 'consent' asks for consent" in problem and "[consent]" in problem


def test_consent_table_without_text():
    problems = _problems("consent_missing_text.toml")
    assert any("[consent] is missing its 'text'" in p for p in problems)
    assert any("item 'consent' asks for consent" in p for p in problems)


def test_repeated_checks_and_details_items():
    problems = _problems("duplicate_check.toml")
    assert any("item 'cam_b' repeats check 'camera' already done by item 'cam_a'" in p for p in problems)
    assert any("'details_a', 'details_b'" in p and "keep one" in p for p in problems)


# -- verification ---------------------------------------------------------------------------------------------


def test_complete_submission_passes_with_summary(minimal):
    result = verify(minimal, _full(minimal), minor=False, preflight=GOOD_NETWORK)
    assert result.policy_version == minimal.version
    assert result.passed == {
        "private_place": True,
        "headset": True,
        "preflight": True,
        "consent": True,
        "details": True,
    }
    assert result.all_required_met and result.recommended_unmet == []
    assert result.details == DETAILS
    summary = result.summary()
    assert json.loads(json.dumps(summary)) == summary
    assert summary["network"] == {"connected": True, "rtt_ms": 12, "relayed": False}
    assert DETAILS not in json.dumps(summary)


def test_unmet_recommended_item_is_reported_not_refused(minimal):
    submission = _full(minimal, answers={"private_place": True, "headset": False})
    result = verify(minimal, submission, minor=False, preflight=GOOD_NETWORK)
    assert result.passed["headset"] is False
    assert result.recommended_unmet == ["headset"]
    assert result.all_required_met


def test_policy_outdated(minimal):
    rejection = _rejected(minimal, _full(minimal, policy_version="0123456789abcdef"))
    assert rejection.code == "policy_outdated" and "reload" in rejection.message


def test_unknown_item(minimal):
    rejection = _rejected(minimal, _full(minimal, answers={"private_place": True, "teleport": True}))
    assert rejection.code == "checklist_unknown_item" and rejection.item_ids == ["teleport"]


def test_minor_items_are_unknown_on_an_adult_seat(minimal):
    answers = {"private_place": True, "guardian": True}
    rejection = _rejected(minimal, _full(minimal, answers=answers), minor=False)
    assert rejection.code == "checklist_unknown_item" and rejection.item_ids == ["guardian"]


def test_minor_seat_needs_the_guardian_item(minimal):
    rejection = _rejected(minimal, _full(minimal, minor=False), minor=True)
    assert rejection.code == "checklist_incomplete" and rejection.item_ids == ["guardian"]
    assert "A guardian agreed." in rejection.message
    result = verify(minimal, _full(minimal, minor=True), minor=True, preflight=GOOD_NETWORK)
    assert result.passed["guardian"] is True


def test_incomplete_names_every_missing_required_item(minimal):
    submission = _full(minimal, answers={"private_place": False}, consent_version=None)
    rejection = _rejected(minimal, submission)
    assert rejection.code == "checklist_incomplete"
    assert rejection.item_ids == ["private_place", "consent"]
    assert "I am in a private place." in rejection.message and "I accept the consent text." in rejection.message


def test_declined_consent_is_incomplete(minimal):
    submission = _full(minimal, answers={"private_place": True, "consent": False})
    rejection = _rejected(minimal, submission)
    assert rejection.code == "checklist_incomplete" and rejection.item_ids == ["consent"]


def test_consent_outdated():
    policy = load_policy(POLICIES / "minimal_consent_v2.toml")
    rejection = _rejected(policy, _full(policy, consent_version="v1"))
    assert rejection.code == "consent_outdated" and rejection.item_ids == ["consent"]
    assert verify(policy, _full(policy), minor=False, preflight=GOOD_NETWORK).passed["consent"]


def test_details_missing(minimal):
    rejection = _rejected(minimal, _full(minimal, details=None))
    assert rejection.code == "details_missing" and rejection.item_ids == ["details"]


@pytest.mark.parametrize(
    "details",
    ["short", "A" * 4097, "not base64url!" * 3, "A" * 24 + "=", "A" * 25, "A" * 30 + "\n"],
)
def test_details_invalid(minimal, details):
    rejection = _rejected(minimal, _full(minimal, details=details))
    assert rejection.code == "details_invalid" and rejection.item_ids == ["details"]


def test_details_refused_when_policy_does_not_ask():
    policy = load_policy(POLICIES / "attested_only.toml")
    rejection = _rejected(policy, _full(policy, details=DETAILS), preflight=None)
    assert rejection.code == "details_invalid"


def test_preflight_missing(minimal):
    rejection = _rejected(minimal, _full(minimal), preflight=None)
    assert rejection.code == "preflight_missing" and rejection.item_ids == ["preflight"]


def test_preflight_failed(minimal):
    rejection = _rejected(minimal, _full(minimal), preflight=FAILED_NETWORK)
    assert rejection.code == "preflight_failed" and rejection.item_ids == ["preflight"]


def test_forged_preflight_answer_is_ignored(minimal):
    """The page saying the network check passed counts for nothing without the broker's own record."""
    forged = _full(minimal, answers={"private_place": True, "preflight": True})
    assert _rejected(minimal, forged, preflight=None).code == "preflight_missing"
    assert _rejected(minimal, forged, preflight=FAILED_NETWORK).code == "preflight_failed"
    # and a page that thinks it failed is not held to that when the broker saw it work
    modest = _full(minimal, answers={"private_place": True, "preflight": False})
    assert verify(minimal, modest, minor=False, preflight=GOOD_NETWORK).passed["preflight"] is True


def test_malformed_answers(minimal):
    rejection = _rejected(minimal, _full(minimal, answers={"private_place": "yes"}))
    assert rejection.code == "checklist_malformed" and rejection.item_ids == ["private_place"]
    with pytest.raises(ChecklistRejected) as caught:
        Submission.from_dict({"answers": {}})
    assert caught.value.code == "checklist_malformed"
    with pytest.raises(ChecklistRejected):
        Submission.from_dict({"policy_version": "x", "answers": [], "details": None})


def test_from_dict_round_trip(minimal):
    raw = {
        "policy_version": minimal.version,
        "answers": {"private_place": True},
        "consent_version": "v1",
        "details": DETAILS,
    }
    submission = Submission.from_dict(raw)
    assert verify(minimal, submission, minor=False, preflight=GOOD_NETWORK).all_required_met


def test_resubmission_after_fixing_passes(minimal):
    """The client is told what is wrong, fixes it, submits again, and gets through."""
    attempt = _full(minimal, answers={"private_place": False}, details=None)
    assert _rejected(minimal, attempt).code == "checklist_incomplete"
    attempt = _full(minimal, details=None)
    assert _rejected(minimal, attempt).code == "details_missing"
    attempt = _full(minimal)
    assert _rejected(minimal, attempt, preflight=None).code == "preflight_missing"
    result = verify(minimal, attempt, minor=False, preflight=GOOD_NETWORK)
    assert result.all_required_met and result.passed["private_place"]


def test_policy_without_required_items_accepts_an_empty_submission():
    policy = load_policy(POLICIES / "attested_only.toml")
    result = verify(policy, Submission(policy_version=policy.version), minor=False, preflight=None)
    assert result.passed == {"quiet": False} and result.recommended_unmet == ["quiet"]
    assert result.summary()["network"] is None
