"""The shared vectors of the client's safety plan (docs/protocol.md 7.4.3).

``build_safety_plan_vectors()`` computes them with broker/crypto/safety_plan.py from fixed inputs;
``tests/crypto/test_e2ee.py`` writes them into tests/vectors/e2ee.json with the others,
tests/crypto/test_safety_plan.py recomputes them with the standard library and AES-GCM alone, and
tests/crypto/test_e2ee_browser.py replays them against web/js/safety_plan.js.
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from broker.crypto.link_key import b64url_decode, b64url_encode, decode_link_key
from broker.crypto.safety_plan import (
    SafetyPlan,
    derive_safety_plan_key,
    safety_plan_aad,
    safety_plan_plaintext,
    seal_safety_plan,
)
from broker.crypto.seat_keys import seat_key

SECRET = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8"
SESSION = "s_7kQ2mX"


def _seal_raw(key: bytes, session: str, peer: str, plaintext: str, nonce: bytes) -> str:
    """Any plaintext sealed as a plan would be: for the ones a receiver must refuse."""
    return b64url_encode(nonce + AESGCM(derive_safety_plan_key(key, session)).encrypt(
        nonce, plaintext.encode("utf-8"), safety_plan_aad(session, peer)))  # fmt: skip


def build_safety_plan_vectors() -> dict[str, Any]:
    """Vector group ``safety_plan``: plans a client seals with its seat key (``valid``: with the
    plan they open to), and sealed plans that must not open for seat ``seat-1`` (``invalid``)."""
    k_1 = seat_key(decode_link_key(SECRET), SESSION, "seat-1")
    k_2 = seat_key(decode_link_key(SECRET), SESSION, "seat-2")
    cases = [
        (SafetyPlan("Is it raining there?", False, "Text me first: 0123 456"), "000102030405060708090a0b"),
        (SafetyPlan("  Blaue Tasse  ", None, ""), "0c0d0e0f1011121314151617"),
        (SafetyPlan("", True, "Mobile, after 6 pm 🙂"), "000000000000000000000000"),
    ]
    valid = [
        {
            "seat_key": b64url_encode(k_1),
            "session_id": SESSION,
            "peer": "seat-1",
            "k_plan_hex": derive_safety_plan_key(k_1, SESSION).hex(),
            "nonce_hex": nonce,
            "code_word": plan.code_word,
            "call_back": plan.call_back,
            "how": plan.how,
            "plaintext": safety_plan_plaintext(plan),
            "opened": {"code_word": plan.code_word.strip(), "call_back": plan.call_back, "how": plan.how.strip()},
            "sealed": seal_safety_plan(k_1, SESSION, "seat-1", plan, nonce=bytes.fromhex(nonce)),
        }
        for plan, nonce in cases
    ]
    nonce = bytes(12)
    good = SafetyPlan("Is it raining there?", False, "")
    invalid = [
        {"what": what, "seat_key": b64url_encode(k_1), "session_id": SESSION, "peer": "seat-1", "sealed": sealed}
        for what, sealed in [
            ("sealed for another seat", seal_safety_plan(k_2, SESSION, "seat-2", good, nonce=nonce)),
            ("another seat's blob, re-addressed", seal_safety_plan(k_1, SESSION, "seat-2", good, nonce=nonce)),
            ("another session", seal_safety_plan(k_1, "s_other", "seat-1", good, nonce=nonce)),
            ("one bit flipped", _flip(seal_safety_plan(k_1, SESSION, "seat-1", good, nonce=nonce))),
            ("not a JSON object", _seal_raw(k_1, SESSION, "seat-1", '["Is it raining there?"]', nonce)),
            ("call_back not a boolean", _seal_raw(k_1, SESSION, "seat-1", '{"code_word":"x","call_back":1}', nonce)),
            ("code_word not text", _seal_raw(k_1, SESSION, "seat-1", '{"code_word":7,"call_back":null}', nonce)),
            ("not JSON", _seal_raw(k_1, SESSION, "seat-1", "Is it raining there?", nonce)),
            ("too short", "AAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
        ]
    ]
    return {"safety_plan": {"valid": valid, "invalid": invalid}}


def _flip(sealed: str) -> str:
    """The same blob with one bit of its ciphertext changed."""
    blob = bytearray(b64url_decode(sealed))
    blob[14] ^= 0x01
    return b64url_encode(bytes(blob))
