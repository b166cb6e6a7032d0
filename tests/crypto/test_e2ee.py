"""Tests of the end-to-end primitives in broker/crypto/ (link_key.py, sdp_auth.py,
sealed_signaling.py, sdp_authenticator.py, sealed_for_therapist.py): shared vectors,
independent recomputation, attacks.

The vectors in tests/vectors/e2ee.json are produced by ``build_vectors()`` below;
after a deliberate protocol change rewrite them with ``python -m tests.crypto.test_e2ee``
from the repository root.  They are not merely self-consistent: the
``*_independently`` tests recompute them with the standard library only (hmac,
hashlib, struct), and tests/crypto/test_e2ee_browser.py replays every one of them in
Chromium against web/js/e2ee.js.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from broker.crypto.link_key import (
    MAX_COUNTER,
    b64url_decode,
    b64url_encode,
    decode_link_key,
    derive_auth_key,
    new_link_key,
    pair_key,
)
from broker.crypto.sdp_auth import (
    REASONS,
    InterceptionError,
    Trust,
    canonical,
    fingerprint_of,
    normalise_fingerprint,
    safety_code,
    sign_sdp,
    verify_sdp,
)
from broker.crypto.sdp_authenticator import SdpAuthenticator
from broker.crypto.sealed_for_therapist import (
    DetailsError,
    checklist_plaintext,
    open_checklist,
    open_details,
    seal_checklist,
    seal_details,
)
from broker.crypto.sealed_signaling import (
    MAX_SEALED_CHARS,
    MAX_SEALED_PLAINTEXT,
    MAX_SEALS_PER_KEY,
    MIN_SEALED_CHARS,
    derive_seal_key,
    open_signal,
    parse_signal_plaintext,
    seal_aad,
    seal_signal,
    signal_plaintext,
)
from tests.crypto.safety_plan_vectors import build_safety_plan_vectors
from tests.crypto.seat_vectors import build_seat_vectors

VECTORS_PATH = Path(__file__).resolve().parents[1] / "vectors" / "e2ee.json"

SESSION = "s_7kQ2mX"
THERAPIST = "therapist"
CLIENT = "seat-1"


def fake_fingerprint(seed: str, alg: str = "sha-256") -> str:
    """A well-formed fingerprint value (uppercase, colons) derived from a seed."""
    size = {"sha-1": 20, "sha-256": 32, "sha-384": 48, "sha-512": 64}[alg]
    digest = hashlib.sha512(seed.encode()).digest()[:size]
    return ":".join(f"{b:02X}" for b in digest)


def chrome_like_sdp(seed: str, eol: str = "\r\n") -> str:
    """Fingerprint per media section, as Chromium writes it."""
    fp = fake_fingerprint(seed)
    lines = [
        "v=0",
        "o=- 4611731400430051336 2 IN IP4 127.0.0.1",
        "s=-",
        "t=0 0",
        "a=group:BUNDLE 0 1",
        "m=audio 9 UDP/TLS/RTP/SAVPF 111",
        "c=IN IP4 0.0.0.0",
        "a=ice-ufrag:abcd",
        "a=ice-pwd:abcdefghijklmnopqrstuvwx",
        f"a=fingerprint:sha-256 {fp}",
        "a=setup:actpass",
        "a=mid:0",
        "m=video 9 UDP/TLS/RTP/SAVPF 96",
        "c=IN IP4 0.0.0.0",
        f"a=fingerprint:sha-256 {fp}",
        "a=setup:actpass",
        "a=mid:1",
    ]
    return eol.join(lines) + eol


def aiortc_like_sdp(seed: str) -> str:
    """Three algorithms for one certificate at media level, as aiortc writes it."""
    fps = [f"a=fingerprint:{alg} {fake_fingerprint(seed, alg)}" for alg in ("sha-256", "sha-384", "sha-512")]
    lines = [
        "v=0",
        "o=- 1 1 IN IP4 0.0.0.0",
        "s=-",
        "t=0 0",
        "m=application 9 UDP/DTLS/SCTP webrtc-datachannel",
    ]
    return "\r\n".join([*lines, *fps, "a=setup:actpass", *lines[-1:], *fps]) + "\r\n"


def session_level_sdp(seed: str) -> str:
    """One session-level line with lowercase hex and extra blanks, as some stacks write it."""
    fp = fake_fingerprint(seed).lower()
    head = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"
    return f"{head}a=fingerprint: SHA-256\t {fp} \r\nm=audio 9 RTP/SAVPF 0\r\n"


def build_vectors() -> dict[str, Any]:
    """Every vector computed by the modules of broker/crypto/ from fixed inputs."""
    key_a = b64url_encode(bytes(range(32)))
    key_b = b64url_encode(bytes.fromhex("ff" * 16 + "a5" * 16))
    kauth_cases = [(key_a, SESSION), (key_b, "séance 🎈 #2"), (key_a, "")]
    pair_ids = [
        (THERAPIST, CLIENT),
        (CLIENT, THERAPIST),
        ("\uff5e", "\U0001f600"),
        ("a", "ab"),
        ("x", "x"),
    ]
    k_auth_a = derive_auth_key(bytes(range(32)), SESSION)
    canonical_cases: list[tuple[str, str, str, str, int, str]] = [
        (SESSION, THERAPIST, CLIENT, "offer", 1, chrome_like_sdp("t")),
        (SESSION, CLIENT, THERAPIST, "answer", 1_763_700_000_000_000, "v=0\r\n"),
        ("séance 🎈", "\U0001f600", "\uff5e", "offer", 0, ""),
        (SESSION, "a", "b", "answer", MAX_COUNTER, "ü\n"),
    ]
    mac_cases = [(key_a, *c) for c in canonical_cases] + [(key_b, *canonical_cases[0])]
    fp_t, fp_c = f"sha-256 {fake_fingerprint('t')}", f"sha-256 {fake_fingerprint('c')}"
    fp_sdps = [
        chrome_like_sdp("t"),
        chrome_like_sdp("t", eol="\n"),
        aiortc_like_sdp("c"),
        session_level_sdp("f"),
        f"v=0\r\na=fingerprint:sha-384 {fake_fingerprint('x', 'sha-384')}\r\n",
        f"v=0\r\na=fingerprint:sha-1 {fake_fingerprint('x', 'sha-1')}\r\n"
        f"a=fingerprint:sha-512 {fake_fingerprint('x', 'sha-512')}\r\n",
    ]
    bad_fp_sdps = {
        "no fingerprint line": ("v=0\r\ns=-\r\nm=audio 9 RTP/SAVPF 0\r\n", "missing_fingerprint"),
        "only sha-1": (
            f"v=0\r\na=fingerprint:sha-1 {fake_fingerprint('x', 'sha-1')}\r\n",
            "missing_fingerprint",
        ),
        "two different sha-256": (
            chrome_like_sdp("t").replace(fake_fingerprint("t"), fake_fingerprint("u"), 1),
            "fingerprint_mismatch",
        ),
        "single hex digit": (
            f"a=fingerprint:sha-256 {fake_fingerprint('t')[:-2]}:F\r\n",
            "fingerprint_mismatch",
        ),
        "short sha-256": (
            f"a=fingerprint:sha-256 {fake_fingerprint('t')[3:]}\r\n",
            "fingerprint_mismatch",
        ),
        "no hex": ("a=fingerprint:sha-256\r\n", "fingerprint_mismatch"),
        "non-ascii algorithm": (
            f"a=fingerprint:ſha-256 {fake_fingerprint('t')}\r\n",  # noqa: RUF001
            "fingerprint_mismatch",
        ),
    }
    normalise_inputs = [
        f"sha-256 {fake_fingerprint('t').lower()}",
        f"SHA-256 {fake_fingerprint('t')}",
        f"\tsha-512  {fake_fingerprint('t', 'sha-512')} ",
        "sha-1 0a:0B:cc",
    ]
    bad_normalise = [
        "sha-256",
        "sha-256 AB:CD extra",
        "sha-256 ABCD",
        "sha-256 AB::CD",
        "sha-256 AB:G0",
        "sha:256 AB",
    ]
    details_cases = [
        (
            key_a,
            SESSION,
            CLIENT,
            json.dumps({"name": "Ana", "phone": "+49 30 1234567", "city": "Köln"}, ensure_ascii=False),
            "00" * 12,
        ),
        (key_b, "séance 🎈 #2", "seat-🎈", "{}", "0102030405060708090a0b0c"),
    ]
    base = {
        "version": 1,
        "about": "Outputs of the end-to-end modules in broker/crypto/ that web/js/e2ee.js must reproduce.",
        "link_key": {
            "valid": [{"text": k, "hex": decode_link_key(k).hex()} for k in (key_a, key_b)],
            "invalid": [
                key_a[:-1],
                key_a + "A",
                key_a + "=",
                key_a[:-1] + "+",
                key_a[:-1] + "/",
                key_a[:-1] + "B",  # 2 trailing bits set: not canonical
                key_a[:-1] + "é",
                "",
            ],
        },
        "k_auth": [
            {
                "link_key": k,
                "session_id": s,
                "k_auth_hex": derive_auth_key(decode_link_key(k), s).hex(),
            }
            for k, s in kauth_cases
        ],
        "pair_key": [
            {
                "k_auth_hex": k_auth_a.hex(),
                "a": a,
                "b": b,
                "k_pair_hex": pair_key(k_auth_a, a, b).hex(),
            }
            for a, b in pair_ids
        ],
        "canonical": [
            {
                "session_id": s,
                "sender": f,
                "recipient": t,
                "type": ty,
                "counter": n,
                "sdp": sdp,
                "hex": canonical(s, f, t, ty, n, sdp).hex(),
            }
            for s, f, t, ty, n, sdp in canonical_cases
        ],
        "mac": [
            {
                "link_key": k,
                "session_id": s,
                "sender": f,
                "recipient": t,
                "type": ty,
                "counter": n,
                "sdp": sdp,
                "mac": sign_sdp(derive_auth_key(decode_link_key(k), s), s, f, t, ty, n, sdp),
            }
            for k, s, f, t, ty, n, sdp in mac_cases
        ],
        "normalise_fingerprint": {
            "valid": [{"input": v, "output": normalise_fingerprint(v)} for v in normalise_inputs],
            "invalid": bad_normalise,
        },
        "fingerprint_of": {
            "valid": [{"sdp": sdp, "fingerprint": fingerprint_of(sdp)} for sdp in fp_sdps],
            "invalid": [{"what": w, "sdp": sdp, "reason": r} for w, (sdp, r) in bad_fp_sdps.items()],
        },
        "safety_code": [
            {"session_id": s, "fp_a": a, "fp_b": b, "code": safety_code(s, a, b)}
            for s, a, b in [
                (SESSION, fp_t, fp_c),
                (SESSION, fp_c.lower().replace("sha-256", "SHA-256"), fp_t),
                ("séance 🎈 #2", fp_t, fp_c),
                (SESSION, fp_t, f"sha-384 {fake_fingerprint('c', 'sha-384')}"),
            ]
        ],
        "details": [
            {
                "link_key": k,
                "session_id": s,
                "peer_id": p,
                "plaintext": text,
                "nonce_hex": nonce,
                "sealed": seal_details(decode_link_key(k), s, p, text, nonce=bytes.fromhex(nonce)),
            }
            for k, s, p, text, nonce in details_cases
        ],
        "checklist": [
            {
                "link_key": k,
                "session_id": s,
                "peer_id": p,
                "answers": answers,
                "plaintext": checklist_plaintext(answers),
                "nonce_hex": nonce,
                "sealed": seal_checklist(decode_link_key(k), s, p, answers, nonce=bytes.fromhex(nonce)),
            }
            for k, s, p, answers, nonce in [
                (key_a, SESSION, CLIENT, {"private_place": True, "headset": False, "camera": True}, "00" * 12),
                (key_b, "séance 🎈 #2", "seat-🎈", {}, "0102030405060708090a0b0c"),
            ]
        ],
    }
    return base | seal_vectors(key_a, key_b)


def seal_vectors(key_a: str, key_b: str) -> dict[str, Any]:
    """Sealed signaling (docs/protocol.md 7.7): direction keys, associated data, plaintexts,
    sealed messages with fixed nonces, and sealed messages that must not open."""

    def k_seal(key: str, session: str, sender: str, recipient: str) -> bytes:
        k_auth = derive_auth_key(decode_link_key(key), session)
        return derive_seal_key(pair_key(k_auth, sender, recipient), sender, recipient)

    key_cases = [
        (key_a, SESSION, THERAPIST, CLIENT),
        (key_a, SESSION, CLIENT, THERAPIST),  # the other direction of the same pair
        (key_b, "séance 🎈 #2", "\uff5e", "\U0001f600"),
        (key_a, SESSION, "a", "ab"),
    ]
    aad_cases: list[tuple[str, str, str, str, int]] = [
        (SESSION, THERAPIST, CLIENT, "offer", 1),
        (SESSION, CLIENT, THERAPIST, "answer", 1_763_700_000_000_000),
        (SESSION, THERAPIST, CLIENT, "candidate", MAX_COUNTER),
        ("séance 🎈", "\U0001f600", "\uff5e", "candidate", 0),
    ]
    host = "candidate:842163049 1 udp 1677729535 192.0.2.7 53110 typ host generation 0 ufrag abcd"
    plaintext_cases: list[tuple[str, dict[str, Any]]] = [
        ("offer", {"sdp": chrome_like_sdp("t")}),
        ("answer", {"sdp": aiortc_like_sdp("c")}),
        ("candidate", {"candidate": host, "sdp_mid": "0", "sdp_mline_index": 0}),
        ("candidate", {"sdp_mline_index": None, "sdp_mid": None, "candidate": ""}),  # end of candidates
        ("candidate", {"candidate": 'x "\\ \x01\x1f\x7f é 🎈 \u2028', "sdp_mid": "vidéo", "sdp_mline_index": 255}),
    ]
    sealed_cases = [
        (key_a, SESSION, THERAPIST, CLIENT, "offer", 1_763_700_000_000_000, plaintext_cases[0][1], "00" * 12),
        (key_a, SESSION, CLIENT, THERAPIST, "answer", 1_763_700_000_000_001, plaintext_cases[1][1], "ff" * 12),
        (key_a, SESSION, THERAPIST, CLIENT, "candidate", 1_763_700_000_000_002, plaintext_cases[2][1], "0102030405060708090a0b0c"),
        (key_b, "séance 🎈 #2", "\uff5e", "\U0001f600", "candidate", 7, plaintext_cases[4][1], "a5" * 12),
    ]  # fmt: skip
    sealed = [
        {
            "link_key": k,
            "session_id": s,
            "sender": f,
            "recipient": t,
            "type": ty,
            "counter": n,
            "fields": fields,
            "nonce_hex": nonce,
            "sealed": seal_signal(
                k_seal(k, s, f, t), s, f, t, ty, n, signal_plaintext(ty, fields), nonce=bytes.fromhex(nonce)
            ),
        }
        for k, s, f, t, ty, n, fields, nonce in sealed_cases
    ]
    good = sealed[2]  # therapist -> seat-1, a candidate
    blob = b64url_decode(good["sealed"])

    def flipped(at: int) -> str:
        changed = bytearray(blob)
        changed[at] ^= 0x01
        return b64url_encode(bytes(changed))

    forward = k_seal(key_a, SESSION, THERAPIST, CLIENT)
    backward = k_seal(key_a, SESSION, CLIENT, THERAPIST)
    n = good["counter"]
    # (what, opening key, session, sender, recipient, type, counter, sealed): none of these opens.
    bad = [
        ("nonce altered", forward, SESSION, THERAPIST, CLIENT, "candidate", n, flipped(0)),
        ("ciphertext altered", forward, SESSION, THERAPIST, CLIENT, "candidate", n, flipped(12)),
        ("tag altered", forward, SESSION, THERAPIST, CLIENT, "candidate", n, flipped(len(blob) - 1)),
        ("tag cut off", forward, SESSION, THERAPIST, CLIENT, "candidate", n, b64url_encode(blob[:-16])),
        ("wrong direction key", backward, SESSION, THERAPIST, CLIENT, "candidate", n, good["sealed"]),
        ("sender and recipient swapped", backward, SESSION, CLIENT, THERAPIST, "candidate", n, good["sealed"]),
        ("re-addressed to another peer", k_seal(key_a, SESSION, THERAPIST, "seat-2"), SESSION, THERAPIST,
         "seat-2", "candidate", n, good["sealed"]),
        ("counter changed", forward, SESSION, THERAPIST, CLIENT, "candidate", n + 1, good["sealed"]),
        ("type changed", forward, SESSION, THERAPIST, CLIENT, "offer", n, good["sealed"]),
        ("another session", k_seal(key_a, "s_other", THERAPIST, CLIENT), "s_other", THERAPIST, CLIENT,
         "candidate", n, good["sealed"]),
        ("another link key", k_seal(key_b, SESSION, THERAPIST, CLIENT), SESSION, THERAPIST, CLIENT,
         "candidate", n, good["sealed"]),
        ("not base64url", forward, SESSION, THERAPIST, CLIENT, "candidate", n, good["sealed"] + "="),
    ]  # fmt: skip
    return {
        **build_seat_vectors(),
        **build_safety_plan_vectors(),
        "seal_key": [
            {
                "link_key": k,
                "session_id": s,
                "sender": f,
                "recipient": t,
                "k_pair_hex": pair_key(derive_auth_key(decode_link_key(k), s), f, t).hex(),
                "k_seal_hex": k_seal(k, s, f, t).hex(),
            }
            for k, s, f, t in key_cases
        ],
        "seal_aad": [
            {
                "session_id": s,
                "sender": f,
                "recipient": t,
                "type": ty,
                "counter": n,
                "hex": seal_aad(s, f, t, ty, n).hex(),
            }
            for s, f, t, ty, n in aad_cases
        ],
        "signal_plaintext": [
            {"type": ty, "fields": fields, "plaintext": signal_plaintext(ty, fields)} for ty, fields in plaintext_cases
        ],
        "sealed": sealed,
        "sealed_invalid": [
            {
                "what": what,
                "k_seal_hex": key.hex(),
                "session_id": s,
                "sender": f,
                "recipient": t,
                "type": ty,
                "counter": c,
                "sealed": text,
                "reason": "bad_mac",
            }
            for what, key, s, f, t, ty, c, text in bad
        ],
    }


def write_vectors() -> None:
    VECTORS_PATH.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(build_vectors(), indent=2, ensure_ascii=False) + "\n"
    VECTORS_PATH.write_text(text, encoding="utf-8")


@functools.cache
def vectors() -> dict[str, Any]:
    """The committed vectors (read lazily so the generator can run without them)."""
    loaded: dict[str, Any] = json.loads(VECTORS_PATH.read_text(encoding="utf-8"))
    return loaded


# -- independent reference computations (stdlib only) --------------------------------------


def ref_b64url(data: bytes) -> str:
    return base64.b64encode(data).decode().replace("+", "-").replace("/", "_").rstrip("=")


def ref_key(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def ref_hkdf(ikm: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """RFC 5869 written out: extract, then expand."""
    prk = hmac.new(salt or b"\0" * 32, ikm, hashlib.sha256).digest()
    out, block, i = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        out, i = out + block, i + 1
    return out[:length]


def ref_lp(s: str) -> bytes:
    data = s.encode()
    return struct.pack(">I", len(data)) + data


def ref_canonical(case: dict[str, Any]) -> bytes:
    fields = [ref_lp(x) for x in ("tt-sdp v1", case["session_id"], case["sender"], case["recipient"], case["type"])]
    return b"".join(fields) + struct.pack(">Q", case["counter"]) + ref_lp(case["sdp"])


def ref_pair_key(k_auth: bytes, a: str, b: str) -> bytes:
    lo, hi = sorted((a, b), key=lambda s: [ord(c) for c in s])
    return hmac.new(k_auth, ref_lp("pair v1") + ref_lp(lo) + ref_lp(hi), hashlib.sha256).digest()


def test_reference_hkdf_matches_rfc5869_case_1() -> None:
    ikm, salt = bytes.fromhex("0b" * 22), bytes.fromhex("000102030405060708090a0b0c")
    info = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9")
    expected = "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    assert ref_hkdf(ikm, salt, info, 42).hex() == expected


def test_vectors_file_matches_implementation() -> None:
    assert build_vectors() == vectors(), "run `python -m tests.crypto.test_e2ee` after a deliberate change"


def test_k_auth_vectors_independently() -> None:
    for case in vectors()["k_auth"]:
        expected = ref_hkdf(ref_key(case["link_key"]), case["session_id"].encode(), b"sdp-auth v1")
        assert case["k_auth_hex"] == expected.hex()


def test_pair_key_vectors_independently() -> None:
    for case in vectors()["pair_key"]:
        expected = ref_pair_key(bytes.fromhex(case["k_auth_hex"]), case["a"], case["b"])
        assert case["k_pair_hex"] == expected.hex()
    # the astral-vs-BMP case is where UTF-16 order (JS `<`) and code-point order differ
    assert "\uff5e" < "\U0001f600" and "\uff5e".encode("utf-16-be") > "\U0001f600".encode("utf-16-be")


def test_canonical_vectors_independently() -> None:
    for case in vectors()["canonical"]:
        assert case["hex"] == ref_canonical(case).hex()


def test_mac_vectors_independently() -> None:
    for case in vectors()["mac"]:
        k_auth = ref_hkdf(ref_key(case["link_key"]), case["session_id"].encode(), b"sdp-auth v1")
        k_pair = ref_pair_key(k_auth, case["sender"], case["recipient"])
        tag = hmac.new(k_pair, ref_canonical(case), hashlib.sha256).digest()
        assert case["mac"] == ref_b64url(tag)


def test_safety_code_vectors_independently() -> None:
    for case in vectors()["safety_code"]:
        fps = sorted(normalise_fingerprint(f) for f in (case["fp_a"], case["fp_b"]))
        data = b"".join(ref_lp(x) for x in ("tt-sas v1", case["session_id"], *fps))
        n = int(hashlib.sha256(data).hexdigest()[:16], 16) % 1_000_000_000
        assert case["code"] == f"{n // 1_000_000:03d} {n // 1000 % 1000:03d} {n % 1000:03d}"


def test_details_vectors_independently() -> None:
    for case in vectors()["details"]:
        key = ref_hkdf(ref_key(case["link_key"]), case["session_id"].encode(), b"emergency-details v1")
        blob = ref_key(case["sealed"])
        assert blob[:12].hex() == case["nonce_hex"]
        aad = ref_lp("tt-details v1") + ref_lp(case["session_id"]) + ref_lp(case["peer_id"])
        assert AESGCM(key).decrypt(blob[:12], blob[12:], aad).decode() == case["plaintext"]


def test_checklist_vectors_independently() -> None:
    for case in vectors()["checklist"]:
        key = ref_hkdf(ref_key(case["link_key"]), case["session_id"].encode(), b"checklist-answers v1")
        blob = ref_key(case["sealed"])
        assert blob[:12].hex() == case["nonce_hex"]
        aad = ref_lp("tt-checklist v1") + ref_lp(case["session_id"]) + ref_lp(case["peer_id"])
        text = AESGCM(key).decrypt(blob[:12], blob[12:], aad).decode()
        assert (
            text == case["plaintext"] == json.dumps({"answers": case["answers"]}, sort_keys=True, separators=(",", ":"))
        )


def test_checklist_vectors_open() -> None:
    for case in vectors()["checklist"]:
        key = decode_link_key(case["link_key"])
        assert open_checklist(key, case["session_id"], case["peer_id"], case["sealed"]) == case["answers"]


def test_sealed_checklist_answers_are_bound_to_their_seat_and_not_to_details() -> None:
    key = decode_link_key(new_link_key())
    sealed = seal_checklist(key, SESSION, CLIENT, {"headset": False})
    for wrong in (
        lambda: open_checklist(key, SESSION, "other-seat", sealed),
        lambda: open_checklist(key, "another-session", CLIENT, sealed),
        lambda: open_details(key, SESSION, CLIENT, sealed),  # a different key and label
        lambda: open_checklist(decode_link_key(new_link_key()), SESSION, CLIENT, sealed),
    ):
        with pytest.raises(DetailsError):
            wrong()
    assert open_checklist(key, SESSION, CLIENT, sealed) == {"headset": False}


def test_fingerprint_vectors_by_hand() -> None:
    t = fake_fingerprint("t")
    valid = vectors()["fingerprint_of"]["valid"]
    assert valid[0]["fingerprint"] == valid[1]["fingerprint"] == f"sha-256 {t}"
    assert valid[2]["fingerprint"] == f"sha-256 {fake_fingerprint('c')}"  # sha-256 preferred
    assert valid[3]["fingerprint"] == f"sha-256 {fake_fingerprint('f')}"  # lowercased input
    assert valid[4]["fingerprint"].startswith("sha-384 ")
    assert valid[5]["fingerprint"].startswith("sha-512 ")  # sha-1 is never chosen


# -- the vectors, through the public API ---------------------------------------------------


def test_link_key_vectors() -> None:
    for case in vectors()["link_key"]["valid"]:
        assert decode_link_key(case["text"]).hex() == case["hex"]
    for text in vectors()["link_key"]["invalid"]:
        with pytest.raises(ValueError, match="link key"):
            decode_link_key(text)


def test_mac_vectors_verify() -> None:
    for case in vectors()["mac"]:
        k_auth = derive_auth_key(decode_link_key(case["link_key"]), case["session_id"])
        verify_sdp(
            k_auth,
            case["session_id"],
            case["sender"],
            case["recipient"],
            case["type"],
            case["counter"],
            case["sdp"],
            case["mac"],
        )


def test_fingerprint_and_normalise_vectors() -> None:
    for case in vectors()["fingerprint_of"]["invalid"]:
        with pytest.raises(InterceptionError) as err:
            fingerprint_of(case["sdp"])
        assert err.value.reason == case["reason"], case["what"]
    for text in vectors()["normalise_fingerprint"]["invalid"]:
        with pytest.raises(ValueError, match="fingerprint must"):
            normalise_fingerprint(text)
    outputs = [c["output"] for c in vectors()["normalise_fingerprint"]["valid"]]
    assert outputs[0] == outputs[1] == f"sha-256 {fake_fingerprint('t')}"
    assert outputs[3] == "sha-1 0A:0B:CC"


def test_details_vectors_open() -> None:
    for case in vectors()["details"]:
        key = decode_link_key(case["link_key"])
        assert open_details(key, case["session_id"], case["peer_id"], case["sealed"]) == case["plaintext"]


# -- link key ------------------------------------------------------------------------------------


def test_new_link_key_is_fresh_32_bytes() -> None:
    keys = {new_link_key() for _ in range(50)}
    assert len(keys) == 50
    assert all(len(k) == 43 and len(decode_link_key(k)) == 32 for k in keys)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("abc", "43 base64url characters, got 3"),
        ("A" * 42 + "+", "outside the base64url alphabet"),
        ("A" * 42 + "B", "not canonical"),
        (None, "must be text"),
    ],
)
def test_bad_link_key_messages(text: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_link_key(text)


def test_raw_link_key_must_be_32_bytes() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        derive_auth_key(b"\0" * 31, SESSION)
    with pytest.raises(ValueError, match="32 bytes"):
        SdpAuthenticator(b"\0" * 33, SESSION, CLIENT)


# -- authenticated SDP ---------------------------------------------------------------------------


def make_pair(clock_start: int = 1_000) -> tuple[SdpAuthenticator, SdpAuthenticator]:
    key = decode_link_key(new_link_key())
    ticks = iter(range(clock_start, clock_start + 10_000))
    therapist = SdpAuthenticator(key, SESSION, THERAPIST, clock=lambda: next(ticks))
    client = SdpAuthenticator(key, SESSION, CLIENT, clock=lambda: next(ticks))
    return therapist, client


def test_signed_offer_and_answer_are_verified_by_link() -> None:
    therapist, client = make_pair()
    offer = chrome_like_sdp("t")
    counter, mac = therapist.sign(CLIENT, "offer", offer)
    assert mac is not None and therapist.has_link_key
    assert client.verify(THERAPIST, "offer", counter, offer, mac) is Trust.VERIFIED_BY_LINK
    answer = chrome_like_sdp("c")
    counter, mac = client.sign(THERAPIST, "answer", answer)
    assert therapist.verify(CLIENT, "answer", counter, answer, mac) == "verified_by_link"


def _tamper_variants(sdp: str, counter: int) -> list[tuple[str, str, int, str, str]]:
    """(sender, type, counter, sdp, recipient) with exactly one thing changed."""
    variants = []
    for i in range(len(sdp)):  # every byte of the SDP
        changed = chr(ord(sdp[i]) ^ 1)
        variants.append((THERAPIST, "offer", counter, sdp[:i] + changed + sdp[i + 1 :], CLIENT))
    variants += [
        ("therapisT", "offer", counter, sdp, CLIENT),
        (THERAPIST, "answer", counter, sdp, CLIENT),
        (THERAPIST, "offer", counter + 1, sdp, CLIENT),
        (THERAPIST, "offer", counter ^ (1 << 40), sdp, CLIENT),
        (THERAPIST, "offer", counter, sdp, "seat-2"),
        (THERAPIST, "offer", counter, sdp + "\r\n", CLIENT),
    ]
    return variants


def test_any_change_gives_bad_mac() -> None:
    key = decode_link_key(new_link_key())
    k_auth = derive_auth_key(key, SESSION)
    sdp, counter = chrome_like_sdp("t"), 1_763_700_000_000_000
    mac = sign_sdp(k_auth, SESSION, THERAPIST, CLIENT, "offer", counter, sdp)
    verify_sdp(k_auth, SESSION, THERAPIST, CLIENT, "offer", counter, sdp, mac)
    for sender, kind, n, body, recipient in _tamper_variants(sdp, counter):
        with pytest.raises(InterceptionError) as err:
            verify_sdp(k_auth, SESSION, sender, recipient, kind, n, body, mac)
        assert err.value.reason == "bad_mac"
    for other_session, other_mac in [
        ("s_other", mac),
        (SESSION, mac[:-1] + ("A" if mac[-1] != "A" else "B")),
    ]:
        with pytest.raises(InterceptionError, match="bad_mac"):
            verify_sdp(
                k_auth if other_session == SESSION else derive_auth_key(key, other_session),
                other_session,
                THERAPIST,
                CLIENT,
                "offer",
                counter,
                sdp,
                other_mac,
            )


def test_swapped_fingerprint_is_detected_by_authenticator() -> None:
    therapist, client = make_pair()
    offer = chrome_like_sdp("t")
    counter, mac = therapist.sign(CLIENT, "offer", offer)
    forged = offer.replace(fake_fingerprint("t"), fake_fingerprint("mallory"))
    with pytest.raises(InterceptionError) as err:
        client.verify(THERAPIST, "offer", counter, forged, mac)
    assert err.value.reason == "bad_mac"
    # the genuine message is still accepted: a rejected forgery changes no state
    assert client.verify(THERAPIST, "offer", counter, offer, mac) is Trust.VERIFIED_BY_LINK


def test_mac_from_another_pair_is_rejected() -> None:
    """In a group, seat-1 cannot pass its MAC for seat-1->therapist off as seat-2->therapist."""
    key = decode_link_key(new_link_key())
    seat1 = SdpAuthenticator(key, SESSION, "seat-1")
    therapist = SdpAuthenticator(key, SESSION, THERAPIST)
    sdp = chrome_like_sdp("c")
    counter, mac = seat1.sign(THERAPIST, "offer", sdp)
    with pytest.raises(InterceptionError, match="bad_mac"):
        therapist.verify("seat-2", "offer", counter, sdp, mac)


def test_replay_is_rejected() -> None:
    therapist, client = make_pair()
    sdp = chrome_like_sdp("t")
    first = therapist.sign(CLIENT, "offer", sdp)
    second = therapist.sign(CLIENT, "offer", sdp)
    assert second[0] > first[0]
    client.verify(THERAPIST, "offer", first[0], sdp, first[1])
    with pytest.raises(InterceptionError) as err:
        client.verify(THERAPIST, "offer", first[0], sdp, first[1])
    assert err.value.reason == "replayed_counter"
    client.verify(THERAPIST, "offer", second[0], sdp, second[1])
    with pytest.raises(InterceptionError, match="replayed_counter"):  # older message delivered late
        client.verify(THERAPIST, "offer", first[0], sdp, first[1])


def test_counter_never_goes_backwards() -> None:
    clock_values = iter([5_000, 5_000, 4_000, 9_000])
    auth = SdpAuthenticator(None, SESSION, CLIENT, clock=lambda: next(clock_values))
    sdp = chrome_like_sdp("c")
    counters = [auth.sign(THERAPIST, "offer", sdp)[0] for _ in range(4)]
    assert counters == [5_000, 5_001, 5_002, 9_000]


def test_counter_after_reload_exceeds_old_ones() -> None:
    """A reloaded page has no state; its clock-based counter is past every earlier one."""
    key = decode_link_key(new_link_key())
    client = SdpAuthenticator(key, SESSION, CLIENT)
    sdp = chrome_like_sdp("t")
    early = iter(range(1_763_700_000_000_000, 1_763_700_000_000_100))
    before = SdpAuthenticator(key, SESSION, THERAPIST, clock=lambda: next(early))
    for _ in range(3):
        counter, mac = before.sign(CLIENT, "offer", sdp)
        client.verify(THERAPIST, "offer", counter, sdp, mac)
    reloaded = SdpAuthenticator(key, SESSION, THERAPIST)  # real clock: 2026 or later
    counter, mac = reloaded.sign(CLIENT, "offer", sdp)
    assert client.verify(THERAPIST, "offer", counter, sdp, mac) is Trust.VERIFIED_BY_LINK


def test_missing_mac_is_rejected_unless_unverified_is_allowed() -> None:
    therapist, client = make_pair()
    sdp = chrome_like_sdp("t")
    counter, _mac = therapist.sign(CLIENT, "offer", sdp)
    for stripped in (None, ""):
        with pytest.raises(InterceptionError) as err:
            client.verify(THERAPIST, "offer", counter, sdp, stripped)
        assert err.value.reason == "missing_mac"
    assert client.verify(THERAPIST, "offer", counter, sdp, None, allow_unverified=True) is Trust.UNVERIFIED


def test_present_mac_is_checked_even_when_unverified_is_allowed() -> None:
    therapist, client = make_pair()
    sdp = chrome_like_sdp("t")
    counter, mac = therapist.sign(CLIENT, "offer", sdp)
    with pytest.raises(InterceptionError, match="bad_mac"):
        client.verify(THERAPIST, "answer", counter, sdp, mac, allow_unverified=True)


def test_unverified_mode_without_link_key() -> None:
    key = decode_link_key(new_link_key())
    other_device = SdpAuthenticator(None, SESSION, THERAPIST)
    client = SdpAuthenticator(key, SESSION, CLIENT)
    assert not other_device.has_link_key
    offer = chrome_like_sdp("t")
    counter, mac = other_device.sign(CLIENT, "offer", offer)
    assert mac is None
    assert client.verify(THERAPIST, "offer", counter, offer, mac, allow_unverified=True) is Trust.UNVERIFIED
    answer = chrome_like_sdp("c")
    a_counter, a_mac = client.sign(THERAPIST, "answer", answer)
    assert a_mac is not None
    # without the key the MAC cannot be checked; counters still are
    assert other_device.verify(CLIENT, "answer", a_counter, answer, a_mac) is Trust.UNVERIFIED
    with pytest.raises(InterceptionError, match="replayed_counter"):
        other_device.verify(CLIENT, "answer", a_counter, answer, a_mac)


@pytest.mark.parametrize(
    ("sender", "kind", "counter"),
    [
        (CLIENT, "offer", 1),
        (THERAPIST, "pranswer", 1),
        (THERAPIST, "offer", -1),
        (THERAPIST, "offer", 2**53),
        (THERAPIST, "offer", True),
        (THERAPIST, "offer", None),
        (THERAPIST, "offer", 1.0),
    ],
)
def test_malformed_messages(sender: str, kind: str, counter: Any) -> None:
    _therapist, client = make_pair()
    with pytest.raises(InterceptionError) as err:
        client.verify(sender, kind, counter, chrome_like_sdp("t"), "x")
    assert err.value.reason == "malformed"


def test_signed_sdp_without_fingerprint_is_refused() -> None:
    therapist, client = make_pair()
    sdp = "v=0\r\ns=-\r\n"
    counter, mac = therapist.sign(CLIENT, "offer", sdp)
    with pytest.raises(InterceptionError, match="missing_fingerprint"):
        client.verify(THERAPIST, "offer", counter, sdp, mac)


def test_interception_reasons_are_a_closed_set() -> None:
    with pytest.raises(ValueError, match="unknown interception reason"):
        InterceptionError("something_else")
    assert {
        "missing_mac",
        "bad_mac",
        "replayed_counter",
        "malformed",
        "missing_fingerprint",
        "fingerprint_mismatch",
    } == REASONS


def test_canonical_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="type must be"):
        canonical(SESSION, THERAPIST, CLIENT, "rollback", 1, "")
    with pytest.raises(ValueError, match="counter must be"):
        canonical(SESSION, THERAPIST, CLIENT, "offer", 2**53, "")
    with pytest.raises(UnicodeEncodeError):  # lone surrogate: not UTF-8 encodable (JS rejects it too)
        canonical(SESSION, "\ud800", CLIENT, "offer", 1, "")


def test_length_prefixes_keep_fields_apart() -> None:
    a = canonical("s", "ab", "c", "offer", 1, "")
    b = canonical("s", "a", "bc", "offer", 1, "")
    assert a != b


# -- fingerprints and safety code ---------------------------------------------------------------


def test_safety_code_is_symmetric_and_formatted() -> None:
    fp_a, fp_b = (
        fingerprint_of(chrome_like_sdp("t")),
        fingerprint_of(aiortc_like_sdp("c")),
    )
    code = safety_code(SESSION, fp_a, fp_b)
    assert code == safety_code(SESSION, fp_b, fp_a)
    assert len(code) == 11 and code[3] == code[7] == " " and code.replace(" ", "").isdigit()


def test_safety_code_changes_with_any_fingerprint_or_session() -> None:
    fp_a, fp_b = f"sha-256 {fake_fingerprint('t')}", f"sha-256 {fake_fingerprint('c')}"
    code = safety_code(SESSION, fp_a, fp_b)
    others = {
        safety_code(SESSION, fp_a, f"sha-256 {fake_fingerprint('mallory')}"),
        safety_code(SESSION, f"sha-256 {fake_fingerprint('mallory')}", fp_b),
        safety_code("s_other", fp_a, fp_b),
        safety_code(SESSION, fp_a, f"sha-384 {fake_fingerprint('c', 'sha-384')}"),
    }
    assert code not in others and len(others) == 4


def test_safety_code_ignores_fingerprint_spelling() -> None:
    fp = fake_fingerprint("t")
    assert safety_code(SESSION, f"sha-256 {fp}", "sha-256 " + fake_fingerprint("c")) == safety_code(
        SESSION, f"SHA-256 {fp.lower()}", "sha-256 " + fake_fingerprint("c").lower()
    )


def test_fingerprint_of_real_aiortc_sdp() -> None:
    """aiortc lists sha-256/384/512 for one certificate; sha-256 is the one used."""
    sdp = aiortc_like_sdp("c")
    assert sdp.count("a=fingerprint:") == 6
    assert fingerprint_of(sdp) == f"sha-256 {fake_fingerprint('c')}"


# -- emergency details ----------------------------------------------------------------------------


def test_details_round_trip_with_random_nonce() -> None:
    key = decode_link_key(new_link_key())
    text = json.dumps({"address": "Hauptstraße 1", "contact": "+43 1 234"}, ensure_ascii=False)
    sealed_1 = seal_details(key, SESSION, CLIENT, text)
    sealed_2 = seal_details(key, SESSION, CLIENT, text)
    assert sealed_1 != sealed_2 and "Hauptstra" not in sealed_1
    assert open_details(key, SESSION, CLIENT, sealed_1) == text
    assert open_details(key, SESSION, CLIENT, sealed_2) == text


def test_details_tampering_and_misbinding_fail() -> None:
    key = decode_link_key(new_link_key())
    sealed = seal_details(key, SESSION, CLIENT, '{"phone": "112"}')
    blob = bytearray(b64url_decode(sealed))
    for i in range(len(blob)):
        flipped = bytearray(blob)
        flipped[i] ^= 0x01
        with pytest.raises(DetailsError, match="failed authentication"):
            open_details(key, SESSION, CLIENT, b64url_encode(bytes(flipped)))
    other_key = decode_link_key(new_link_key())
    for args in [(other_key, SESSION, CLIENT), (key, "s_other", CLIENT), (key, SESSION, "seat-2")]:
        with pytest.raises(DetailsError, match="failed authentication"):
            open_details(*args, sealed)
    with pytest.raises(DetailsError, match="too short"):
        open_details(key, SESSION, CLIENT, b64url_encode(bytes(blob[:27])))
    with pytest.raises(DetailsError, match="not base64url"):
        open_details(key, SESSION, CLIENT, sealed + "=")


def test_details_nonce_must_be_12_bytes() -> None:
    key = decode_link_key(new_link_key())
    with pytest.raises(ValueError, match="12 bytes"):
        seal_details(key, SESSION, CLIENT, "{}", nonce=b"\0" * 8)


# -- sealed signaling: the vectors ------------------------------------------------------------


def ref_aad(case: dict[str, Any]) -> bytes:
    fields = [ref_lp(x) for x in ("tt-seal v1", case["session_id"], case["sender"], case["recipient"], case["type"])]
    return b"".join(fields) + struct.pack(">Q", case["counter"])


def ref_seal_key(link_key: str, session_id: str, sender: str, recipient: str) -> bytes:
    k_auth = ref_hkdf(ref_key(link_key), session_id.encode(), b"sdp-auth v1")
    k_pair = ref_pair_key(k_auth, sender, recipient)
    return ref_hkdf(k_pair, b"", ref_lp("tt-seal v1") + ref_lp(sender) + ref_lp(recipient))


def test_seal_key_vectors_independently() -> None:
    cases = vectors()["seal_key"]
    for case in cases:
        expected = ref_seal_key(case["link_key"], case["session_id"], case["sender"], case["recipient"])
        assert case["k_seal_hex"] == expected.hex()
        assert (
            derive_seal_key(bytes.fromhex(case["k_pair_hex"]), case["sender"], case["recipient"]).hex()
            == expected.hex()
        )
    # One pair key, two directions, two keys.
    assert cases[0]["k_pair_hex"] == cases[1]["k_pair_hex"] and cases[0]["k_seal_hex"] != cases[1]["k_seal_hex"]


def test_seal_aad_vectors_independently() -> None:
    for case in vectors()["seal_aad"]:
        assert case["hex"] == ref_aad(case).hex()
        args = (case["session_id"], case["sender"], case["recipient"], case["type"], case["counter"])
        assert seal_aad(*args).hex() == case["hex"]


def test_signal_plaintext_vectors() -> None:
    for case in vectors()["signal_plaintext"]:
        assert signal_plaintext(case["type"], case["fields"]) == case["plaintext"]
        assert parse_signal_plaintext(case["type"], case["plaintext"]) == case["fields"]
        assert json.loads(case["plaintext"]) == case["fields"]


def test_sealed_vectors_independently() -> None:
    for case in vectors()["sealed"]:
        key = ref_seal_key(case["link_key"], case["session_id"], case["sender"], case["recipient"])
        blob = ref_key(case["sealed"])
        assert blob[:12].hex() == case["nonce_hex"]
        plain = AESGCM(key).decrypt(blob[:12], blob[12:], ref_aad(case)).decode()
        assert json.loads(plain) == case["fields"]
        assert ref_b64url(blob) == case["sealed"]


def test_sealed_vectors_open_through_the_authenticator() -> None:
    """Each vector as a receiver gets it: opened by the recipient's authenticator, once."""
    for case in vectors()["sealed"]:
        receiver = SdpAuthenticator(decode_link_key(case["link_key"]), case["session_id"], case["recipient"])
        args = (case["sender"], case["type"], case["counter"], case["sealed"])
        assert receiver.unseal(*args) == case["fields"]
        with pytest.raises(InterceptionError, match="replayed_counter"):
            receiver.unseal(*args)


