"""Seat keys, client-pair keys and the therapist's roster (broker/crypto/seat_keys.py, roster.py).

The vectors are recomputed here with the standard library only, so a change to either
implementation that the vectors file followed by accident would still be caught.
"""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from broker.crypto.link_key import b64url_decode, decode_link_key, new_link_key
from broker.crypto.roster import MAX_ROSTER_PEERS, RosterEntry, parse_roster_plaintext, roster_plaintext
from broker.crypto.sdp_auth import InterceptionError
from broker.crypto.sealed_signaling import open_signal
from broker.crypto.seat_keys import client_pair_key, group_key, pair_link_key, seat_key
from tests.crypto.seat_vectors import FP_1
from tests.crypto.test_e2ee import ref_b64url, ref_hkdf, ref_key, ref_lp, ref_pair_key, vectors


def test_seat_key_vectors_independently() -> None:
    for case in vectors()["seat_key"]:
        info = ref_lp("tt-seat v1") + ref_lp(case["peer"])
        expected = ref_hkdf(ref_key(case["session_secret"]), case["session_id"].encode(), info)
        assert case["seat_key"] == ref_b64url(expected)


def test_group_key_vectors_independently() -> None:
    for case in vectors()["group_key"]:
        expected = ref_hkdf(ref_key(case["session_secret"]), case["session_id"].encode(), ref_lp("tt-group v1"))
        assert case["group_key"] == ref_b64url(expected)


def test_client_pair_key_vectors_independently() -> None:
    for case in vectors()["client_pair_key"]:
        lo, hi = sorted((case["a"], case["b"]))
        info = ref_lp("tt-clients v1") + ref_lp(lo) + ref_lp(hi)
        expected = ref_hkdf(ref_key(case["session_secret"]), case["session_id"].encode(), info)
        assert case["client_pair_key"] == ref_b64url(expected)


def _ref_direction_key(case: dict[str, Any]) -> bytes:
    k_auth = ref_hkdf(ref_key(case["seat_key"]), case["session_id"].encode(), b"sdp-auth v1")
    k_pair = ref_pair_key(k_auth, case["sender"], case["recipient"])
    info = ref_lp("tt-seal v1") + ref_lp(case["sender"]) + ref_lp(case["recipient"])
    return ref_hkdf(k_pair, b"", info)


def _ref_aad(case: dict[str, Any], counter: int) -> bytes:
    parts = [ref_lp(x) for x in ("tt-seal v1", case["session_id"], case["sender"], case["recipient"], "roster")]
    return b"".join(parts) + counter.to_bytes(8, "big")


def test_roster_vector_opens_independently_under_the_recipients_seat_key() -> None:
    (case,) = vectors()["roster"]
    seat = ref_hkdf(
        ref_key(case["session_secret"]), case["session_id"].encode(), ref_lp("tt-seat v1") + ref_lp("seat-1")
    )
    assert ref_b64url(seat) == case["seat_key"]
    key = _ref_direction_key(case)
    assert key.hex() == case["k_seal_hex"]
    blob = b64url_decode(case["sealed"])
    assert blob[:12].hex() == case["nonce_hex"]
    plain = AESGCM(key).decrypt(blob[:12], blob[12:], _ref_aad(case, case["counter"]))
    assert plain.decode() == case["plaintext"]
    version, entries = parse_roster_plaintext(plain.decode())
    assert [e.peer for e in entries] == ["seat-2", "seat-3"] and entries[1].held


def test_roster_invalid_vectors_are_refused_for_their_reason() -> None:
    cases = vectors()["roster_invalid"]
    assert {c["reason"] for c in cases} == {"bad_mac", "malformed"}
    for case in cases:
        with pytest.raises(InterceptionError) as caught:
            if "sealed" in case:
                key = _ref_direction_key(case)
                open_signal(key, case["session_id"], case["sender"], case["recipient"], "roster", case["counter"],
                            case["sealed"])  # fmt: skip
            else:
                parse_roster_plaintext(case["plaintext"])
        assert caught.value.reason == case["reason"], case["what"]


def test_every_seat_gets_its_own_key_and_none_is_the_session_secret() -> None:
    secret = decode_link_key(new_link_key())
    keys = {seat_key(secret, "s1", f"seat-{i}") for i in range(15)} | {group_key(secret, "s1"), secret}
    assert len(keys) == 17
    assert seat_key(secret, "s1", "a") != seat_key(secret, "s2", "a")
    assert client_pair_key(secret, "s1", "a", "b") == client_pair_key(secret, "s1", "b", "a")
    assert client_pair_key(secret, "s1", "a", "b") not in {seat_key(secret, "s1", "a"), seat_key(secret, "s1", "b")}


def test_pair_link_key_follows_the_seat_kind() -> None:
    secret = decode_link_key(new_link_key())
    assert pair_link_key(secret, "s", "p") == seat_key(secret, "s", "p")
    assert pair_link_key(secret, "s", "p", group_seat=True) == group_key(secret, "s")
    assert pair_link_key(secret, "s", "p", seat_keys=False) == secret
    with pytest.raises(ValueError):
        seat_key(b"short", "s", "p")


def test_roster_plaintext_sorts_and_refuses_what_a_receiver_would() -> None:
    key = new_link_key()
    text = roster_plaintext(5, [RosterEntry("b", FP_1, key, False), RosterEntry("a", FP_1, key, True)])
    assert text.startswith('{"version":5,"peers":[{"peer":"a",')
    assert parse_roster_plaintext(text)[0] == 5
    with pytest.raises(ValueError):
        roster_plaintext(1, [RosterEntry("a", FP_1, key, False)] * 2)
    with pytest.raises(ValueError):
        roster_plaintext(1, [RosterEntry(f"p{i}", FP_1, key, False) for i in range(MAX_ROSTER_PEERS + 1)])
    with pytest.raises(ValueError):
        roster_plaintext(1, [RosterEntry("a", FP_1.lower(), key, False)])
