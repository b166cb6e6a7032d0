"""The sealed word to the waiting room (docs/protocol.md 7.4.2): the shared vectors recomputed
independently, and what must not open (another seat, session or key, an altered blob)."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from broker.crypto.link_key import b64url_decode, b64url_encode, decode_link_key
from broker.crypto.seat_keys import seat_key
from broker.crypto.waiting_note import MAX_NOTE_CHARS, NoteError, note_plaintext, open_note, seal_note
from tests.crypto.test_e2ee import ref_hkdf, ref_key, ref_lp, vectors

SESSION = "s_note01"


def test_note_vectors_independently() -> None:
    """Key, associated data and ciphertext as the document defines them, from the standard library
    and the raw AES-GCM primitive: the seat key from the session secret, K_note from it."""
    cases = vectors()["waiting_note"]["valid"]
    assert len(cases) >= 3
    for case in cases:
        secret = ref_key(case["session_secret"])
        sid = case["session_id"].encode()
        k_seat = ref_hkdf(secret, sid, ref_lp("tt-seat v1") + ref_lp(case["peer"]))
        assert base64.urlsafe_b64encode(k_seat).rstrip(b"=").decode() == case["seat_key"]
        k_note = ref_hkdf(k_seat, sid, b"waiting-note v1")
        assert k_note.hex() == case["k_note_hex"]
        assert case["plaintext"] == json.dumps(
            {"text": case["text"].strip()}, ensure_ascii=False, separators=(",", ":")
        )
        aad = ref_lp("tt-note v1") + ref_lp(case["session_id"]) + ref_lp(case["peer"])
        nonce = bytes.fromhex(case["nonce_hex"])
        blob = nonce + AESGCM(k_note).encrypt(nonce, case["plaintext"].encode(), aad)
        assert base64.urlsafe_b64encode(blob).rstrip(b"=").decode() == case["sealed"]


def test_note_vectors_open_and_invalid_ones_do_not() -> None:
    for case in vectors()["waiting_note"]["valid"]:
        key = decode_link_key(case["seat_key"])
        assert open_note(key, case["session_id"], case["peer"], case["sealed"]) == case["text"].strip()
    invalid = vectors()["waiting_note"]["invalid"]
    assert {c["what"] for c in invalid} >= {"sealed for seat-2, delivered to seat-1", "another session"}
    for case in invalid:
        with pytest.raises(NoteError):
            open_note(decode_link_key(case["seat_key"]), case["session_id"], case["peer"], case["sealed"])


def test_a_client_cannot_open_a_note_sealed_for_another_seat() -> None:
    secret = decode_link_key("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8")
    k_1, k_2 = seat_key(secret, SESSION, "seat-1"), seat_key(secret, SESSION, "seat-2")
    sealed = seal_note(k_1, SESSION, "seat-1", "Running 5 minutes late")
    assert open_note(k_1, SESSION, "seat-1", sealed) == "Running 5 minutes late"
    for key, peer in ((k_2, "seat-2"), (k_2, "seat-1"), (k_1, "seat-2")):
        with pytest.raises(NoteError):
            open_note(key, SESSION, peer, sealed)
    assert seal_note(k_1, SESSION, "seat-1", "x") != seal_note(k_1, SESSION, "seat-1", "x")  # random nonces


def test_note_length_and_shape_are_enforced() -> None:
    assert note_plaintext(" hi ") == '{"text":"hi"}'
    for bad in ("", "   ", "x" * (MAX_NOTE_CHARS + 1)):
        with pytest.raises(ValueError):
            note_plaintext(bad)
    assert note_plaintext("€" * MAX_NOTE_CHARS)  # characters, not bytes
    key = decode_link_key("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8")
    from broker.crypto.waiting_note import derive_note_key, note_aad

    def sealed_text(plain: str) -> str:
        nonce = bytes(12)
        blob = nonce + AESGCM(derive_note_key(key, SESSION)).encrypt(nonce, plain.encode(), note_aad(SESSION, "p"))
        return b64url_encode(blob)

    for plain in ("[]", '{"text":1}', '{"text":"a","x":1}', '{"text":""}', "not json"):
        with pytest.raises(NoteError):
            open_note(key, SESSION, "p", sealed_text(plain))
    with pytest.raises(NoteError):
        open_note(key, SESSION, "p", "A" * 20)
    assert len(b64url_decode(sealed_text('{"text":"a"}'))) == 12 + 12 + 16
