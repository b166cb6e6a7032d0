"""Checklist policy (what a practice asks of a client before a session) and the broker-side checklist result.

The page runs the checklist; the broker only trusts it as far as it can: it checks the answers fit the current
policy, that consent was given for the current consent text, that the emergency details are a well-formed
ciphertext, and it takes the network pre-flight outcome from its own record, never from the page.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker.checklist import policy_languages as langs
from broker.checklist.practice import parse_practice
from broker.checklist.safety import SafetySettings, parse_safety

if TYPE_CHECKING:  # checklist must import without aiortc; preflight is only read by attribute
    from broker.checklist.preflight import PreflightResult

__all__ = [
    "CHECKS",
    "KINDS",
    "LEVELS",
    "ChecklistRejected",
    "ChecklistResult",
    "ConsentText",
    "Policy",
    "PolicyError",
    "PolicyItem",
    "Submission",
    "DEFAULT_POLICY_PATH",
    "load_policy",
    "parse_policy",
    "verify",
]

DEFAULT_POLICY_PATH = Path(__file__).with_name("default_policy.toml")

KINDS = frozenset({"automatic", "attested", "consent", "details"})
LEVELS = frozenset({"required", "recommended"})
CHECKS = frozenset({"secure_context", "webrtc", "webcrypto", "camera", "microphone", "headset", "preflight"})

_ID_RE = re.compile(r"[a-z0-9_]{1,40}")
# Emergency details: unpadded base64url of an encrypted blob. The broker sees only its shape.
_DETAILS_RE = re.compile(r"[A-Za-z0-9_-]{24,4096}")
_MAX_ITEMS = 100
_MAX_ITEM_TEXT = 2000
_MAX_CONSENT_TEXT = 50_000
_MAX_VERSION = 64
_ITEM_KEYS = frozenset({"id", "kind", "level", "text", "help", "check", "minor_only", "translations"})
_TOP_KEYS = frozenset({"consent", "practice", "item", "safety", "language"})


class PolicyError(Exception):
    """A policy file the broker refuses to run with; `problems` lists every fault in plain words."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


