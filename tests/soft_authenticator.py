"""A software WebAuthn authenticator for tests: what a security key or phone does, in Python.

It makes real P-256 credentials, "none" attestation and real signatures over the authenticator
data and the client data hash, following the WebAuthn Level 3 formats, so the broker's passkey
checks (the ``webauthn`` package) run against genuine responses. A browser test drives
Chromium's own virtual authenticator instead.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from typing import Any

import cbor2
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

_FLAG_UP = 0x01
_FLAG_UV = 0x04
_FLAG_AT = 0x40
_AAGUID = bytes(16)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class Credential:
    id: bytes
    key: ec.EllipticCurvePrivateKey
    rp_id: str
    sign_count: int = 0


@dataclass
class SoftAuthenticator:
    """Holds credentials and answers create/get options as ``PublicKeyCredential.toJSON()`` does."""

    origin: str
    credentials: list[Credential] = field(default_factory=list)

    def create(self, options: dict[str, Any], *, origin: str | None = None) -> dict[str, Any]:
        public = options["publicKey"] if "publicKey" in options else options
        rp_id = public["rp"]["id"]
        excluded = {c["id"] for c in public.get("excludeCredentials", [])}
        if any(b64url(c.id) in excluded for c in self.credentials if c.rp_id == rp_id):
            raise ValueError("InvalidStateError: this authenticator already holds a listed credential")
        cred = Credential(os.urandom(32), ec.generate_private_key(ec.SECP256R1()), rp_id)
        self.credentials.append(cred)
        client_data = self._client_data("webauthn.create", public["challenge"], origin)
        numbers = cred.key.public_key().public_numbers()
        cose_key = {1: 2, 3: -7, -1: 1, -2: numbers.x.to_bytes(32, "big"), -3: numbers.y.to_bytes(32, "big")}
        attested = _AAGUID + struct.pack(">H", len(cred.id)) + cred.id + cbor2.dumps(cose_key)
        auth_data = self._auth_data(rp_id, _FLAG_UP | _FLAG_UV | _FLAG_AT, cred.sign_count) + attested
        attestation = cbor2.dumps({"fmt": "none", "attStmt": {}, "authData": auth_data})
        return {
            "id": b64url(cred.id),
            "rawId": b64url(cred.id),
            "type": "public-key",
            "response": {
                "clientDataJSON": b64url(client_data),
                "attestationObject": b64url(attestation),
                "transports": ["internal"],
            },
            "clientExtensionResults": {},
            "authenticatorAttachment": "platform",
        }

    def get(
        self, options: dict[str, Any], *, origin: str | None = None, count_step: int = 1, rp_id: str | None = None
    ) -> dict[str, Any]:
        public = options["publicKey"] if "publicKey" in options else options
        rp = rp_id or public["rpId"]
        allowed = {c["id"] for c in public.get("allowCredentials", [])}
        cred = next(c for c in self.credentials if b64url(c.id) in allowed or not allowed)
        cred.sign_count += count_step
        client_data = self._client_data("webauthn.get", public["challenge"], origin)
        auth_data = self._auth_data(rp, _FLAG_UP | _FLAG_UV, cred.sign_count)
        signature = cred.key.sign(auth_data + hashlib.sha256(client_data).digest(), ec.ECDSA(hashes.SHA256()))
        return {
            "id": b64url(cred.id),
            "rawId": b64url(cred.id),
            "type": "public-key",
            "response": {
                "clientDataJSON": b64url(client_data),
                "authenticatorData": b64url(auth_data),
                "signature": b64url(signature),
                "userHandle": None,
            },
            "clientExtensionResults": {},
            "authenticatorAttachment": "platform",
        }

    def _client_data(self, kind: str, challenge: str, origin: str | None) -> bytes:
        data = {"type": kind, "challenge": challenge, "origin": origin or self.origin, "crossOrigin": False}
        return json.dumps(data, separators=(",", ":")).encode()

    @staticmethod
    def _auth_data(rp_id: str, flags: int, sign_count: int) -> bytes:
        return hashlib.sha256(rp_id.encode()).digest() + bytes([flags]) + struct.pack(">I", sign_count)
