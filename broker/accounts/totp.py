"""TOTP second factor (RFC 6238) and one-time recovery codes for therapist logins.

SHA-1, 6 digits and a 30-second step are what every authenticator app supports. A code is
accepted one step either side of now to forgive clock drift, and ``verify_code`` returns the
step it matched so the caller can store it: a step at or before the stored one is refused, which
stops a code seen over someone's shoulder from being replayed within its validity window.

Recovery codes are shown once and stored only as HMACs under a server key; they are random
enough (80 bits) that an HMAC is as good as a slow hash here and far cheaper.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

import segno
from cryptography.hazmat.primitives.hashes import SHA1
from cryptography.hazmat.primitives.twofactor.totp import TOTP

DIGITS = 6
STEP_SECONDS = 30
DRIFT_STEPS = 1
SECRET_BYTES = 20
RECOVERY_CODE_COUNT = 10
_RECOVERY_GROUPS = 4
_RECOVERY_GROUP_LEN = 4
_BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_CODE_RE = re.compile(rf"[0-9]{{{DIGITS}}}")
_RECOVERY_RE = re.compile(rf"[A-Z2-7]{{{_RECOVERY_GROUPS * _RECOVERY_GROUP_LEN}}}")


@dataclass(frozen=True)
class TotpEnrolment:
    """What the therapist needs to add the account to an authenticator app."""

    secret: bytes
    uri: str
    qr_svg: str


def new_secret() -> bytes:
    """A fresh 160-bit shared secret (RFC 4226 recommends 160 bits)."""
    return secrets.token_bytes(SECRET_BYTES)


def _totp(secret: bytes) -> TOTP:
    return TOTP(secret, DIGITS, SHA1(), STEP_SECONDS, enforce_key_length=True)


def provisioning_uri(secret: bytes, account_name: str, issuer: str) -> str:
    """otpauth:// URI for the QR code; the issuer is the practice name shown in the app."""
    return _totp(secret).get_provisioning_uri(account_name, issuer)


def qr_svg(uri: str) -> str:
    """The URI as an inline SVG QR code, so the page needs no image request or script."""
    return segno.make(uri, error="m").svg_inline(scale=4, border=4, dark="#000", light="#fff")


def enrol(account_name: str, issuer: str) -> TotpEnrolment:
    """New secret with its URI and QR code; store the secret only once a first code is confirmed."""
    secret = new_secret()
    uri = provisioning_uri(secret, account_name, issuer)
    return TotpEnrolment(secret=secret, uri=uri, qr_svg=qr_svg(uri))


def secret_base32(secret: bytes) -> str:
    """The secret as typed by hand into an app that cannot scan QR codes."""
    return base64.b32encode(secret).decode("ascii").rstrip("=")


def step_at(now: float) -> int:
    """The time step that contains ``now`` (Unix seconds)."""
    return int(now) // STEP_SECONDS


def code_at(secret: bytes, now: float) -> str:
    """The code an authenticator app shows at ``now``; used by tests and the Python client."""
    return _totp(secret).generate(int(now)).decode("ascii")


def verify_code(secret: bytes, code: str, *, last_used_step: int | None, now: float | None = None) -> int | None:
    """Return the matched step if ``code`` is valid and newer than ``last_used_step``, else None."""
    cleaned = code.replace(" ", "")
    if not _CODE_RE.fullmatch(cleaned):
        return None
    current = step_at(time.time() if now is None else now)
    totp = _totp(secret)
    matched: int | None = None
    # Check every candidate step so the work done does not depend on which one matches.
    for step in range(current - DRIFT_STEPS, current + DRIFT_STEPS + 1):
        expected = totp.generate(step * STEP_SECONDS)
        if hmac.compare_digest(expected, cleaned.encode("ascii")) and matched is None:
            matched = step
    if matched is None or (last_used_step is not None and matched <= last_used_step):
        return None
    return matched


def new_recovery_codes(count: int = RECOVERY_CODE_COUNT) -> list[str]:
    """Random codes like ``ABCD-EFGH-JKLM-NPQR`` (80 bits each), shown to the therapist once."""
    codes = []
    for _ in range(count):
        raw = "".join(secrets.choice(_BASE32) for _ in range(_RECOVERY_GROUPS * _RECOVERY_GROUP_LEN))
        groups = [raw[i : i + _RECOVERY_GROUP_LEN] for i in range(0, len(raw), _RECOVERY_GROUP_LEN)]
        codes.append("-".join(groups))
    return codes


def normalize_recovery_code(code: str) -> str | None:
    """Upper-case without separators, or None if it cannot be a recovery code."""
    cleaned = re.sub(r"[\s-]", "", code).upper()
    return cleaned if _RECOVERY_RE.fullmatch(cleaned) else None


def looks_like_recovery_code(code: str) -> bool:
    """Tell a recovery code from a 6-digit TOTP code typed in the same field."""
    return normalize_recovery_code(code) is not None


def hash_recovery_code(code: str, key: bytes) -> str:
    """HMAC-SHA256 of the normalised code under a server key, hex."""
    cleaned = normalize_recovery_code(code)
    if cleaned is None:
        raise ValueError("not a recovery code")
    return hmac.new(key, cleaned.encode("ascii"), hashlib.sha256).hexdigest()


def hash_recovery_codes(codes: list[str], key: bytes) -> list[str]:
    """Hashes to store in place of freshly generated codes."""
    return [hash_recovery_code(c, key) for c in codes]


def use_recovery_code(code: str, stored_hashes: list[str], key: bytes) -> list[str] | None:
    """If ``code`` matches, return the hashes left after removing it (store them); else None."""
    cleaned = normalize_recovery_code(code)
    if cleaned is None:
        return None
    candidate = hmac.new(key, cleaned.encode("ascii"), hashlib.sha256).hexdigest()
    hit: int | None = None
    for index, stored in enumerate(stored_hashes):
        if hmac.compare_digest(candidate, stored) and hit is None:
            hit = index
    if hit is None:
        return None
    return stored_hashes[:hit] + stored_hashes[hit + 1 :]