def test_sealed_invalid_vectors_do_not_open() -> None:
    for case in vectors()["sealed_invalid"]:
        args = [case[k] for k in ("session_id", "sender", "recipient", "type", "counter", "sealed")]
        with pytest.raises(InterceptionError) as err:
            open_signal(bytes.fromhex(case["k_seal_hex"]), *args)
        assert err.value.reason == case["reason"], case["what"]


# -- sealed signaling: the authenticator ------------------------------------------------------

CANDIDATE = {"candidate": "candidate:1 1 udp 2122260223 192.0.2.7 53110 typ host", "sdp_mid": "0", "sdp_mline_index": 0}


def test_sealed_offer_answer_and_candidates_open_on_the_other_side() -> None:
    therapist, client = make_pair()
    offer = {"sdp": chrome_like_sdp("t")}
    counter, sealed = therapist.seal(CLIENT, "offer", offer)
    for secret in ("a=fingerprint", "a=ice-ufrag", "a=ice-pwd", fake_fingerprint("t")):
        assert secret not in sealed
    assert client.unseal(THERAPIST, "offer", counter, sealed) == offer
    answer = {"sdp": aiortc_like_sdp("c")}
    assert therapist.unseal(CLIENT, "answer", *client.seal(THERAPIST, "answer", answer)) == answer
    for fields in (CANDIDATE, {"candidate": "", "sdp_mid": None, "sdp_mline_index": None}):
        counter, sealed = therapist.seal(CLIENT, "candidate", fields)
        assert "192.0.2.7" not in sealed and "candidate:" not in sealed
        assert client.unseal(THERAPIST, "candidate", counter, sealed) == fields


