"""The client's safety plan, sealed in the browser for the therapist alone (docs/protocol.md 7.4.3).

What a client may leave for the moment they cannot talk freely: a code word or phrase that means
so, whether the therapist may call back if the call drops, and how. It is sealed like the
emergency details: AES-256-GCM under a key of its own from the key the client's link carries (its
seat key), bound to the session and the seat, so the broker stores and forwards a ciphertext it
cannot read, and another client of the session cannot open it even given the blob.

``web/js/safety_plan.js`` implements the same; the ``safety_plan`` vectors in
tests/vectors/e2ee.json keep the two byte-for-byte identical. Nothing here logs plaintext.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from broker.crypto.link_key import LINK_KEY_BYTES, NONCE_BYTES, TAG_BYTES, b64url_decode, b64url_encode, lp, utf8

__all__ = [
    "MAX_CODE_WORD_CHARS",
    "MAX_HOW_CHARS",
    "SafetyPlan",
    "SafetyPlanError",
    "derive_safety_plan_key",
    "open_safety_plan",
    "safety_plan_aad",
    "safety_plan_plaintext",
    "seal_safety_plan",
]

SAFETY_PLAN_INFO: Final = b"safety-plan v1"
SAFETY_PLAN_LABEL: Final = "tt-safety-plan v1"
#: The longest code word or phrase, in characters (code points), after trimming blanks at both ends.
MAX_CODE_WORD_CHARS: Final = 100
#: The longest "how to call back", in characters (code points), after trimming.
MAX_HOW_CHARS: Final = 500


class SafetyPlanError(ValueError):
    """A sealed safety plan that does not open (altered, or sealed for another key, session or
    seat), or whose plaintext is not the JSON object of section 7.4.3."""


@dataclass(frozen=True)
class SafetyPlan:
    """What the client set. ``call_back``: True (may call back), False (do not), None (not said)."""

    code_word: str = ""
    call_back: bool | None = None
    how: str = ""


def derive_safety_plan_key(link_key: bytes, session_id: str) -> bytes:
    """K_plan = HKDF-SHA256(link key, salt = session id, info = "safety-plan v1"): a key of its own."""
    if len(link_key) != LINK_KEY_BYTES:
        raise ValueError("a link key is 32 bytes")
    return HKDF(hashes.SHA256(), 32, utf8(session_id), SAFETY_PLAN_INFO).derive(link_key)


def safety_plan_aad(session_id: str, peer_id: str) -> bytes:
    return lp(SAFETY_PLAN_LABEL) + lp(session_id) + lp(peer_id)


def safety_plan_plaintext(plan: SafetyPlan) -> str:
    """The JSON text the browser writes (``JSON.stringify``): code word and how trimmed.

    ValueError for a plan that says nothing (nothing is sealed then) or a field that is too long.
    """
    code_word, how = plan.code_word.strip(), plan.how.strip()
    if len(code_word) > MAX_CODE_WORD_CHARS:
        raise ValueError(f"a code word has at most {MAX_CODE_WORD_CHARS} characters")
    if len(how) > MAX_HOW_CHARS:
        raise ValueError(f"how to call back has at most {MAX_HOW_CHARS} characters")
    if plan.call_back is not None and not isinstance(plan.call_back, bool):
        raise ValueError("call_back is true, false or null")
    if not code_word and not how and plan.call_back is None:
        raise ValueError("an empty safety plan is not sealed")
    doc = {"code_word": code_word, "call_back": plan.call_back, "how": how}
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":"))


def seal_safety_plan(
    link_key: bytes, session_id: str, peer_id: str, plan: SafetyPlan, *, nonce: bytes | None = None
) -> str:
    """Seal a client's plan for the therapist, bound to its seat. ``nonce``: test vectors only."""
    if nonce is None:
        nonce = os.urandom(NONCE_BYTES)
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"nonce must be {NONCE_BYTES} bytes")
    key = derive_safety_plan_key(link_key, session_id)
    plaintext = utf8(safety_plan_plaintext(plan))
    return b64url_encode(nonce + AESGCM(key).encrypt(nonce, plaintext, safety_plan_aad(session_id, peer_id)))


def open_safety_plan(link_key: bytes, session_id: str, peer_id: str, sealed: str) -> SafetyPlan:
    """The plan a client sealed (the therapist's side); SafetyPlanError if it does not open or
    is not a plan. Members other than the three are ignored; a missing one reads as empty."""
    try:
        blob = b64url_decode(sealed)
    except ValueError:
        raise SafetyPlanError("a sealed safety plan is base64url") from None
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise SafetyPlanError("a sealed safety plan is too short")
    key = derive_safety_plan_key(link_key, session_id)
    try:
        plain = AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], safety_plan_aad(session_id, peer_id))
    except InvalidTag:
        raise SafetyPlanError(
            "the safety plan failed authentication: altered, or sealed for another seat or session"
        ) from None
    try:
        value = json.loads(plain.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise SafetyPlanError("the safety plan is not JSON text") from None
    if not isinstance(value, dict):
        raise SafetyPlanError("the safety plan is not a JSON object")
    code_word, call_back, how = value.get("code_word", ""), value.get("call_back"), value.get("how", "")
    if not isinstance(code_word, str) or not isinstance(how, str) or not isinstance(call_back, bool | None):
        raise SafetyPlanError("the safety plan's members are not of their types")
    return SafetyPlan(code_word=code_word, call_back=call_back, how=how)
