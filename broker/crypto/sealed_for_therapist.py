"""What the client seals for the therapist alone: emergency details and checklist answers.

The broker stores and forwards both but can read neither (docs/protocol.md 7.4 and 7.4.1):
each is AES-256-GCM under its own key from the link key, bound to the session and the
client's seat, so a sealed value cannot be moved to another seat or session unnoticed.

``web/js/e2ee.js`` implements the same functions for the browser; the shared vectors in
``tests/vectors/e2ee.json`` keep the two byte-for-byte identical. Nothing here logs plaintext.
"""

from __future__ import annotations

import json
import os
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from broker.crypto.link_key import (
    NONCE_BYTES,
    TAG_BYTES,
    b64url_decode,
    b64url_encode,
    derive_checklist_key,
    derive_details_key,
    lp,
    utf8,
)

__all__ = [
    "DetailsError",
    "checklist_plaintext",
    "open_checklist",
    "open_details",
    "seal_checklist",
    "seal_details",
]

DETAILS_LABEL: Final = "tt-details v1"
CHECKLIST_LABEL: Final = "tt-checklist v1"


class DetailsError(ValueError):
    """Sealed emergency details could not be opened (tampered, or wrong key/session/seat)."""


def _for_therapist_aad(label: str, session_id: str, peer_id: str) -> bytes:
    return lp(label) + lp(session_id) + lp(peer_id)


def _seal_for_therapist(key: bytes, aad: bytes, plaintext: str, nonce: bytes | None) -> str:
    if nonce is None:
        nonce = os.urandom(NONCE_BYTES)
    if not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES:
        raise ValueError(f"nonce must be {NONCE_BYTES} bytes")
    return b64url_encode(nonce + AESGCM(key).encrypt(nonce, utf8(plaintext), aad))


def _open_for_therapist(key: bytes, aad: bytes, sealed: str, what: str) -> str:
    try:
        blob = b64url_decode(sealed)
    except ValueError:
        raise DetailsError(f"sealed {what} are not base64url") from None
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise DetailsError(f"sealed {what} are too short")
    try:
        plain = AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except InvalidTag:
        raise DetailsError(
            f"{what} failed authentication: altered in transit, or sealed for another link key, session or seat"
        ) from None
    try:
        return plain.decode("utf-8")
    except UnicodeDecodeError:
        raise DetailsError(f"{what} are not UTF-8 text") from None


def seal_details(
    link_key: bytes,
    session_id: str,
    peer_id: str,
    plaintext: str,
    *,
    nonce: bytes | None = None,
) -> str:
    """Encrypt the client's emergency details (JSON text) so only the link-key holder reads them.

    ``nonce`` exists for test vectors only; leave it None in product code.
    """
    aad = _for_therapist_aad(DETAILS_LABEL, session_id, peer_id)
    return _seal_for_therapist(derive_details_key(link_key, session_id), aad, plaintext, nonce)


def open_details(link_key: bytes, session_id: str, peer_id: str, sealed: str) -> str:
    """Decrypt sealed details; DetailsError if altered or sealed for another key/session/seat."""
    aad = _for_therapist_aad(DETAILS_LABEL, session_id, peer_id)
    return _open_for_therapist(derive_details_key(link_key, session_id), aad, sealed, "emergency details")


def checklist_plaintext(answers: dict[str, bool]) -> str:
    """The sealed checklist's text: ``{"answers": {item id: boolean}}``, keys sorted, no spaces."""
    if not all(isinstance(k, str) and isinstance(v, bool) for k, v in answers.items()):
        raise ValueError("checklist answers are item ids with true or false")
    return json.dumps({"answers": answers}, sort_keys=True, separators=(",", ":"))


def seal_checklist(
    link_key: bytes,
    session_id: str,
    peer_id: str,
    answers: dict[str, bool],
    *,
    nonce: bytes | None = None,
) -> str:
    """Seal the client's answer to every checklist item for the therapist: the broker checks the
    required items in clear and keeps nothing per item (section 7.4). ``nonce``: vectors only."""
    aad = _for_therapist_aad(CHECKLIST_LABEL, session_id, peer_id)
    return _seal_for_therapist(derive_checklist_key(link_key, session_id), aad, checklist_plaintext(answers), nonce)


def open_checklist(link_key: bytes, session_id: str, peer_id: str, sealed: str) -> dict[str, bool]:
    """The answers a client sealed; DetailsError if altered, sealed for another seat, or malformed."""
    aad = _for_therapist_aad(CHECKLIST_LABEL, session_id, peer_id)
    text = _open_for_therapist(derive_checklist_key(link_key, session_id), aad, sealed, "checklist answers")
    try:
        answers = json.loads(text)["answers"]
    except (ValueError, KeyError, TypeError):
        raise DetailsError("checklist answers are not the expected JSON") from None
    if not isinstance(answers, dict) or not all(isinstance(v, bool) for v in answers.values()):
        raise DetailsError("checklist answers are not the expected JSON")
    return answers
