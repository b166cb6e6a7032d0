"""The media frame format for frames sent through Janus (broker/crypto/sframe.py, web/js/sframe.js;
docs/protocol.md 7.12): the shared vectors in tests/vectors/sframe.json, the key schedule
recomputed with the standard library, round trips, every refusal with its error code, the
replay window, and frames crossing between Node (the JS module) and Python in both directions.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.crypto.sframe import (
    CIPHER_SUITE,
    MAX_VALUE,
    REPLAY_WINDOW,
    SENDER_SLOTS,
    Keyring,
    SFrameError,
    decode_header,
    decrypt_frame,
    derive_sender_key,
    encode_header,
    encrypt_frame,
    kid_for,
    kid_parts,
)
from tests.crypto.sframe_vectors import VECTORS_PATH, build_sframe_vectors

VECTORS: dict[str, Any] = json.loads(VECTORS_PATH.read_text(encoding="utf-8"))
NODE_SCRIPT = Path(__file__).with_name("sframe_vectors.mjs")
BASE = bytes(range(16))


def ring_of(*keys: tuple[bytes, int]) -> Keyring:
    ring = Keyring()
    for base, kid in keys:
        ring.add(derive_sender_key(base, kid))
    return ring


def refusal(ring: Keyring, data: bytes, clear_bytes: int = 0) -> str:
    try:
        ring.open(data, clear_bytes)
    except SFrameError as err:
        return err.code
    return "accepted"


# ---------------------------------------------------------------- the vectors


def test_the_vectors_file_is_what_the_module_builds() -> None:
    assert build_sframe_vectors() == VECTORS
    assert VECTORS["cipher_suite"] == CIPHER_SUITE == 0x0004


def test_the_vectors_cover_small_and_large_kids_counters_and_sizes() -> None:
    frames = VECTORS["frames"]
    kids = {int(f["kid"]) for f in frames}
    counters = {int(f["counter"]) for f in frames}
    sizes = {len(f["frame"]) // 2 for f in frames}
    assert min(kids) < 8 and max(kids) == MAX_VALUE and any(8 <= k < 256 for k in kids)
    assert {0, 1, 2**32, MAX_VALUE} <= counters
    assert {0, 1, 100} <= sizes and max(sizes) >= 3000
    assert {f["clear_bytes"] for f in frames} == {0, 3, 10}
    assert {n["error"] for n in VECTORS["negative"]} == {"unknown_kid", "replayed", "bad_tag", "malformed"}


def test_headers_match_the_vectors_both_ways() -> None:
    for case in VECTORS["headers"]:
        kid, counter = int(case["kid"]), int(case["counter"])
        assert encode_header(kid, counter).hex() == case["header"]
        assert decode_header(bytes.fromhex(case["header"]) + b"rest") == (kid, counter, len(case["header"]) // 2)


def test_headers_independently() -> None:
    """The config byte X|K|Y|C by hand: values below 8 inline, larger ones as shortest big-endian."""

    def nibble_and_tail(value: int) -> tuple[int, bytes]:
        if value < 8:
            return value, b""
        tail = value.to_bytes(8, "big").lstrip(b"\0")
        return 8 + len(tail) - 1, tail

    for case in VECTORS["headers"]:
        (kn, kt), (cn, ct) = nibble_and_tail(int(case["kid"])), nibble_and_tail(int(case["counter"]))
        assert bytes([kn * 16 + cn]) + kt + ct == bytes.fromhex(case["header"])


def test_kid_layout_matches_the_vectors() -> None:
    for case in VECTORS["kid_layout"]:
        assert kid_for(case["slot"], int(case["generation"])) == int(case["kid"])
        assert kid_parts(int(case["kid"])) == (case["slot"], int(case["generation"]))
    assert VECTORS["sender_slots"] == SENDER_SLOTS


def _hkdf_sha256(ikm: bytes, info: bytes, length: int) -> bytes:
    prk = hmac.new(b"\0" * 32, ikm, hashlib.sha256).digest()
    block, out, n = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([n]), hashlib.sha256).digest()
        out, n = out + block, n + 1
    return out[:length]


def test_keys_match_the_vectors_and_are_recomputed_independently() -> None:
    """RFC 9605's schedule with hmac and hashlib only: label || KID (8 bytes) || suite (2 bytes)."""
    for case in VECTORS["keys"]:
        base, kid = bytes.fromhex(case["base_key"]), int(case["kid"])
        derived = derive_sender_key(base, kid)
        assert (derived.key.hex(), derived.salt.hex()) == (case["key"], case["salt"])
        tail = kid.to_bytes(8, "big") + (4).to_bytes(2, "big")
        assert _hkdf_sha256(base, b"SFrame 1.0 Secret key " + tail, 16).hex() == case["key"]
        assert _hkdf_sha256(base, b"SFrame 1.0 Secret salt " + tail, 12).hex() == case["salt"]
    assert len({c["key"] for c in VECTORS["keys"]}) == len(VECTORS["keys"])


