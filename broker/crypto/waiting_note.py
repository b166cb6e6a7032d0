"""A word to the waiting room: the therapist's short note to a waiting client, sealed end to end.

The therapist's side seals it with the client's pair link key (the seat key it derives from the
session secret, docs/protocol.md 7.1); the client opens it with the key its link carries. The
broker only passes it on (``waiting_note`` → ``therapist_note``), so it can drop or repeat a
note but never read, alter or re-address one (7.4.2). ``web/js/e2ee.js`` implements the same
(``sealNote``/``openNote``); the ``waiting_note`` vectors in tests/vectors/e2ee.json keep the
two identical. Nothing here logs plaintext.
"""

from __future__ import annotations

import json
import os
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from broker.crypto.link_key import LINK_KEY_BYTES, NONCE_BYTES, TAG_BYTES, b64url_decode, b64url_encode, lp, utf8

NOTE_INFO: Final = b"waiting-note v1"
NOTE_LABEL: Final = "tt-note v1"
#: The longest note, in characters (code points), after trimming blanks at both ends.
MAX_NOTE_CHARS: Final = 280


class NoteError(ValueError):
    """A sealed note that does not open (altered, or sealed for another key, session or seat) or
    whose plaintext is not ``{"text": string}`` with 1-280 characters."""


def derive_note_key(link_key: bytes, session_id: str) -> bytes:
    """K_note = HKDF-SHA256(L, salt = session id, info = "waiting-note v1"): a key of its own."""
    if len(link_key) != LINK_KEY_BYTES:
        raise ValueError("a link key is 32 bytes")
    return HKDF(hashes.SHA256(), 32, utf8(session_id), NOTE_INFO).derive(link_key)


def note_aad(session_id: str, peer_id: str) -> bytes:
    return lp(NOTE_LABEL) + lp(session_id) + lp(peer_id)


def note_plaintext(text: str) -> str:
    """``{"text": ...}`` as ``JSON.stringify`` writes it, the text trimmed; ValueError if empty or too long."""
    trimmed = text.strip()
    if not 1 <= len(trimmed) <= MAX_NOTE_CHARS:
        raise ValueError(f"a note has 1 to {MAX_NOTE_CHARS} characters")
    return json.dumps({"text": trimmed}, ensure_ascii=False, separators=(",", ":"))


def seal_note(link_key: bytes, session_id: str, peer_id: str, text: str, *, nonce: bytes | None = None) -> str:
    """Seal a note for client seat ``peer_id``. ``nonce`` exists for test vectors only."""
    if nonce is None:
        nonce = os.urandom(NONCE_BYTES)
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"nonce must be {NONCE_BYTES} bytes")
    key = derive_note_key(link_key, session_id)
    return b64url_encode(nonce + AESGCM(key).encrypt(nonce, utf8(note_plaintext(text)), note_aad(session_id, peer_id)))


def open_note(link_key: bytes, session_id: str, peer_id: str, sealed: str) -> str:
    """The note's text; NoteError if it does not open or is not a note."""
    try:
        blob = b64url_decode(sealed)
    except ValueError:
        raise NoteError("a sealed note is base64url") from None
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise NoteError("a sealed note is too short")
    key = derive_note_key(link_key, session_id)
    try:
        plain = AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], note_aad(session_id, peer_id))
    except InvalidTag:
        raise NoteError("the note failed authentication: altered, or sealed for another seat or session") from None
    try:
        value = json.loads(plain.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise NoteError("the note is not JSON text") from None
    if not isinstance(value, dict) or set(value) != {"text"} or not isinstance(value["text"], str):
        raise NoteError('the note is not {"text": string}')
    text: str = value["text"]
    if not 1 <= len(text) <= MAX_NOTE_CHARS:
        raise NoteError(f"the note's text is not 1 to {MAX_NOTE_CHARS} characters")
    return text
