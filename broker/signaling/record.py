"""The session record: what happened in a session, without names or content, signed by the broker.

The therapist gets it as the session ends (``session_record``), can keep it
with their own notes, and can later show it was not altered: the signature is
Ed25519 over the record's canonical JSON (sorted keys, no spaces), checked
against the broker's public key published at ``/.well-known/broker-signing-key``.
The record says how each peer was verified (by link, by safety code, or not
at all) as the therapist's side reported it; the broker cannot know that itself.

A record file is read strictly before its signature is checked: a duplicate key anywhere,
NaN or Infinity, an integer beyond what every JSON reader holds exactly, or text that is not
valid Unicode is refused, because one reader could then see another value than the one
verified. The bytes verified are the canonical form of what was read, and reading them back
must give exactly the same record.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from typing import Any

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from broker.signaling.session import Session

RECORD_VERSION = 1
_canonical = msgspec.json.Encoder(order="sorted")
#: The largest integer every JSON reader reads exactly (an IEEE 754 double holds it without rounding).
MAX_EXACT_INT = 2**53 - 1


class RecordRefused(ValueError):
    """A record a reader could read differently from the verifier; the message says why."""


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
                "checklist_language": checklist.get("language"),
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
        signed = unambiguous_canonical(record)
        key = Ed25519PublicKey.from_public_bytes(_unb64(public_key))
        key.verify(_unb64(signature), signed)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for name, value in pairs:
        if name in obj:
            raise RecordRefused(
                f"the key {name!r} appears twice in one object, and JSON readers disagree about which value counts"
            )
        obj[name] = value
    return obj


def _constant(name: str) -> Any:
    raise RecordRefused(f"{name} is not a JSON value (readers disagree about what it means)")


def _integer(text: str) -> int:
    value = int(text)
    if abs(value) > MAX_EXACT_INT:
        raise RecordRefused(f"the number {text[:40]} is too large for every JSON reader to read exactly")
    return value


def _number(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise RecordRefused(f"the number {text[:40]} is out of range (readers disagree about what it means)")
    return value


def strict_loads(data: bytes) -> Any:
    """JSON as every reader reads it alike, or RecordRefused."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise RecordRefused("the file is not UTF-8 text") from None
    try:
        return json.loads(
            text, object_pairs_hook=_object, parse_constant=_constant, parse_int=_integer, parse_float=_number
        )
    except RecordRefused:
        raise
    except ValueError as exc:
        raise RecordRefused(f"the file is not valid JSON ({exc})") from None


def _same(a: Any, b: Any) -> bool:
    """Equal, and of the same JSON types all the way down (True is not 1, 1.0 is not 1)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def unambiguous_canonical(record: dict[str, Any]) -> bytes:
    """The canonical bytes of ``record``, once it is certain they read back as exactly ``record``."""
    try:
        data = canonical(record)
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError (a lone surrogate) is a ValueError
        raise RecordRefused(f"the record has a value with no canonical form ({exc})") from None
    if not _same(strict_loads(data), record):
        raise RecordRefused("the record does not read back the same from its canonical form")
    return data


def parse_signed_record(data: bytes) -> tuple[dict[str, Any], str]:
    """The record and its signature from a downloaded file (``{"record", "signature", "key_id"}``),
    read strictly (see the module's docstring); RecordRefused says what is wrong."""
    doc = strict_loads(data)
    if not isinstance(doc, dict):
        raise RecordRefused("the file must hold a JSON object with record, signature and key_id")
    record, signature = doc.get("record"), doc.get("signature")
    if not isinstance(record, dict):
        raise RecordRefused("the file has no record object")
    if not isinstance(signature, str):
        raise RecordRefused("the file has no signature string")
    unambiguous_canonical(record)
    return record, signature
