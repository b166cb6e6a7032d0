"""The shared vectors of the media frame format (tests/vectors/sframe.json, docs/protocol.md 7.12).

``build_sframe_vectors()`` computes every vector with broker/crypto/sframe.py from fixed inputs;
after a deliberate format change rewrite the file with ``python -m tests.crypto.sframe_vectors``
from the repository root. tests/crypto/test_sframe.py checks the Python module against the file
(and recomputes the key schedule with the standard library), tests/crypto/sframe_vectors.mjs
checks web/js/sframe.js against it under Node.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from broker.crypto.sframe import (
    CIPHER_SUITE,
    REPLAY_WINDOW,
    RETIRED_KEY_GRACE_SECONDS,
    SENDER_SLOTS,
    VP8_DELTA_CLEAR_BYTES,
    VP8_KEYFRAME_CLEAR_BYTES,
    derive_sender_key,
    encode_header,
    encrypt_frame,
    kid_for,
)

VECTORS_PATH = Path(__file__).resolve().parents[1] / "vectors" / "sframe.json"

BASE_KEYS = [
    bytes(range(16)),
    bytes.fromhex("ff" * 16 + "a5" * 16),
    bytes(range(100, 164)),
]
KIDS = [0, 7, 8, 255, 256, kid_for(3, 1), kid_for(31, 70_000), 2**32 + 5, 2**64 - 1]
COUNTERS = [0, 1, 7, 8, 200, 65_535, 2**32, 2**32 + 17, 2**53 + 1, 2**64 - 1]
SIZES = [0, 1, 100, 3000]


def frame_bytes(size: int, seed: int = 0) -> bytes:
    """A fixed, patterned frame of ``size`` bytes (no randomness: the vectors must not move)."""
    return bytes((i * 7 + seed * 13 + 3) % 256 for i in range(size))


def _frame(base_key: bytes, kid: int, counter: int, frame: bytes, clear: int) -> dict[str, Any]:
    key = derive_sender_key(base_key, kid)
    return {
        "base_key": base_key.hex(),
        "kid": str(kid),
        "counter": str(counter),
        "clear_bytes": clear,
        "frame": frame.hex(),
        "header": encode_header(kid, counter).hex(),
        "output": encrypt_frame(key, counter, frame, clear).hex(),
    }


def _negatives() -> list[dict[str, Any]]:
    base, other = BASE_KEYS[0], BASE_KEYS[1]
    good = _frame(base, 3, 41, frame_bytes(100, 1), 0)
    vp8 = _frame(base, 3, 42, frame_bytes(100, 2), VP8_KEYFRAME_CLEAR_BYTES)
    out = bytes.fromhex(good["output"])
    vp8_out = bytes.fromhex(vp8["output"])
    ring = [{"base_key": base.hex(), "kid": "3"}]

    def flip(data: bytes, at: int) -> str:
        changed = bytearray(data)
        changed[at] ^= 0x01
        return changed.hex()

    def case(name: str, error: str, data: str, **extra: Any) -> dict[str, Any]:
        return {"name": name, "error": error, "keyring": ring, "before": [], "clear_bytes": 0, "input": data} | extra

    far = _frame(base, 3, 41 + REPLAY_WINDOW, frame_bytes(10, 3), 0)
    return [
        case("tampered_tag", "bad_tag", flip(out, len(out) - 1)),
        case("tampered_ciphertext", "bad_tag", flip(out, 5)),
        case("tampered_counter", "bad_tag", encode_header(3, 40).hex() + out[2:].hex()),
        case("tampered_clear_prefix", "bad_tag", flip(vp8_out, 0), clear_bytes=VP8_KEYFRAME_CLEAR_BYTES),
        case("wrong_clear_length", "bad_tag", vp8["output"], clear_bytes=VP8_DELTA_CLEAR_BYTES),
        case("wrong_kid", "unknown_kid", _frame(base, 4, 41, frame_bytes(100, 1), 0)["output"]),
        case("same_kid_other_key", "bad_tag", _frame(other, 3, 41, frame_bytes(100, 1), 0)["output"]),
        case("truncated_header", "malformed", "f8" + "0102"),
        case("truncated_counter", "malformed", "0f" + "01020304"),
        case("empty", "malformed", ""),
        case("shorter_than_tag", "malformed", out[: 2 + 15].hex()),
        case("non_minimal_kid", "malformed", "8803" + out[1:].hex()),
        case("non_minimal_counter", "malformed", "39" + "0029" + out[2:].hex()),
        case("clear_prefix_longer_than_input", "malformed", "0102", clear_bytes=VP8_KEYFRAME_CLEAR_BYTES),
        case("replayed_counter", "replayed", good["output"], before=[good["output"]]),
        case("older_than_window", "replayed", good["output"], before=[far["output"]]),
        case("dropped_kid", "unknown_kid", good["output"], keyring=[]),
    ]


def build_sframe_vectors() -> dict[str, Any]:
    """Every group of the file; integers that may pass 2**53 are decimal strings (JSON in JS)."""
    frames = []
    for i, size in enumerate(SIZES):
        for j, counter in enumerate(COUNTERS if size < 1000 else COUNTERS[::4]):
            base = BASE_KEYS[(i + j) % len(BASE_KEYS)]
            kid = KIDS[(i * 3 + j) % len(KIDS)]
            frames.append(_frame(base, kid, counter, frame_bytes(size, i + j), 0))
    frames.append(_frame(BASE_KEYS[0], 1, 9, frame_bytes(600, 4), VP8_KEYFRAME_CLEAR_BYTES))
    frames.append(_frame(BASE_KEYS[2], kid_for(2, 5), 2**32 + 1, frame_bytes(300, 5), VP8_DELTA_CLEAR_BYTES))
    frames.append(_frame(BASE_KEYS[1], 2, 3, frame_bytes(3, 6), VP8_DELTA_CLEAR_BYTES))
    keys = []
    for base in BASE_KEYS:
        for kid in KIDS:
            derived = derive_sender_key(base, kid)
            keys.append({"base_key": base.hex(), "kid": str(kid), "key": derived.key.hex(), "salt": derived.salt.hex()})
    headers = [
        {"kid": str(kid), "counter": str(ctr), "header": encode_header(kid, ctr).hex()}
        for kid in KIDS
        for ctr in COUNTERS[::3]
    ]
    kid_layout = [
        {"slot": slot, "generation": str(gen), "kid": str(kid_for(slot, gen))}
        for slot, gen in [(0, 0), (7, 0), (8, 0), (31, 0), (0, 1), (5, 3), (31, 2**59 - 1)]
    ]
    return {
        "cipher_suite": CIPHER_SUITE,
        "replay_window": REPLAY_WINDOW,
        "sender_slots": SENDER_SLOTS,
        "retired_key_grace_ms": RETIRED_KEY_GRACE_SECONDS * 1000,
        "vp8_clear_bytes": {"key": VP8_KEYFRAME_CLEAR_BYTES, "delta": VP8_DELTA_CLEAR_BYTES},
        "headers": headers,
        "keys": keys,
        "kid_layout": kid_layout,
        "frames": frames,
        "negative": _negatives(),
    }


if __name__ == "__main__":
    VECTORS_PATH.write_text(json.dumps(build_sframe_vectors(), indent=1) + "\n", encoding="utf-8")
