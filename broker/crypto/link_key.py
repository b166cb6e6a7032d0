"""The link key and the keys both peers derive from it (DESIGN.md section 4; docs/protocol.md 7.1).

The link key (256 bits) travels only in the invite link's fragment, so the broker never sees it.
Every end-to-end key comes from it here, each under its own label, so no two purposes ever
share a key: K_auth (SDP MACs, and through K_pair the sealed signaling keys), K_details and
K_checklist (what the client seals for the therapist). The byte encodings every end-to-end
field uses (base64url without padding, length-prefixed fields, 8-byte counters) live here too.

``web/js/e2ee.js`` implements the same functions for the browser; the shared vectors in
``tests/vectors/e2ee.json`` keep the two byte-for-byte identical. Nothing here logs or stores a key.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "LINK_KEY_BYTES",
    "MAX_COUNTER",
    "NONCE_BYTES",
    "TAG_BYTES",
    "b64url_decode",
    "b64url_encode",
    "check_counter",
    "decode_link_key",
    "derive_auth_key",
    "derive_checklist_key",
    "derive_details_key",
    "hmac_sha256",
    "lp",
    "new_link_key",
    "pair_key",
    "u64",
    "utf8",
]

LINK_KEY_BYTES: Final = 32
LINK_KEY_CHARS: Final = 43  # base64url without padding of 32 bytes
#: Every AES-256-GCM seal is base64url(nonce || ciphertext || tag).
NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16
# Counters are unix microseconds; 2**53 - 1 keeps them exact in a JS Number.
MAX_COUNTER: Final = 2**53 - 1

AUTH_INFO: Final = b"sdp-auth v1"
DETAILS_INFO: Final = b"emergency-details v1"
CHECKLIST_INFO: Final = b"checklist-answers v1"
PAIR_LABEL: Final = "pair v1"

_B64URL_RE: Final = re.compile(r"[A-Za-z0-9_-]*")


# -- encodings -----------------------------------------------------------------


def b64url_encode(data: bytes) -> str:
    """Base64url without padding: the one text form for keys, MACs and ciphertexts."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Strict base64url-nopad decoding: one text per byte string, nothing lenient."""
    if not isinstance(text, str) or not _B64URL_RE.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not base64url without padding")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not base64url without padding") from exc
    if b64url_encode(data) != text:  # non-zero trailing bits
        raise ValueError("not canonical base64url")
    return data


def utf8(value: str | bytes) -> bytes:
    """The UTF-8 bytes of a text field; bytes pass through unchanged."""
    if isinstance(value, bytes):
        return value
    if not isinstance(value, str):
        raise TypeError(f"expected str, got {type(value).__name__}")
    return value.encode("utf-8")  # strict: lone surrogates raise, as in e2ee.js


def lp(value: str | bytes) -> bytes:
    """Length-prefixed field (4-byte big-endian length) so fields can never run together."""
    data = utf8(value)
    if len(data) >= 2**32:
        raise ValueError("field too long for a 4-byte length prefix")
    return len(data).to_bytes(4, "big") + data


def u64(n: int) -> bytes:
    """8-byte big-endian unsigned integer."""
    return check_counter(n).to_bytes(8, "big")


def check_counter(n: int) -> int:
    """``n`` itself if it is a valid counter (0..MAX_COUNTER), else ValueError."""
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_COUNTER:
        raise ValueError(f"counter must be an integer in 0..{MAX_COUNTER}")
    return n


# -- link key and the keys derived from it ----------------------------------------


def new_link_key() -> str:
    """A fresh 256-bit link key in its link-fragment form (43 base64url characters)."""
    return b64url_encode(os.urandom(LINK_KEY_BYTES))


def decode_link_key(text: str) -> bytes:
    """The 32 key bytes of a link fragment; ValueError says what is wrong with it."""
    if not isinstance(text, str):
        raise ValueError("link key must be text")
    if len(text) != LINK_KEY_CHARS:
        raise ValueError(
            f"link key must be {LINK_KEY_CHARS} base64url characters, got {len(text)} (was the link cut short?)"
        )
    if not _B64URL_RE.fullmatch(text):
        raise ValueError("link key contains characters outside the base64url alphabet")
    try:
        return b64url_decode(text)
    except ValueError as exc:
        raise ValueError("link key is not canonical base64url") from exc


def _check_link_key(link_key: bytes) -> bytes:
    if not isinstance(link_key, bytes) or len(link_key) != LINK_KEY_BYTES:
        raise ValueError(f"link key must be {LINK_KEY_BYTES} bytes (use decode_link_key)")
    return link_key


def _hkdf(link_key: bytes, session_id: str, info: bytes) -> bytes:
    kdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=utf8(session_id), info=info)
    return kdf.derive(_check_link_key(link_key))


def derive_auth_key(link_key: bytes, session_id: str) -> bytes:
    """K_auth: binds every SDP MAC to this link key and this session."""
    return _hkdf(link_key, session_id, AUTH_INFO)


def derive_details_key(link_key: bytes, session_id: str) -> bytes:
    """K_details: a separate key so sealing never shares a key with SDP MACs."""
    return _hkdf(link_key, session_id, DETAILS_INFO)


def derive_checklist_key(link_key: bytes, session_id: str) -> bytes:
    """K_checklist: seals the client's answer to every checklist item for the therapist (section 7.4)."""
    return _hkdf(link_key, session_id, CHECKLIST_INFO)


def hmac_sha256(key: bytes, data: bytes) -> bytes:
    """HMAC-SHA256 of ``data`` under ``key``: K_pair and the SDP MACs."""
    mac = crypto_hmac.HMAC(key, hashes.SHA256())
    mac.update(data)
    return mac.finalize()


def pair_key(k_auth: bytes, a: str, b: str) -> bytes:
    """K_pair: one key per unordered peer pair, so a group member cannot forge for others' pairs."""
    lo, hi = (a, b) if a <= b else (b, a)  # str order is code-point order
    return hmac_sha256(k_auth, lp(PAIR_LABEL) + lp(lo) + lp(hi))
