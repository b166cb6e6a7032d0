"""Sealed signaling: offers, answers and ICE candidates encrypted end to end (docs/protocol.md 7.7).

Peers holding the link key encrypt what they relay (AES-256-GCM) with a key per direction
of a peer pair, so the broker sees only the routing header, which is the associated data, and
never reads ICE credentials or network addresses. The plaintext is compact JSON in a fixed
field order, within the limits of the clear form.

``web/js/e2ee.js`` implements the same functions for the browser; the shared vectors in
``tests/vectors/e2ee.json`` keep the two byte-for-byte identical. Nothing here logs a key or plaintext.
"""

from __future__ import annotations

import json
import os
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from broker.crypto.link_key import NONCE_BYTES, TAG_BYTES, b64url_decode, b64url_encode, lp, u64, utf8
from broker.crypto.sdp_auth import SDP_TYPES, InterceptionError

__all__ = [
    "MAX_SEALED_CHARS",
    "MAX_SEALED_PLAINTEXT",
    "MAX_SEALS_PER_KEY",
    "MIN_SEALED_CHARS",
    "SEALED_TYPES",
    "SIGNAL_TYPES",
    "derive_seal_key",
    "open_signal",
    "parse_signal_plaintext",
    "seal_aad",
    "seal_signal",
    "signal_plaintext",
]

#: What may be sealed end to end: descriptions and trickled ICE candidates.
SIGNAL_TYPES: Final = frozenset({"offer", "answer", "candidate"})
#: Every type sealed under a direction key: the signaling above, and the therapist's roster (7.8).
SEALED_TYPES: Final = SIGNAL_TYPES | {"roster"}
#: Longest SDP a description may carry (the clear form's limit in broker/signaling/protocol.py).
MAX_SDP_CHARS: Final = 48 * 1024
MAX_CANDIDATE_CHARS: Final = 1024
MAX_MID_CHARS: Final = 64
# A sealed field is base64url(nonce || ciphertext || tag). Its longest form keeps a sealed
# frame under the broker's 64 KiB frame limit; its shortest holds a 2-byte plaintext ("{}").
MAX_SEALED_CHARS: Final = 65_000
MIN_SEALED_CHARS: Final = 40
MAX_SEALED_PLAINTEXT: Final = MAX_SEALED_CHARS * 3 // 4 - NONCE_BYTES - TAG_BYTES  # 48,722 bytes
#: Seals one sealer makes under one direction key before refusing. Random 96-bit nonces are
#: safe for 2**32 messages per key (NIST SP 800-38D section 8.3); a session needs a few thousand.
MAX_SEALS_PER_KEY: Final = 2**20

SEAL_LABEL: Final = "tt-seal v1"


def derive_seal_key(k_pair: bytes, sender: str, recipient: str) -> bytes:
    """K_seal(sender -> recipient): both directions share K_pair, so each gets its own key."""
    if not isinstance(k_pair, bytes) or len(k_pair) != 32:
        raise ValueError("K_pair must be 32 bytes")
    info = lp(SEAL_LABEL) + lp(sender) + lp(recipient)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"", info=info).derive(k_pair)


def seal_aad(session_id: str, sender: str, recipient: str, kind: str, counter: int) -> bytes:
    """The associated data of a sealed message: its routing header, which the broker sees."""
    if kind not in SEALED_TYPES:
        raise ValueError("type must be 'offer', 'answer', 'candidate' or 'roster'")
    return b"".join((lp(SEAL_LABEL), lp(session_id), lp(sender), lp(recipient), lp(kind), u64(counter)))


def _text_field(value: object, limit: int, *, nullable: bool) -> bool:
    if value is None:
        return nullable
    return isinstance(value, str) and len(value) <= limit


