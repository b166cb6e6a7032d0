"""Therapist password policy and scrypt hashing.

The policy follows NIST SP 800-63B-4: a length floor (15 characters when the password is the
only factor, 8 when a second factor is also required), a generous ceiling, no composition rules,
a blocklist of common passwords, and no password that contains the login name. Length is counted
in Unicode code points after NFKC normalisation, and the normalised form is what gets hashed, so
the same password typed on different keyboards still verifies.

Hashes are self-describing strings ``scrypt$n$r$p$salt$hash`` so the cost can be raised later:
``needs_rehash`` tells the caller to re-hash on the next successful login.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

MIN_LENGTH_SINGLE_FACTOR = 15
MIN_LENGTH_WITH_SECOND_FACTOR = 8
MAX_LENGTH = 128
# Verification refuses absurd inputs before hashing them; no stored password can be this long.
_VERIFY_INPUT_LIMIT = 4 * MAX_LENGTH
_SALT_BYTES = 16
_HASH_BYTES = 32
_SCHEME = "scrypt"
# Bounds for parameters read back from storage, so a corrupted row cannot make us allocate gigabytes.
_MAX_LOG2_N = 20
_MAX_R = 32
_MAX_P = 16
# A blocklisted word wrapped in at most this many digits/symbols ("Password2024!") is still refused.
_MAX_DECORATION = 6
# Passwords that are one short unit repeated ("abcabcabcabcabc") are refused.
_MAX_REPEATED_UNIT = 4


class PasswordRejected(ValueError):
    """A new password breaks the policy; ``reason`` is a sentence fit to show the user."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ScryptParams:
    """scrypt cost: n (CPU/memory, power of two), r (block size), p (parallelism)."""

    n: int = 2**17
    r: int = 8
    p: int = 1

    def __post_init__(self) -> None:
        if self.n < 2 or self.n & (self.n - 1) or self.n > 2**_MAX_LOG2_N:
            raise ValueError("scrypt n must be a power of two between 2 and 2**20")
        if not 1 <= self.r <= _MAX_R or not 1 <= self.p <= _MAX_P:
            raise ValueError("scrypt r or p out of range")


# OWASP's current floor for scrypt: about 128 MiB and a third of a second per hash on our machines.
DEFAULT_PARAMS = ScryptParams()


def normalize(password: str) -> str:
    """NFKC form used for length counting, policy checks and hashing."""
    return unicodedata.normalize("NFKC", password)


@lru_cache(maxsize=1)
def blocklist() -> frozenset[str]:
    """The shipped list of common passwords, lowercased, loaded once."""
    text = resources.files(__package__ or "broker").joinpath("common_passwords.txt").read_text("utf-8")
    entries = (line.strip() for line in text.splitlines())
    return frozenset(e.casefold() for e in entries if e and not e.startswith("#"))


def check_password(password: str, *, username: str | None = None, second_factor: bool = False) -> str:
    """Return the normalised password or raise PasswordRejected with a reason for the user."""
    pw = normalize(password)
    minimum = MIN_LENGTH_WITH_SECOND_FACTOR if second_factor else MIN_LENGTH_SINGLE_FACTOR
    length = len(pw)
    if length < minimum:
        raise PasswordRejected(f"The password must be at least {minimum} characters long (it has {length}).")
    if length > MAX_LENGTH:
        raise PasswordRejected(f"The password must be at most {MAX_LENGTH} characters long (it has {length}).")
    if any(unicodedata.category(ch) == "Cc" for ch in pw):
        raise PasswordRejected("The password contains a control character; use letters, digits, symbols or spaces.")
    if _is_common(pw):
        raise PasswordRejected("This password is too common and easy to guess; choose a different one.")
    if _is_repetitive(pw):
        raise PasswordRejected("The password is a short pattern repeated; choose something less predictable.")
    if username is not None and _contains_username(pw, username):
        raise PasswordRejected("The password must not contain your login name.")
    return pw


def _is_common(pw: str) -> bool:
    folded = pw.casefold()
    words = blocklist()
    if folded in words:
        return True
    core = folded.strip("0123456789!@#$%^&*()-_=+.,;:?~ ")
    return bool(core) and len(folded) - len(core) <= _MAX_DECORATION and core in words


def _is_repetitive(pw: str) -> bool:
    sizes = range(1, _MAX_REPEATED_UNIT + 1)
    return any(len(pw) % size == 0 and pw[:size] * (len(pw) // size) == pw for size in sizes)


def _contains_username(pw: str, username: str) -> bool:
    name = normalize(username).strip().casefold()
    # A one- or two-letter name would forbid half the alphabet (and cannot equal a valid password).
    return len(name) >= 3 and name in pw.casefold()


def hash_password(password: str, params: ScryptParams = DEFAULT_PARAMS) -> str:
    """Hash a (policy-checked) password with a fresh 16-byte salt; returns the encoded string."""
    salt = os.urandom(_SALT_BYTES)
    digest = _derive(normalize(password), salt, params)
    return "$".join((_SCHEME, str(params.n), str(params.r), str(params.p), _b64(salt), _b64(digest)))


def verify_password(password: str, encoded: str) -> bool:
    """Constant-time check of a password against an encoded hash; ValueError if the hash is malformed."""
    params, salt, expected = _decode(encoded)
    pw = normalize(password)
    if len(pw) > _VERIFY_INPUT_LIMIT:
        return False
    return hmac.compare_digest(_derive(pw, salt, params), expected)


def needs_rehash(encoded: str, params: ScryptParams = DEFAULT_PARAMS) -> bool:
    """True when the stored hash is weaker than ``params`` (or not ours) and should be redone."""
    try:
        stored, salt, digest = _decode(encoded)
    except ValueError:
        return True
    weaker = stored.n < params.n or stored.r < params.r or stored.p < params.p
    return weaker or len(salt) < _SALT_BYTES or len(digest) != _HASH_BYTES


def _derive(password: str, salt: bytes, params: ScryptParams) -> bytes:
    kdf = Scrypt(salt=salt, length=_HASH_BYTES, n=params.n, r=params.r, p=params.p)
    return kdf.derive(password.encode("utf-8"))


def _decode(encoded: str) -> tuple[ScryptParams, bytes, bytes]:
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != _SCHEME:
        raise ValueError("not an scrypt password hash")
    try:
        params = ScryptParams(n=int(parts[1]), r=int(parts[2]), p=int(parts[3]))
        salt, digest = _unb64(parts[4]), _unb64(parts[5])
    except (binascii.Error, ValueError) as exc:
        raise ValueError("malformed scrypt password hash") from exc
    if not salt or not digest:
        raise ValueError("malformed scrypt password hash")
    return params, salt, digest


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
