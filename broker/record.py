"""The session record: what happened in a session, without names or content, signed by the broker.

The therapist gets it as the session ends (``session_record``), can keep it
with their own notes, and can later show it was not altered: the signature is
Ed25519 over the record's canonical JSON (sorted keys, no spaces), checked
against the broker's public key published at ``/.well-known/broker-signing-key``.
The record says how each peer was verified (by link, by safety code, or not
at all) as the therapist's side reported it; the broker cannot know that itself.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .session import Session

RECORD_VERSION = 1
_canonical = msgspec.json.Encoder(order="sorted")


def canonical(record: dict[str, Any]) -> bytes:
    return _canonical.encode(record)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class RecordSigner:
    """The broker's Ed25519 key, derived from the server secret (so every process of a practice shares it)."""

    def __init__(self, seed: bytes) -> None:
        self._key = Ed25519PrivateKey.from_private_bytes(seed[:32])
        self.public_raw = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.key_id = hashlib.sha256(self.public_raw).hexdigest()[:16]

    def sign(self, record: dict[str, Any]) -> str:
        return _b64(self._key.sign(canonical(record)))

    def public_jwk(self) -> dict[str, str]:
        """The public key as a JSON Web Key (RFC 8037), as published at the well-known URL."""
        return {"kty": "OKP", "crv": "Ed25519", "x": _b64(self.public_raw), "kid": self.key_id, "use": "sig"}


def build_record(session: Session, *, ended: int, reason: str, verification: dict[str, str] | None) -> dict[str, Any]:
    """Only ids, times, verification and checklist pass status: nothing about a person."""
    verification = verification or {}
    seats = []
    for seat in session.seats:
        checklist = seat.checklist or {}
        seats.append(
            {
                "peer": seat.id,
                "role": seat.role.value,
                "admitted_at": seat.admitted_at,
                "verified": verification.get(seat.id) if seat.role.value == "client" else None,
                "checklist_policy_version": checklist.get("policy_version"),
                "checklist_passed": checklist.get("all_required_met"),
            }
        )
    return {
        "v": RECORD_VERSION,
        "session": session.id,
        "scheduled_start": session.starts,
        "started": session.live_at,
        "ended": ended,
        "end_reason": reason,
        "seats": seats,
    }


def verify_record(record: dict[str, Any], signature: str, public_key: str) -> bool:
    """True if ``signature`` (base64url) is the broker's signature of exactly this record."""
    try:
        key = Ed25519PublicKey.from_public_bytes(_unb64(public_key))
        key.verify(_unb64(signature), canonical(record))
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True
