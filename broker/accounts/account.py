"""A therapist account as the rest of the broker sees it: its record, its errors, its name rules.

``Account`` is what administrators and the therapist page may see (no secrets); ``LoginResult``
and its stable reasons are the outcome of a login attempt; the errors carry a message fit to show
an administrator; login names and display names are normalised and checked here before anything
is stored. ``AccountStore`` (account_store.py) applies these rules to the stored accounts.

Each account carries a *sessions epoch*, a random value replaced by every change that must end the
account's login sessions: a new password, a second factor added, removed or reset, new recovery
codes, the account disabled. A login session remembers the epoch it was made under and is valid
only while the account still has it (broker/http/login.py), so the change ends every session
wherever it was made, by the web or by ``broker therapist`` in another process. A web change passes
its own new epoch in, so the session that made it can carry on under a fresh cookie.
"""

from __future__ import annotations

import secrets
import unicodedata
from dataclasses import dataclass, field

from broker.signaling.tokens import typeable_id

USERNAME_MIN = 3
USERNAME_MAX = 64
DISPLAY_NAME_MAX = 100

OK = "ok"
RECOVERY_CODE_USED = "recovery_code_used"
PASSKEY_USED = "passkey_used"
INVALID_CREDENTIALS = "invalid_credentials"
SECOND_FACTOR_REQUIRED = "second_factor_required"
SECOND_FACTOR_ENROLMENT_REQUIRED = "second_factor_enrolment_required"


class AccountError(Exception):
    """Base for account errors whose message is fit to show an administrator."""


class AccountsKeyMismatch(AccountError, ValueError):
    """The stored accounts were sealed under another server secret: refuse to run on them."""


class AccountNotFound(AccountError, KeyError):
    """No therapist with that id."""


class UsernameTaken(AccountError):
    """Another therapist already uses that login name."""


class InvalidUsername(AccountError, ValueError):
    """A login name or display name that we refuse to store."""


@dataclass(frozen=True)
class Account:
    """What administrators and the therapist page may see about an account (no secrets)."""

    id: str
    username: str
    display_name: str | None
    disabled: bool
    locked: bool
    totp_enabled: bool
    recovery_codes_left: int
    created_at: str
    passkeys: int = 0
    #: Login sessions made under another epoch are over (see the module docstring).
    sessions_epoch: str = ""


@dataclass(frozen=True)
class LoginResult:
    """Outcome of a login attempt; equal for an unknown login name and a wrong password."""

    ok: bool
    therapist_id: str | None
    reason: str
    #: The account's sessions epoch as read with the password hash that was checked, so a password
    #: reset racing this login ends the session it makes. Not part of what the result says.
    sessions_epoch: str = field(default="", compare=False)


def new_sessions_epoch() -> str:
    """A fresh sessions epoch: 96 random bits."""
    return secrets.token_urlsafe(12)


def normalize_username(username: str) -> str:
    """NFKC, trimmed; refuses names that are too short/long or contain spaces or control characters."""
    name = unicodedata.normalize("NFKC", username).strip()
    if not USERNAME_MIN <= len(name) <= USERNAME_MAX:
        raise InvalidUsername(f"A login name must be {USERNAME_MIN} to {USERNAME_MAX} characters long.")
    if any(ch.isspace() or unicodedata.category(ch).startswith("C") for ch in name):
        raise InvalidUsername("A login name must not contain spaces or control characters.")
    return name


def normalize_display_name(display_name: str | None) -> str | None:
    """NFKC, trimmed, None when blank; refuses names that are too long or contain control characters."""
    if display_name is None:
        return None
    name = unicodedata.normalize("NFKC", display_name).strip()
    if not name:
        return None
    if len(name) > DISPLAY_NAME_MAX:
        raise InvalidUsername(f"A display name must be at most {DISPLAY_NAME_MAX} characters long.")
    if any(unicodedata.category(ch).startswith("C") for ch in name):
        raise InvalidUsername("A display name must not contain control characters.")
    return name


def new_therapist_id() -> str:
    """128 random bits, base64url, typeable after a CLI command (see ``tokens.typeable_id``)."""
    return typeable_id(16)