def test_frames_match_the_vectors_and_open() -> None:
    for case in VECTORS["frames"]:
        key = derive_sender_key(bytes.fromhex(case["base_key"]), int(case["kid"]))
        frame, counter, clear = bytes.fromhex(case["frame"]), int(case["counter"]), case["clear_bytes"]
        output = bytes.fromhex(case["output"])
        assert encrypt_frame(key, counter, frame, clear) == output
        assert output[clear:].startswith(bytes.fromhex(case["header"]))
        assert output[:clear] == frame[:clear]
        opened = decrypt_frame(ring_of((bytes.fromhex(case["base_key"]), int(case["kid"]))), output, clear)
        assert (opened.frame, opened.kid, opened.counter) == (frame, int(case["kid"]), counter)


def test_frames_independently() -> None:
    """nonce = salt XOR counter (12 bytes), aad = header || clear prefix, tag appended."""
    for case in VECTORS["frames"]:
        key = derive_sender_key(bytes.fromhex(case["base_key"]), int(case["kid"]))
        frame, clear = bytes.fromhex(case["frame"]), case["clear_bytes"]
        header = bytes.fromhex(case["header"])
        nonce = bytes(a ^ b for a, b in zip(key.salt, int(case["counter"]).to_bytes(12, "big"), strict=True))
        sealed = AESGCM(key.key).encrypt(nonce, frame[clear:], header + frame[:clear])
        assert frame[:clear] + header + sealed == bytes.fromhex(case["output"])


@pytest.mark.parametrize("case", VECTORS["negative"], ids=lambda c: c["name"])
def test_every_negative_vector_is_refused_with_its_error(case: dict[str, Any]) -> None:
    ring = ring_of(*((bytes.fromhex(k["base_key"]), int(k["kid"])) for k in case["keyring"]))
    for earlier in case["before"]:
        assert refusal(ring, bytes.fromhex(earlier), case["clear_bytes"]) == "accepted"
    assert refusal(ring, bytes.fromhex(case["input"]), case["clear_bytes"]) == case["error"]


# ---------------------------------------------------------------- round trips and refusals


@settings(max_examples=150, deadline=None)
@given(
    base=st.binary(min_size=16, max_size=64),
    kid=st.integers(0, MAX_VALUE),
    counter=st.integers(0, MAX_VALUE),
    frame=st.binary(max_size=2000),
    data=st.data(),
)
def test_any_frame_round_trips(base: bytes, kid: int, counter: int, frame: bytes, data: st.DataObject) -> None:
    clear = data.draw(st.integers(0, min(len(frame), 16)))
    key = derive_sender_key(base, kid)
    sealed = encrypt_frame(key, counter, frame, clear)
    assert len(sealed) == len(frame) + len(encode_header(kid, counter)) + 16
    opened = ring_of((base, kid)).open(sealed, clear)
    assert (opened.frame, opened.kid, opened.counter) == (frame, kid, counter)


@settings(max_examples=150, deadline=None)
@given(frame=st.binary(max_size=300), counter=st.integers(0, 2**40), data=st.data())
def test_any_changed_bit_is_refused(frame: bytes, counter: int, data: st.DataObject) -> None:
    sealed = bytearray(encrypt_frame(derive_sender_key(BASE, 5), counter, frame))
    at = data.draw(st.integers(0, len(sealed) - 1))
    sealed[at] ^= 1 << data.draw(st.integers(0, 7))
    assert refusal(ring_of((BASE, 5)), bytes(sealed)) in {"bad_tag", "malformed", "unknown_kid"}


def test_the_replay_window() -> None:
    """Late frames inside the window pass once; duplicates and frames older than it are refused."""
    key = derive_sender_key(BASE, 2)
    ring = ring_of((BASE, 2))
    top = REPLAY_WINDOW + 4
    sealed = {c: encrypt_frame(key, c, b"frame %d" % c) for c in (2, 3, 4, 5, 6, top, top + 1)}
    assert [refusal(ring, sealed[c]) for c in (5, 3, 4, 3)] == ["accepted", "accepted", "accepted", "replayed"]
    assert refusal(ring, sealed[top]) == "accepted"
    assert refusal(ring, sealed[6]) == "accepted"  # REPLAY_WINDOW - 2 behind the highest: still inside
    assert refusal(ring, sealed[5]) == "replayed"  # REPLAY_WINDOW - 1 behind, and already seen
    assert refusal(ring, sealed[2]) == "replayed"  # never seen, but REPLAY_WINDOW + 2 behind
    assert refusal(ring, sealed[top + 1]) == "accepted"
    assert refusal(ring, sealed[top]) == "replayed"


def test_a_forged_frame_does_not_use_up_its_counter() -> None:
    key = derive_sender_key(BASE, 2)
    real = encrypt_frame(key, 9, b"real")
    forged = encrypt_frame(derive_sender_key(bytes(range(1, 17)), 2), 9, b"forged")
    ring = ring_of((BASE, 2))
    assert refusal(ring, forged) == "bad_tag"
    assert ring.open(real).frame == b"real"