def test_one_counter_per_direction_covers_every_sealed_and_clear_message() -> None:
    therapist, client = make_pair()
    sdp = chrome_like_sdp("t")
    first = therapist.seal(CLIENT, "offer", {"sdp": sdp})
    second = therapist.seal(CLIENT, "candidate", CANDIDATE)
    third = therapist.sign(CLIENT, "offer", sdp)
    assert first[0] < second[0] < third[0]
    client.unseal(THERAPIST, "candidate", *second)
    # An offer older than a candidate already accepted is a replay, whatever its type.
    with pytest.raises(InterceptionError, match="replayed_counter"):
        client.unseal(THERAPIST, "offer", *first)
    assert client.verify(THERAPIST, "offer", third[0], sdp, third[1]) is Trust.VERIFIED_BY_LINK
    with pytest.raises(InterceptionError, match="replayed_counter"):
        client.unseal(THERAPIST, "candidate", *second)


def test_any_change_to_a_sealed_message_fails_to_open() -> None:
    """The broker sees the header and the ciphertext; it can change neither, nor re-address them."""
    key = decode_link_key(new_link_key())
    therapist = SdpAuthenticator(key, SESSION, THERAPIST)
    counter, sealed = therapist.seal(CLIENT, "candidate", CANDIDATE)
    blob = b64url_decode(sealed)
    attempts: list[tuple[str, str, str, int, str]] = []  # (receiver, sender, type, counter, sealed)
    for i in range(len(blob)):
        changed = bytearray(blob)
        changed[i] ^= 0x80
        attempts.append((CLIENT, THERAPIST, "candidate", counter, b64url_encode(bytes(changed))))
    attempts += [
        (CLIENT, THERAPIST, "candidate", counter + 1, sealed),  # counter
        (CLIENT, THERAPIST, "candidate", counter - 1, sealed),
        (CLIENT, THERAPIST, "offer", counter, sealed),  # type
        (CLIENT, THERAPIST, "answer", counter, sealed),
        (CLIENT, "seat-2", "candidate", counter, sealed),  # another sender
        ("seat-2", THERAPIST, "candidate", counter, sealed),  # re-addressed to another peer
        (THERAPIST, CLIENT, "candidate", counter, sealed),  # sent back the other way
        (CLIENT, THERAPIST, "candidate", counter, b64url_encode(blob[:27])),  # too short
        (CLIENT, THERAPIST, "candidate", counter, sealed[:-1]),  # truncated
    ]
    for receiver, sender, kind, n, text in attempts:
        with pytest.raises(InterceptionError) as err:
            SdpAuthenticator(key, SESSION, receiver).unseal(sender, kind, n, text)
        assert err.value.reason == "bad_mac", (receiver, sender, kind, n)
    with pytest.raises(InterceptionError, match="bad_mac"):  # another session with the same link key
        SdpAuthenticator(key, "s_other", CLIENT).unseal(THERAPIST, "candidate", counter, sealed)
    # A rejected message changes no state: the genuine one still opens.
    assert SdpAuthenticator(key, SESSION, CLIENT).unseal(THERAPIST, "candidate", counter, sealed) == CANDIDATE