def _check_signal_fields(kind: str, fields: dict[str, object]) -> None:
    """Raise ValueError unless ``fields`` is exactly the plaintext of a ``kind`` message."""
    if not isinstance(fields, dict):
        raise ValueError("plaintext must be an object")
    if kind in SDP_TYPES:
        if set(fields) != {"sdp"} or not _text_field(fields["sdp"], MAX_SDP_CHARS, nullable=False):
            raise ValueError('a description\'s plaintext is {"sdp": text of at most 48 KiB}')
        return
    if kind != "candidate":
        raise ValueError("type must be 'offer', 'answer' or 'candidate'")
    index = fields.get("sdp_mline_index")
    if (
        set(fields) != {"candidate", "sdp_mid", "sdp_mline_index"}
        or not _text_field(fields["candidate"], MAX_CANDIDATE_CHARS, nullable=False)
        or not _text_field(fields["sdp_mid"], MAX_MID_CHARS, nullable=True)
        or not (index is None or (isinstance(index, int) and not isinstance(index, bool) and 0 <= index <= 255))
    ):
        raise ValueError(
            'a candidate\'s plaintext is {"candidate", "sdp_mid", "sdp_mline_index"}'
            " within the limits of the clear form"
        )


def signal_plaintext(kind: str, fields: dict[str, object]) -> str:
    """The exact plaintext of a sealed message: compact JSON, fields in a fixed order.

    Both implementations write the same text (e2ee.js uses JSON.stringify), so the
    shared vectors can compare ciphertexts; receivers do not depend on the exact form.
    """
    _check_signal_fields(kind, fields)
    order = ("sdp",) if kind in SDP_TYPES else ("candidate", "sdp_mid", "sdp_mline_index")
    for name in order:
        value = fields[name]
        if isinstance(value, str):
            utf8(value)  # lone surrogates raise here, as in e2ee.js
    return json.dumps({name: fields[name] for name in order}, ensure_ascii=False, separators=(",", ":"))


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def parse_signal_plaintext(kind: str, text: str) -> dict[str, object]:
    """The fields of an opened message; InterceptionError("malformed") if it is not one."""
    try:
        fields: dict[str, object] = json.loads(text, parse_constant=_no_constant)  # NaN, Infinity: not JSON
        _check_signal_fields(kind, fields)
    except (ValueError, RecursionError) as exc:
        raise InterceptionError("malformed", f"sealed plaintext: {exc}") from None
    return fields


def seal_signal(
    k_seal: bytes,
    session_id: str,
    sender: str,
    recipient: str,
    kind: str,
    counter: int,
    plaintext: str,
    *,
    nonce: bytes | None = None,
) -> str:
    """base64url(nonce || AES-256-GCM ciphertext || tag) of one offer, answer or candidate.

    ``nonce`` exists for test vectors only; product code leaves it None (12 random bytes).
    """
    if nonce is None:
        nonce = os.urandom(NONCE_BYTES)
    if not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES:
        raise ValueError(f"nonce must be {NONCE_BYTES} bytes")
    data = utf8(plaintext)
    if len(data) > MAX_SEALED_PLAINTEXT:
        raise ValueError(f"plaintext over {MAX_SEALED_PLAINTEXT} bytes cannot be sealed")
    aad = seal_aad(session_id, sender, recipient, kind, counter)
    return b64url_encode(nonce + AESGCM(k_seal).encrypt(nonce, data, aad))


def open_signal(
    k_seal: bytes,
    session_id: str,
    sender: str,
    recipient: str,
    kind: str,
    counter: int,
    sealed: str,
) -> str:
    """The plaintext of a sealed message; InterceptionError("bad_mac") if it does not open."""
    try:
        blob = b64url_decode(sealed)
    except ValueError:
        raise InterceptionError("bad_mac", "sealed field is not base64url") from None
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise InterceptionError("bad_mac", "sealed field is too short")
    aad = seal_aad(session_id, sender, recipient, kind, counter)
    try:
        plain = AESGCM(k_seal).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except InvalidTag:
        raise InterceptionError("bad_mac") from None
    try:
        return plain.decode("utf-8")
    except UnicodeDecodeError:
        raise InterceptionError("malformed", "sealed plaintext is not UTF-8") from None
