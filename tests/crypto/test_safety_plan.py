"""The client's safety plan, sealed for the therapist (docs/protocol.md 7.4.3): the shared vectors
recomputed independently, what must not open (another seat, session or key, an altered blob, a
plaintext of another shape), and the plaintext's rules."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from broker.crypto.link_key import decode_link_key
from broker.crypto.safety_plan import (
    MAX_CODE_WORD_CHARS,
    MAX_HOW_CHARS,
    SafetyPlan,
    SafetyPlanError,
    open_safety_plan,
    safety_plan_plaintext,
    seal_safety_plan,
)
from broker.crypto.sdp_authenticator import SdpAuthenticator
from broker.crypto.sealed_for_therapist import DetailsError, open_details
from broker.crypto.seat_keys import seat_key
from tests.crypto.test_e2ee import ref_hkdf, ref_key, ref_lp, vectors

SECRET = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8"
SESSION = "s_plan01"


def test_safety_plan_vectors_independently() -> None:
    """K_plan, the associated data and the ciphertext as the document defines them, from the
    standard library and the raw AES-GCM primitive."""
    cases = vectors()["safety_plan"]["valid"]
    assert len(cases) >= 3
    for case in cases:
        k_seat = ref_key(case["seat_key"])
        k_plan = ref_hkdf(k_seat, case["session_id"].encode(), b"safety-plan v1")
        assert k_plan.hex() == case["k_plan_hex"]
        doc = {"code_word": case["code_word"].strip(), "call_back": case["call_back"], "how": case["how"].strip()}
        assert case["plaintext"] == json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
        aad = ref_lp("tt-safety-plan v1") + ref_lp(case["session_id"]) + ref_lp(case["peer"])
        nonce = bytes.fromhex(case["nonce_hex"])
        blob = nonce + AESGCM(k_plan).encrypt(nonce, case["plaintext"].encode(), aad)
        assert base64.urlsafe_b64encode(blob).rstrip(b"=").decode() == case["sealed"]


def test_safety_plan_vectors_open_and_invalid_ones_do_not() -> None:
    for case in vectors()["safety_plan"]["valid"]:
        opened = open_safety_plan(decode_link_key(case["seat_key"]), case["session_id"], case["peer"], case["sealed"])
        assert opened == SafetyPlan(**case["opened"])
    invalid = vectors()["safety_plan"]["invalid"]
    assert {c["what"] for c in invalid} >= {"sealed for another seat", "not a JSON object", "call_back not a boolean"}
    for case in invalid:
        with pytest.raises(SafetyPlanError):
            open_safety_plan(decode_link_key(case["seat_key"]), case["session_id"], case["peer"], case["sealed"])


def test_another_client_of_the_session_cannot_open_a_plan_even_given_the_blob() -> None:
    """Couples and families: a seat key opens only its own seat's plan, and a plan is not emergency
    details (each has a key and a label of its own)."""
    secret = decode_link_key(SECRET)
    k_1, k_2 = seat_key(secret, SESSION, "seat-1"), seat_key(secret, SESSION, "seat-2")
    plan = SafetyPlan("Is it raining there?", False, "Text first")
    sealed = seal_safety_plan(k_1, SESSION, "seat-1", plan)
    assert open_safety_plan(k_1, SESSION, "seat-1", sealed) == plan
    for key, peer, session in ((k_2, "seat-2", SESSION), (k_2, "seat-1", SESSION), (k_1, "seat-2", SESSION),
                               (k_1, "seat-1", "s_other")):  # fmt: skip
        with pytest.raises(SafetyPlanError):
            open_safety_plan(key, session, peer, sealed)
    with pytest.raises(DetailsError):
        open_details(k_1, SESSION, "seat-1", sealed)
    assert seal_safety_plan(k_1, SESSION, "seat-1", plan) != sealed  # a fresh nonce every time


def test_the_therapists_side_opens_each_clients_plan_with_the_seat_key_it_derives() -> None:
    """What the therapist's page and the Python client do: the seat key from the session secret."""
    therapist = SdpAuthenticator(decode_link_key(SECRET), SESSION, "therapist", therapist=True)
    sealed = seal_safety_plan(seat_key(decode_link_key(SECRET), SESSION, "seat-2"), SESSION, "seat-2",
                              SafetyPlan("", True, "Mobile after 6"))  # fmt: skip
    assert therapist.open_safety_plan("seat-2", sealed) == SafetyPlan("", True, "Mobile after 6")
    with pytest.raises(SafetyPlanError):
        therapist.open_safety_plan("seat-1", sealed)


def test_the_plaintext_is_what_json_stringify_writes_and_nothing_empty_is_sealed() -> None:
    assert (
        safety_plan_plaintext(SafetyPlan(" Blue mug ", None, ""))
        == '{"code_word":"Blue mug","call_back":null,"how":""}'
    )
    assert safety_plan_plaintext(SafetyPlan("", False, "")) == '{"code_word":"","call_back":false,"how":""}'
    assert safety_plan_plaintext(SafetyPlan("Tee 🍵", True, "")) == '{"code_word":"Tee 🍵","call_back":true,"how":""}'
    with pytest.raises(ValueError, match="empty"):
        safety_plan_plaintext(SafetyPlan("   ", None, "  "))
    with pytest.raises(ValueError, match="code word"):
        safety_plan_plaintext(SafetyPlan("x" * (MAX_CODE_WORD_CHARS + 1)))
    with pytest.raises(ValueError, match="call back"):
        safety_plan_plaintext(SafetyPlan("ok", None, "🙂" * (MAX_HOW_CHARS + 1)))
    assert safety_plan_plaintext(SafetyPlan("🙂" * MAX_CODE_WORD_CHARS))  # code points, not bytes
    with pytest.raises(ValueError, match="call_back"):
        safety_plan_plaintext(SafetyPlan("ok", 1))  # type: ignore[arg-type]


def test_a_sealed_plan_fits_the_fields_the_broker_accepts() -> None:
    """The longest plan, in four-byte characters, stays within the checklist's 24-4096 characters."""
    from broker.checklist.policy import details_well_formed

    key = seat_key(decode_link_key(SECRET), SESSION, "seat-1")
    longest = SafetyPlan("🙂" * MAX_CODE_WORD_CHARS, False, "🙂" * MAX_HOW_CHARS)
    assert details_well_formed(seal_safety_plan(key, SESSION, "seat-1", longest))