def test_sealing_draws_a_fresh_random_nonce_every_time() -> None:
    therapist, _client = make_pair()
    nonces = {b64url_decode(therapist.seal(CLIENT, "candidate", CANDIDATE)[1])[:12] for _ in range(2000)}
    assert len(nonces) == 2000


def test_a_sealer_refuses_beyond_its_limit_per_direction_key() -> None:
    key = decode_link_key(new_link_key())
    therapist = SdpAuthenticator(key, SESSION, THERAPIST, clock=lambda: 1_000, seal_limit=3)
    client = SdpAuthenticator(key, SESSION, CLIENT)
    counters = [therapist.seal(CLIENT, "candidate", CANDIDATE) for _ in range(3)]
    for counter, sealed in counters:
        client.unseal(THERAPIST, "candidate", counter, sealed)
    with pytest.raises(ValueError, match="refusing to seal"):
        therapist.seal(CLIENT, "offer", {"sdp": chrome_like_sdp("t")})
    assert [c for c, _ in counters] == [1_000, 1_001, 1_002]
    assert therapist.next_counter(CLIENT) == 1_003  # the refused seal took no counter
    assert therapist.seal("seat-2", "candidate", CANDIDATE)[0] == 1_000  # another direction key


def test_the_seal_limit_stays_far_under_the_random_nonce_bound() -> None:
    """NIST SP 800-38D 8.3: at most 2**32 messages under one key with random 96-bit nonces."""
    assert MAX_SEALS_PER_KEY == 2**20 <= 2**32
    for limit in (0, MAX_SEALS_PER_KEY + 1):
        with pytest.raises(ValueError, match="seal_limit"):
            SdpAuthenticator(None, SESSION, CLIENT, seal_limit=limit)