class ChecklistRejected(Exception):
    """A checklist submission the broker refuses; the client can fix it and submit again.

    `code` is stable and goes on the wire; `message` is written for the client; `item_ids` names the items at
    fault (empty when the fault is not about particular items).
    """

    def __init__(self, code: str, message: str, item_ids: list[str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.item_ids = list(item_ids or [])


@dataclass(frozen=True)
class PolicyItem:
    id: str
    kind: str
    level: str
    text: str
    help: str
    check: str | None = None
    minor_only: bool = False
    translations: langs.Translations = field(default_factory=dict)

    @property
    def required(self) -> bool:
        return self.level == "required"

    def canonical(self) -> dict[str, Any]:
        """Everything that defines the item, for the policy version hash."""
        return {
            "id": self.id,
            "kind": self.kind,
            "level": self.level,
            "text": self.text,
            "help": self.help,
            "check": self.check,
            "minor_only": self.minor_only,
            **({"translations": langs.canonical(self.translations)} if self.translations else {}),
        }

    def for_page(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "kind": self.kind,
            "level": self.level,
            "text": self.text,
            "help": self.help,
        }
        if self.check is not None:
            out["check"] = self.check
        out.update({"translations": langs.canonical(self.translations)} if self.translations else {})
        return out


@dataclass(frozen=True)
class ConsentText:
    version: str
    text: str
    translations: langs.Translations = field(default_factory=dict)

    def doc(self) -> dict[str, Any]:
        return langs.consent_doc(self.version, self.text, self.translations)


@dataclass(frozen=True)
class Policy:
    """A validated checklist policy. `version` changes whenever anything a client sees or must do changes."""

    items: tuple[PolicyItem, ...]
    consent: ConsentText | None
    practice_name: str | None
    version: str
    source: str = "<built-in default>"
    safety: SafetySettings = field(default_factory=SafetySettings)
    #: The client's pages' title and the quick exit's landing page ([practice]; None: the built-in
    #: neutral ones). Not part of ``version``: they change nothing the client answers.
    page_title: str | None = None
    exit_url: str | None = None
    #: The language of the untranslated texts (top-level ``language``; part of ``version``).
    language: str = "en"

    def items_for(self, minor: bool) -> list[PolicyItem]:
        """The items a seat is asked, in order; minor_only items only for a minor's seat."""
        return [item for item in self.items if minor or not item.minor_only]

    def item(self, item_id: str) -> PolicyItem | None:
        return next((i for i in self.items if i.id == item_id), None)

    def for_seat(self, minor: bool) -> dict[str, Any]:
        """What the join page needs to run the checklist for one seat (JSON-able)."""
        return {
            "version": self.version,
            "practice_name": self.practice_name,
            "language": self.language,
            "consent": self.consent.doc() if self.consent is not None else None,
            "items": [item.for_page() for item in self.items_for(minor)],
            "safety": self.safety.for_page(),
        }


def _canonical_version(
    items: list[PolicyItem], consent: ConsentText | None, practice_name: str | None, safety: SafetySettings, lang: str
) -> str:
    doc = {
        **({"language": lang} if lang != "en" else {}),
        "consent": consent.doc() if consent is not None else None,
        "practice": {"name": practice_name},
        "items": [item.canonical() for item in items],
        "safety": safety.for_page(),
    }
    raw = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(raw).hexdigest()[:16]


def load_policy(path: Path | None = None) -> Policy:
    """Load and validate a policy file; None loads the built-in default."""
    if path is None:
        return parse_policy(DEFAULT_POLICY_PATH.read_text(encoding="utf-8"), source="<built-in default>")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PolicyError([f"{path}: the file is not UTF-8 text."]) from None
    except OSError as exc:
        raise PolicyError([f"{path}: cannot read the file ({exc.strerror or exc.__class__.__name__})."]) from None
    return parse_policy(text, source=str(path))


def parse_policy(text: str, source: str = "<policy>") -> Policy:
    """Parse policy TOML text; raise PolicyError listing every problem found."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError([f"{source}: not valid TOML: {exc}."]) from None
    problems: list[str] = []
    for key in sorted(set(doc) - _TOP_KEYS):
        problems.append(
            f"{source}: unknown top-level key {key!r} (expected [consent], [practice], [safety], [[item]])."
        )
    consent = _parse_consent(doc.get("consent"), source, problems)
    practice = parse_practice(doc.get("practice"), source, problems)
    safety = parse_safety(doc.get("safety"), source, problems)
    items = _parse_items(doc.get("item"), source, problems)
    _check_item_set(items, consent, source, problems)
    language = langs.parse_language(doc.get("language"), source, problems)
    if problems:
        raise PolicyError(problems)
    return Policy(
        items=tuple(items),
        consent=consent,
        practice_name=practice.name,
        version=_canonical_version(items, consent, practice.name, safety, language),
        language=language,
        source=source,
        safety=safety,
        page_title=practice.page_title,
        exit_url=practice.exit_url,
    )


def _parse_consent(raw: Any, source: str, problems: list[str]) -> ConsentText | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        problems.append(f"{source}: [consent] must be a table with 'version' and 'text'.")
        return None
    translations = langs.consent_translations(raw.get("translations"), source, _MAX_CONSENT_TEXT, problems)
    for key in sorted(set(raw) - {"version", "text", "translations"}):
        problems.append(f"{source}: [consent] has an unknown key {key!r} (expected 'version' and 'text').")
    version, text = raw.get("version"), raw.get("text")
    ok = True
    if not isinstance(version, str) or not version.strip():
        problems.append(f"{source}: [consent] is missing its 'version' (a short string such as \"2026-1\").")
        ok = False
    elif len(version) > _MAX_VERSION or not version.isprintable():
        problems.append(f"{source}: [consent] 'version' must be printable and at most {_MAX_VERSION} characters.")
        ok = False
    if not isinstance(text, str) or not text.strip():
        problems.append(f"{source}: [consent] is missing its 'text' (the informed-consent text clients accept).")
        ok = False
    elif len(text) > _MAX_CONSENT_TEXT:
        problems.append(f"{source}: [consent] 'text' is longer than {_MAX_CONSENT_TEXT} characters.")
        ok = False
    if not ok or not isinstance(version, str) or not isinstance(text, str):
        return None
    return ConsentText(version=version.strip(), text=text.strip(), translations=translations)


def _parse_items(raw: Any, source: str, problems: list[str]) -> list[PolicyItem]:
    if raw is None or (isinstance(raw, list) and not raw):
        problems.append(f"{source}: the policy has no items; add at least one [[item]].")
        return []
    if not isinstance(raw, list):
        problems.append(f"{source}: 'item' must be a list of tables written as [[item]].")
        return []
    if len(raw) > _MAX_ITEMS:
        problems.append(f"{source}: the policy has {len(raw)} items; at most {_MAX_ITEMS} are allowed.")
    items: list[PolicyItem] = []
    for position, entry in enumerate(raw, start=1):
        item = _parse_item(entry, position, source, problems)
        if item is not None:
            items.append(item)
    return items


def _parse_item(entry: Any, position: int, source: str, problems: list[str]) -> PolicyItem | None:
    if not isinstance(entry, dict):
        problems.append(f"{source}: item #{position} must be a table.")
        return None
    raw_id = entry.get("id")
    valid_id = isinstance(raw_id, str) and _ID_RE.fullmatch(raw_id) is not None
    where = f"{source}: item {raw_id!r}" if valid_id else f"{source}: item #{position}"
    before = len(problems)
    if not valid_id:
        problems.append(f"{where} needs an 'id' of 1 to 40 lowercase letters, digits or underscores (got {raw_id!r}).")
    for key in sorted(set(entry) - _ITEM_KEYS):
        problems.append(f"{where} has an unknown key {key!r}.")
    kind, level, check = entry.get("kind"), entry.get("level"), entry.get("check")
    if kind not in KINDS:
        problems.append(f"{where} has an unknown kind {kind!r}; use one of {', '.join(sorted(KINDS))}.")
    if level not in LEVELS:
        problems.append(f"{where} has an unknown level {level!r}; use 'required' or 'recommended'.")
    for key in ("text", "help"):
        value = entry.get(key)
        if not isinstance(value, str) or not value.strip():
            problems.append(f"{where} is missing its '{key}' (the words shown to the client).")
        elif len(value) > _MAX_ITEM_TEXT:
            problems.append(f"{where} has a '{key}' longer than {_MAX_ITEM_TEXT} characters.")
    if kind == "automatic":
        if check is None:
            problems.append(f"{where} is automatic but has no 'check'; use one of {', '.join(sorted(CHECKS))}.")
        elif check not in CHECKS:
            problems.append(f"{where} has an unknown check {check!r}; use one of {', '.join(sorted(CHECKS))}.")
    elif check is not None:
        problems.append(f"{where} has a 'check' but only automatic items are checked by the page.")
    minor_only = entry.get("minor_only", False)
    if not isinstance(minor_only, bool):
        problems.append(f"{where} has 'minor_only' = {minor_only!r}; it must be true or false.")
    if len(problems) != before:
        return None
    return PolicyItem(
        id=str(raw_id),
        kind=str(kind),
        level=str(level),
        text=entry["text"].strip(),
        help=entry["help"].strip(),
        check=check,
        minor_only=minor_only,
        translations=langs.item_translations(entry.get("translations"), where, _MAX_ITEM_TEXT, problems),
    )


def _check_item_set(items: list[PolicyItem], consent: ConsentText | None, source: str, problems: list[str]) -> None:
    seen_ids: set[str] = set()
    seen_checks: dict[str, str] = {}
    for item in items:
        if item.id in seen_ids:
            problems.append(f"{source}: item id {item.id!r} is used more than once; ids must be unique.")
        seen_ids.add(item.id)
        if item.check is not None:
            if item.check in seen_checks:
                problems.append(
                    f"{source}: item {item.id!r} repeats check {item.check!r} already done by item "
                    f"{seen_checks[item.check]!r}."
                )
            else:
                seen_checks[item.check] = item.id
    for kind in ("consent", "details"):
        of_kind = [i.id for i in items if i.kind == kind]
        if len(of_kind) > 1:
            problems.append(f"{source}: items {', '.join(map(repr, of_kind))} are all of kind {kind!r}; keep one.")
    consent_items = [i.id for i in items if i.kind == "consent"]
    if consent_items and consent is None:
        problems.append(
            f"{source}: item {consent_items[0]!r} asks for consent but the policy has no [consent] table with a "
            "'version' and 'text'."
        )


# ---------------------------------------------------------------------------------------------------------------
# Submission and verification


@dataclass(frozen=True)
class Submission:
    """What the join page submits: the policy version it ran, its answers, the consent version it showed and
    accepted, and the emergency details as an opaque ciphertext (unpadded base64url)."""

    policy_version: str
    answers: dict[str, bool] = field(default_factory=dict)
    consent_version: str | None = None
    details: str | None = None
    #: Every item's answer as the page judged it, sealed in the client's browser for the therapist.
    answers_sealed: str | None = None
    #: The client's safety plan (optional), sealed in the client's browser for the therapist.
    safety_plan: str | None = None

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Submission:
        """Build from decoded JSON, refusing wrong types with code 'checklist_malformed'."""
        if not isinstance(raw, Mapping):
            raise _malformed("The checklist was not sent as an object.")
        version = raw.get("policy_version")
        answers = raw.get("answers", {})
        consent_version = raw.get("consent_version")
        details = raw.get("details")
        answers_sealed = raw.get("answers_sealed")
        safety_plan = raw.get("safety_plan")
        if not isinstance(version, str):
            raise _malformed("The checklist was sent without its policy version.")
        if not isinstance(answers, Mapping):
            raise _malformed("The checklist answers were not sent as an object.")
        if consent_version is not None and not isinstance(consent_version, str):
            raise _malformed("The consent version was not sent as text.")
        if details is not None and not isinstance(details, str):
            raise _malformed("The emergency details were not sent as text.")
        if answers_sealed is not None and not isinstance(answers_sealed, str):
            raise _malformed("The sealed answers were not sent as text.")
        if safety_plan is not None and not isinstance(safety_plan, str):
            raise _malformed("The safety plan was not sent as text.")
        return cls(version, dict(answers), consent_version, details, answers_sealed, safety_plan)


def _malformed(message: str) -> ChecklistRejected:
    return ChecklistRejected("checklist_malformed", message + " Please reload the page and try again.")


@dataclass(frozen=True)
class ChecklistResult:
    """The outcome of checking a submission.

    ``passed`` and ``recommended_unmet`` say item by item what was met; they exist while the broker
    checks and are never kept. What the broker keeps is ``summary()``: only what it enforces (the
    required items were met, for this policy version) and its own pre-flight record. How the client
    answered each item reaches the therapist in ``answers_sealed``, sealed in the client's browser.
    `details` is the client's encrypted emergency details, carried to the therapist and never part of
    the summary; ``safety_plan`` the client's sealed safety plan, carried in the summary like
    ``answers_sealed``; every ciphertext is dropped with the session.
    """

    policy_version: str
    passed: dict[str, bool]
    all_required_met: bool
    recommended_unmet: list[str]
    network: dict[str, Any] | None = None
    details: str | None = field(default=None, repr=False)
    answers_sealed: str | None = field(default=None, repr=False)
    safety_plan: str | None = field(default=None, repr=False)

    def summary(self) -> dict[str, Any]:
        """What the broker keeps and the therapist receives for this client (JSON-able)."""
        return {
            "policy_version": self.policy_version,
            "all_required_met": self.all_required_met,
            "network": dict(self.network) if self.network is not None else None,
            "answers_sealed": self.answers_sealed,
            "safety_plan": self.safety_plan,
        }


def details_well_formed(details: str) -> bool:
    """Only the shape of the ciphertext can be checked: unpadded base64url, 24..4096 characters."""
    return _DETAILS_RE.fullmatch(details) is not None and len(details) % 4 != 1


def verify(
    policy: Policy,
    submission: Submission,
    *,
    minor: bool,
    preflight: PreflightResult | None,
) -> ChecklistResult:
    """Check a submission against the policy for one seat; return the result or raise ChecklistRejected.

    Per kind, an item is met when:
    - automatic: the page answered True; except the 'preflight' check, which is met only when the broker's own
      PreflightResult says connected. Any answer the page gives for the preflight item is ignored (not rejected):
      the broker's record is authoritative, and a page whose own view disagrees (for example it timed out first)
      should not be turned away for it.
    - attested: the page answered True.
    - consent: consent_version equals the current consent version and the page did not answer False for it.
    - details: a well-formed ciphertext was sent (its answer, if any, is ignored).

    When several faults exist the rejection names the first of: policy_outdated, checklist_malformed,
    checklist_unknown_item, consent_outdated, details_invalid, checklist_incomplete, details_missing,
    preflight_missing, preflight_failed.
    """
    if submission.policy_version != policy.version:
        raise ChecklistRejected(
            "policy_outdated",
            "The checklist has changed since this page was opened. Please reload the page and go through it again.",
        )
    items = policy.items_for(minor)
    known = {item.id for item in items}
    _check_answer_types(submission.answers)
    unknown = sorted(set(submission.answers) - known)
    if unknown:
        raise ChecklistRejected(
            "checklist_unknown_item",
            "The checklist included answers to questions this practice does not ask ("
            + ", ".join(unknown)
            + "). Please reload the page and go through the checklist again.",
            unknown,
        )
    consent_item = next((i for i in items if i.kind == "consent"), None)
    _check_consent_version(policy, submission, consent_item)
    details_item = next((i for i in items if i.kind == "details"), None)
    _check_details_shape(submission.details, details_item)
    if submission.answers_sealed is not None and not details_well_formed(submission.answers_sealed):
        raise _malformed("The sealed answers could not be read by the service as an encrypted message.")
    plan = submission.safety_plan  # optional, never required: only its shape is checked, if offered
    if plan is not None and not policy.safety.plan:
        raise _malformed("A safety plan was sent, but this practice does not offer one here.")
    if plan is not None and not details_well_formed(plan):
        raise _malformed("The safety plan could not be read by the service as an encrypted message.")

    passed = {item.id: _item_met(item, policy, submission, preflight) for item in items}
    _raise_for_required(items, passed, preflight)
    recommended_unmet = [i.id for i in items if not i.required and not passed[i.id]]
    return ChecklistResult(
        policy_version=policy.version,
        passed=passed,
        all_required_met=True,
        recommended_unmet=recommended_unmet,
        network=_network_summary(preflight),
        details=submission.details if details_item is not None else None,
        answers_sealed=submission.answers_sealed,
        safety_plan=submission.safety_plan,
    )


def _check_answer_types(answers: Mapping[str, Any]) -> None:
    bad = sorted(str(k) for k, v in answers.items() if not isinstance(k, str) or not isinstance(v, bool))
    if bad:
        raise ChecklistRejected(
            "checklist_malformed",
            "Some checklist answers were not yes or no. Please reload the page and try again.",
            bad,
        )


def _check_consent_version(policy: Policy, submission: Submission, consent_item: PolicyItem | None) -> None:
    if consent_item is None or submission.consent_version is None or policy.consent is None:
        return
    if submission.consent_version != policy.consent.version:
        raise ChecklistRejected(
            "consent_outdated",
            "The consent text was updated after you accepted it. Please reload the page, read the current text "
            "and accept it again.",
            [consent_item.id],
        )


def _check_details_shape(details: str | None, details_item: PolicyItem | None) -> None:
    if details is None:
        return
    if details_item is None:
        raise ChecklistRejected(
            "details_invalid",
            "Emergency details were sent, but this practice does not collect them here. Please reload the page.",
        )
    if not details_well_formed(details):
        raise ChecklistRejected(
            "details_invalid",
            "Your emergency details could not be read by the service as an encrypted message. Please enter "
            "them again; if this keeps happening, reload the page.",
            [details_item.id],
        )


def _item_met(item: PolicyItem, policy: Policy, submission: Submission, preflight: PreflightResult | None) -> bool:
    if item.kind == "automatic" and item.check == "preflight":
        return preflight is not None and bool(preflight.connected)
    if item.kind in ("automatic", "attested"):
        return submission.answers.get(item.id) is True
    if item.kind == "consent":
        return (
            policy.consent is not None
            and submission.consent_version == policy.consent.version
            and submission.answers.get(item.id) is not False
        )
    if item.kind == "details":
        return submission.details is not None and details_well_formed(submission.details)
    return False


def _raise_for_required(items: list[PolicyItem], passed: dict[str, bool], preflight: PreflightResult | None) -> None:
    missing = [i for i in items if i.required and not passed[i.id]]
    plain = [i for i in missing if i.kind != "details" and i.check != "preflight"]
    if plain:
        raise ChecklistRejected(
            "checklist_incomplete",
            "Some required steps are not done yet: "
            + "; ".join(f"\u201c{i.text}\u201d" for i in plain)
            + ". Please complete them and submit the checklist again.",
            [i.id for i in plain],
        )
    details = [i for i in missing if i.kind == "details"]
    if details:
        raise ChecklistRejected(
            "details_missing",
            "Please fill in where you are today and an emergency contact before joining. Only your therapist can "
            "read them.",
            [i.id for i in details],
        )
    network = [i for i in missing if i.kind == "automatic" and i.check == "preflight"]
    if network and preflight is None:
        raise ChecklistRejected(
            "preflight_missing",
            "The network check has not been run yet, or its result has expired. Please run the network check "
            "again, then submit the checklist.",
            [i.id for i in network],
        )
    if network:
        raise ChecklistRejected(
            "preflight_failed",
            "The network check could not connect to the service. Please try another network (for example mobile "
            "data instead of a work or public Wi-Fi) and run the check again.",
            [i.id for i in network],
        )


def _network_summary(preflight: PreflightResult | None) -> dict[str, Any] | None:
    """Content-free network facts for the therapist: round-trip time (rounded) and whether a relay was used."""
    if preflight is None:
        return None
    rtt = preflight.rtt_ms_median
    return {
        "connected": bool(preflight.connected),
        "rtt_ms": round(rtt) if rtt is not None else None,
        "relayed": bool(preflight.relayed),
    }
