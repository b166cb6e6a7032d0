"""Ed25519 signatures of the web manifest: over its exact bytes, detached, one per key.

A key is named by its public key (32 bytes, base64url without padding), as WEBCAT names its
signers; the signatures file maps each to its signature of the manifest (base64url). Private keys
are PKCS#8 PEM files (``broker web-manifest keygen``, or ``openssl genpkey -algorithm ed25519``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
    load_pem_public_key,
)

from broker.crypto.link_key import b64url_decode, b64url_encode
from broker.webmanifest.canonical import canonical_json, strict_loads


class SigningError(ValueError):
    """A key or signatures file that cannot be used (the message says why)."""


def public_key_text(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return b64url_encode(public.public_bytes(Encoding.Raw, PublicFormat.Raw))


def generate_key(path: Path) -> str:
    """A new private key written to ``path`` (mode 0600, never over an existing file); its public key."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise SigningError(f"{path} exists already: it was left as it was") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    return public_key_text(key)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SigningError(f"cannot read the key {path}: {exc.strerror}") from None
    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise SigningError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"{path} is not an Ed25519 key")
    return key


def parse_public_key(text: str) -> Ed25519PublicKey:
    """A public key given as base64url (as listed in a signatures file), a PEM public key, or a
    file holding either."""
    value = text.strip()
    if value and Path(value).is_file():
        value = Path(value).read_text(encoding="utf-8").strip()
    if value.startswith("-----BEGIN"):
        try:
            key = load_pem_public_key(value.encode("ascii"))
        except (ValueError, TypeError):
            raise SigningError("not a PEM public key") from None
        if not isinstance(key, Ed25519PublicKey):
            raise SigningError("not an Ed25519 public key")
        return key
    try:
        raw = b64url_decode(value)
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise SigningError(
            f"{text!r} is not an Ed25519 public key (32 bytes, base64url), nor a file holding one"
        ) from None


def sign(key: Ed25519PrivateKey, message: bytes) -> str:
    return b64url_encode(key.sign(message))


def valid_signers(message: bytes, signatures: Mapping[str, str], trusted: Iterable[str] | None = None) -> list[str]:
    """The public keys (of ``trusted``, when given) whose signature of ``message`` verifies."""
    wanted = None if trusted is None else {public_key_text(parse_public_key(k)) for k in trusted}
    good = []
    for public, signature in sorted(signatures.items()):
        if wanted is not None and public not in wanted:
            continue
        try:
            Ed25519PublicKey.from_public_bytes(b64url_decode(public)).verify(b64url_decode(signature), message)
        except (InvalidSignature, ValueError):
            continue
        good.append(public)
    return good


def parse_signatures(data: bytes) -> dict[str, str]:
    try:
        value = strict_loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise SigningError(f"the signatures are not JSON ({exc})") from None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise SigningError("the signatures are not an object of public key -> signature")
    return value


def read_signatures(path: Path) -> dict[str, str]:
    """The signatures file (none yet: empty)."""
    return parse_signatures(path.read_bytes()) if path.is_file() else {}


def write_signatures(path: Path, signatures: Mapping[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(canonical_json(dict(signatures)))