def test_without_the_link_key_nothing_is_sealed_or_opened() -> None:
    keyless = SdpAuthenticator(None, SESSION, THERAPIST)
    with pytest.raises(ValueError, match="without the link key"):
        keyless.seal(CLIENT, "offer", {"sdp": chrome_like_sdp("t")})
    therapist, _client = make_pair()
    counter, sealed = therapist.seal(CLIENT, "offer", {"sdp": chrome_like_sdp("t")})
    with pytest.raises(ValueError, match="without the link key"):
        SdpAuthenticator(None, SESSION, CLIENT).unseal(THERAPIST, "offer", counter, sealed)


@pytest.mark.parametrize(
    ("kind", "fields"),
    [
        ("offer", {"sdp": 1}),
        ("offer", {"sdp": "v=0", "mac": None}),
        ("offer", {"candidate": "x", "sdp_mid": None, "sdp_mline_index": None}),
        ("offer", {"sdp": "x" * (48 * 1024 + 1)}),
        ("candidate", {"candidate": "x"}),
        ("candidate", {"candidate": "x", "sdp_mid": None, "sdp_mline_index": 256}),
        ("candidate", {"candidate": "x", "sdp_mid": None, "sdp_mline_index": True}),
        ("candidate", {"candidate": "x" * 1025, "sdp_mid": None, "sdp_mline_index": 0}),
        ("candidate", {"candidate": "\ud800", "sdp_mid": None, "sdp_mline_index": 0}),
        ("renegotiate", {}),
    ],
)
def test_only_well_formed_plaintexts_are_sealed(kind: str, fields: dict[str, Any]) -> None:
    therapist, _client = make_pair()
    with pytest.raises((ValueError, UnicodeEncodeError)):
        therapist.seal(CLIENT, kind, fields)
    assert therapist.next_counter(CLIENT) == 1_000  # nothing was taken: the clock's first tick


