"""Passkeys (WebAuthn) as a therapist's second factor, with the ``webauthn`` package.

A passkey stands beside TOTP: after the right password, a therapist with a passkey proves
possession of it instead of typing a code. This module holds the ceremony only (options out,
responses checked); HTTP is in login.py and storage in account_store.py.

The relying party is the broker's public host name. Browsers refuse WebAuthn on an IP address, so
a broker opened as ``http://127.0.0.1:8080`` offers no passkeys (``localhost`` works, as does any
https host name). Challenges are single use and expire after ``CHALLENGE_TTL_S``; each is kept in
the session store (sealed like everything else there) under a key naming its purpose.

We ask for no attestation (the practice does not pick authenticator brands) and prefer user
verification without requiring it: the password is the first factor.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import msgspec
from webauthn import (
    generate_authentication_options,
    generate_registration_options,
    options_to_json,
    verify_authentication_response,
    verify_registration_response,
)
from webauthn.helpers import base64url_to_bytes, bytes_to_base64url
from webauthn.helpers.exceptions import WebAuthnException
from webauthn.helpers.structs import (
    AuthenticatorSelectionCriteria,
    PublicKeyCredentialDescriptor,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)

from broker.config import Config
from broker.store.base import Store

CHALLENGE_TTL_S = 120.0
_CHALLENGE_PREFIX = "passkey-challenge:"


class PasskeyError(Exception):
    """A passkey response that does not verify; the message is fit to show."""


@dataclass(frozen=True)
class RelyingParty:
    """Who the passkeys are for: the broker's host name and the origins pages are served from."""

    rp_id: str
    name: str
    origins: tuple[str, ...]

    @classmethod
    def from_config(cls, config: Config) -> RelyingParty | None:
        """None when the public address is an IP address (browsers refuse passkeys there)."""
        host = urlsplit(config.base_url).hostname or ""
        try:
            ipaddress.ip_address(host)
            return None
        except ValueError:
            pass
        origins = tuple(o for o in config.origins if urlsplit(o).hostname == host)
        return cls(rp_id=host, name=config.practice_name or "Teletherapy broker", origins=origins)


def registration_options(
    rp: RelyingParty, therapist_id: str, username: str, existing: list[dict[str, Any]]
) -> tuple[dict[str, Any], bytes]:
    """Options for ``navigator.credentials.create`` (as JSON) and the challenge to keep."""
    options = generate_registration_options(
        rp_id=rp.rp_id,
        rp_name=rp.name,
        user_id=therapist_id.encode("ascii"),
        user_name=username,
        authenticator_selection=AuthenticatorSelectionCriteria(
            resident_key=ResidentKeyRequirement.DISCOURAGED,
            user_verification=UserVerificationRequirement.PREFERRED,
        ),
        exclude_credentials=[_descriptor(c) for c in existing],
    )
    return msgspec.json.decode(options_to_json(options)), options.challenge


def verify_registration(rp: RelyingParty, credential: dict[str, Any], challenge: bytes) -> dict[str, Any]:
    """The credential to store (base64url fields), or PasskeyError."""
    try:
        verified = verify_registration_response(
            credential=credential,
            expected_challenge=challenge,
            expected_rp_id=rp.rp_id,
            expected_origin=list(rp.origins),
        )
    except (WebAuthnException, ValueError, KeyError, TypeError, RecursionError) as exc:
        # WebAuthnException covers a credential of the wrong shape (InvalidJSONStructure) too.
        raise PasskeyError("The passkey could not be registered. Please try again.") from exc
    return {
        "id": bytes_to_base64url(verified.credential_id),
        "public_key": bytes_to_base64url(verified.credential_public_key),
        "sign_count": verified.sign_count,
        "created_at": int(time.time()),
    }


def authentication_options(rp: RelyingParty, stored: list[dict[str, Any]]) -> tuple[dict[str, Any], bytes]:
    """Options for ``navigator.credentials.get`` listing the account's passkeys, and the challenge."""
    options = generate_authentication_options(
        rp_id=rp.rp_id,
        allow_credentials=[_descriptor(c) for c in stored],
        user_verification=UserVerificationRequirement.PREFERRED,
    )
    return msgspec.json.decode(options_to_json(options)), options.challenge


def verify_authentication(
    rp: RelyingParty, credential: dict[str, Any], challenge: bytes, stored: list[dict[str, Any]]
) -> tuple[str, int]:
    """Which stored passkey signed, and its new signature counter; PasskeyError otherwise."""
    claimed = credential.get("id") if isinstance(credential, dict) else None
    match = next((c for c in stored if c["id"] == claimed), None)
    if match is None:
        raise PasskeyError("That passkey is not registered for this account.")
    try:
        verified = verify_authentication_response(
            credential=credential,
            expected_challenge=challenge,
            expected_rp_id=rp.rp_id,
            expected_origin=list(rp.origins),
            credential_public_key=base64url_to_bytes(match["public_key"]),
            credential_current_sign_count=int(match["sign_count"]),
        )
    except (WebAuthnException, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise PasskeyError("The passkey did not verify.") from exc
    return match["id"], verified.new_sign_count


def _descriptor(stored: dict[str, Any]) -> PublicKeyCredentialDescriptor:
    return PublicKeyCredentialDescriptor(id=base64url_to_bytes(stored["id"]))


# ---------------------------------------------------------------- single-use challenges


async def keep_challenge(store: Store, purpose: str, challenge: bytes) -> None:
    """Remember a challenge for one ceremony (``purpose`` names it: an opaque account or login key)."""
    await store.put(_CHALLENGE_PREFIX + purpose, challenge, CHALLENGE_TTL_S)


async def take_challenge(store: Store, purpose: str) -> bytes | None:
    """The challenge kept for ``purpose``, removed so that it cannot be used twice."""

    def pop(raw: bytes | None) -> tuple[bytes | None, bytes | None]:
        return None, raw

    taken: bytes | None = await store.update(_CHALLENGE_PREFIX + purpose, pop, CHALLENGE_TTL_S)
    return taken