def test_rotation_new_kid_and_dropped_kid() -> None:
    """A rotation gives a new KID; the old one opens frames in flight until dropped, then not."""
    old_kid, new_kid = kid_for(3, 0), kid_for(3, 1)
    old, new = derive_sender_key(BASE, old_kid), derive_sender_key(bytes(range(20, 36)), new_kid)
    ring = Keyring()
    ring.add(old)
    ring.add(new)
    assert ring.kids() == {old_kid, new_kid}
    assert ring.open(encrypt_frame(old, 7, b"in flight")).frame == b"in flight"
    ring.drop(old_kid)
    assert refusal(ring, encrypt_frame(old, 8, b"late")) == "unknown_kid"
    assert ring.open(encrypt_frame(new, 0, b"after")).kid == new_kid


def test_re_adding_the_same_key_keeps_its_window() -> None:
    key = derive_sender_key(BASE, 1)
    ring = ring_of((BASE, 1))
    sealed = encrypt_frame(key, 3, b"x")
    ring.open(sealed)
    ring.add(derive_sender_key(BASE, 1))
    assert refusal(ring, sealed) == "replayed"


@pytest.mark.parametrize(
    "call",
    [
        lambda: derive_sender_key(bytes(15), 0),
        lambda: derive_sender_key(bytes(65), 0),
        lambda: derive_sender_key(BASE, -1),
        lambda: derive_sender_key(BASE, MAX_VALUE + 1),
        lambda: encrypt_frame(derive_sender_key(BASE, 0), MAX_VALUE + 1, b""),
        lambda: encrypt_frame(derive_sender_key(BASE, 0), -1, b""),
        lambda: encrypt_frame(derive_sender_key(BASE, 0), 0, b"ab", 3),
        lambda: kid_for(SENDER_SLOTS, 0),
        lambda: kid_for(0, -1),
        lambda: kid_for(0, MAX_VALUE),
        lambda: decode_header(b""),
    ],
)
def test_bad_input_is_malformed(call: Any) -> None:
    with pytest.raises(SFrameError) as caught:
        call()
    assert caught.value.code == "malformed"


def test_a_sender_key_never_prints_its_secrets() -> None:
    key = derive_sender_key(BASE, 3)
    assert key.key.hex() not in repr(key) and str(list(key.key)) not in repr(key)
    assert key.salt.hex() not in repr(key)


# ---------------------------------------------------------------- the JS module under Node


def run_node(ops: list[dict[str, Any]]) -> dict[str, Any]:
    node = shutil.which("node")
    assert node is not None, "Node.js is required (scripts/test installs it)"
    done = subprocess.run(
        [node, str(NODE_SCRIPT)], input=json.dumps({"ops": ops}), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


def test_the_js_module_matches_every_vector() -> None:
    answer = run_node([])
    assert answer["failures"] == []
    expected = 5 + 2 * len(VECTORS["headers"]) + 2 * len(VECTORS["kid_layout"]) + len(VECTORS["keys"])
    expected += 2 * len(VECTORS["frames"])
    expected += sum(1 + len(n["before"]) for n in VECTORS["negative"])
    assert answer["checked"] == expected


def test_frames_cross_between_js_and_python() -> None:
    """Random frames sealed in Python open in JS, frames sealed in JS open in Python; a replay and
    a frame under the wrong key are refused on the JS side with their codes."""
    base = os.urandom(32)
    kid = kid_for(4, 2)
    key = derive_sender_key(base, kid)
    frames = [os.urandom(n) for n in (0, 1, 100, 4096)]
    counters = [0, 9, 2**32 + 3, 2**60]
    to_js = [encrypt_frame(key, c, f, 3 if len(f) >= 3 else 0) for c, f in zip(counters, frames, strict=True)]
    common = {"base_key": base.hex(), "kid": str(kid)}
    ops: list[dict[str, Any]] = [
        {"op": "decrypt", "input": s.hex(), "clear_bytes": 3 if len(f) >= 3 else 0, **common}
        for s, f in zip(to_js, frames, strict=True)
    ]
    ops.append({"op": "decrypt", "input": to_js[1].hex(), "clear_bytes": 0, **common})
    wrong = encrypt_frame(derive_sender_key(os.urandom(16), kid), 2**60 + 1, b"other sender")
    ops.append({"op": "decrypt", "input": wrong.hex(), "clear_bytes": 0, **common})
    ops += [
        {"op": "encrypt", "counter": str(c + 1), "frame": f.hex(), "clear_bytes": 0, **common}
        for c, f in zip(counters, frames, strict=True)
    ]
    results = run_node(ops)["results"]
    for (opened, frame), counter in zip(zip(results[:4], frames, strict=True), counters, strict=True):
        assert opened == {"frame": frame.hex(), "kid": str(kid), "counter": str(counter)}
    assert results[4] == {"error": "replayed"}
    assert results[5] == {"error": "bad_tag"}
    ring = ring_of((base, kid))
    for sealed, frame, counter in zip(results[6:], frames, counters, strict=True):
        opened = ring.open(bytes.fromhex(sealed))
        assert (opened.frame, opened.counter) == (frame, counter + 1)