def _sealed_by_hand(text: str, kind: str = "offer", counter: int = 5) -> tuple[bytes, str]:
    """What a buggy peer holding the key could seal: any plaintext at all."""
    key = decode_link_key(new_link_key())
    k_seal = derive_seal_key(pair_key(derive_auth_key(key, SESSION), THERAPIST, CLIENT), THERAPIST, CLIENT)
    return key, seal_signal(k_seal, SESSION, THERAPIST, CLIENT, kind, counter, text)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('{"sdp": "v=0"}', "missing_fingerprint"),  # the fingerprint checks stay exactly as in clear
        ('{"sdp": "a=fingerprint:sha-256 AB"}', "fingerprint_mismatch"),
        ('{"sdp": "v=0", "extra": 1}', "malformed"),
        ("[]", "malformed"),
        ("not json", "malformed"),
        ('{"sdp": NaN}', "malformed"),
    ],
)
def test_an_opened_plaintext_is_checked_like_a_clear_one(text: str, reason: str) -> None:
    key, sealed = _sealed_by_hand(text)
    receiver = SdpAuthenticator(key, SESSION, CLIENT)
    with pytest.raises(InterceptionError) as err:
        receiver.unseal(THERAPIST, "offer", 5, sealed)
    assert err.value.reason == reason


@pytest.mark.parametrize(
    ("sender", "kind", "counter"),
    [(CLIENT, "offer", 1), (THERAPIST, "renegotiate", 1), (THERAPIST, "offer", None), (THERAPIST, "offer", 2**53)],
)
def test_malformed_sealed_headers(sender: str, kind: str, counter: Any) -> None:
    therapist, client = make_pair()
    _, sealed = therapist.seal(CLIENT, "offer", {"sdp": chrome_like_sdp("t")})
    with pytest.raises(InterceptionError) as err:
        client.unseal(sender, kind, counter, sealed)
    assert err.value.reason == "malformed"


def test_the_largest_sealable_description_fits_the_field_and_the_frame() -> None:
    from broker.signaling.protocol import MAX_MESSAGE_BYTES, Offer, Sealed, decode_client, encode

    therapist, client = make_pair()
    head = chrome_like_sdp("t")
    room = MAX_SEALED_PLAINTEXT - len(signal_plaintext("offer", {"sdp": head}))
    sdp = head + "a" * room  # plaintext exactly at the limit
    counter, sealed = therapist.seal(CLIENT, "offer", {"sdp": sdp})
    assert MIN_SEALED_CHARS <= len(sealed) <= MAX_SEALED_CHARS
    meta = Sealed.__metadata__[0]
    assert (meta.min_length, meta.max_length) == (MIN_SEALED_CHARS, MAX_SEALED_CHARS)
    frame = encode(Offer(to="p" * 64, counter=MAX_COUNTER, sealed=sealed, id="i" * 64, from_="f" * 64))
    assert len(frame) < MAX_MESSAGE_BYTES
    assert decode_client(frame).sealed == sealed  # type: ignore[union-attr]
    assert client.unseal(THERAPIST, "offer", counter, sealed) == {"sdp": sdp}
    with pytest.raises(ValueError, match="cannot be sealed"):
        therapist.seal(CLIENT, "offer", {"sdp": sdp + "a"})


if __name__ == "__main__":
    write_vectors()
    sys.exit(0)
