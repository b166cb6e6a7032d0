"""Durable therapist accounts: the rules, over a SQLite file (embedded) or Redis (rows.py, rows_redis.py).

Nothing stored identifies a person in clear: the login name is stored twice, as an HMAC
lookup key (for unique, case-insensitive lookup) and AES-GCM encrypted (for display); the
display name, TOTP secret and passkey list are encrypted too. Sub-keys come from the caller's 32-byte key
through HKDF, one per purpose, and each ciphertext is bound to its row and column.

Login checks answer the same way, after the same amount of hashing, whether the login name is
unknown, the password wrong, the account disabled or locked, so the answer cannot be used to find
out which accounts exist. scrypt runs in worker threads to keep the event loop free.

Every change that must end an account's login sessions replaces its *sessions epoch* (see
account.py, which also holds the account record, its errors and the login name rules).
"""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import hmac
import json
import logging
import os
import secrets
import unicodedata
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from redis.exceptions import RedisError

from broker.accounts import passwords, totp
from broker.accounts.account import (
    INVALID_CREDENTIALS,
    OK,
    RECOVERY_CODE_USED,
    SECOND_FACTOR_ENROLMENT_REQUIRED,
    SECOND_FACTOR_REQUIRED,
    Account,
    AccountError,
    AccountNotFound,
    AccountsKeyMismatch,
    InvalidUsername,
    LoginResult,
    UsernameTaken,
    new_sessions_epoch,
    new_therapist_id,
    normalize_display_name,
    normalize_username,
)
from broker.accounts.passwords import DEFAULT_PARAMS, ScryptParams
from broker.accounts.rows import AccountRows, Row
from broker.accounts.rows_sqlite import SqliteAccountRows
from broker.accounts.throttle import LOCKOUT_AFTER
from broker.config import Config, Keys

KEY_BYTES = 32
_NONCE_BYTES = 12
# At most this many scrypt computations at once: each one holds ~128 MiB with the default cost.
_HASH_CONCURRENCY = 2
_KEY_CHECK = b"broker accounts key check v1"
MAX_PASSKEYS = 10
_REDIS_START_S = 5.0

log = logging.getLogger("broker.accounts")


def _subkey(key: bytes, purpose: str) -> bytes:
    hkdf = HKDF(
        algorithm=SHA256(),
        length=KEY_BYTES,
        salt=None,
        info=b"broker/accounts/v1/" + purpose.encode(),
    )
    return hkdf.derive(key)


def _now_iso() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


class AccountStore:
    """Therapist accounts over an ``AccountRows`` backend; all public methods are async.

    ``where`` is either a backend or the path of the embedded default's SQLite file.
    """

    def __init__(
        self,
        where: str | os.PathLike[str] | AccountRows,
        key: bytes,
        *,
        scrypt_params: ScryptParams = DEFAULT_PARAMS,
        lockout_after: int = LOCKOUT_AFTER,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"the accounts key must be {KEY_BYTES} bytes")
        if not 1 <= lockout_after <= LOCKOUT_AFTER:
            raise ValueError(f"lockout_after must be between 1 and {LOCKOUT_AFTER}")
        self._lookup_key = _subkey(key, "username-lookup")
        self._aead = AESGCM(_subkey(key, "field-encryption"))
        self._recovery_key = _subkey(key, "recovery-codes")
        self._params = scrypt_params
        self.lockout_after = lockout_after
        self._clock = clock
        self._hash_slots = asyncio.Semaphore(_HASH_CONCURRENCY)
        self._dummy_hash: str | None = None
        self._key_checked = False
        if isinstance(where, (str, os.PathLike)):
            rows = SqliteAccountRows(where)
            # A local file can be checked at once, so a wrong key fails at construction.
            self._verify_key_check(rows.key_check_now(self._key_check_blob()))
            self._key_checked = True
            self.rows: AccountRows = rows
        else:
            self.rows = where

    # ----- crypto plumbing ----------------------------------------------------------------

    def _key_check_blob(self) -> bytes:
        return self._seal(_KEY_CHECK, "meta", "key_check")

    def _verify_key_check(self, stored: bytes) -> None:
        try:
            matches = self._open_sealed(stored, "meta", "key_check") == _KEY_CHECK
        except ValueError:
            matches = False
        if not matches:
            raise AccountsKeyMismatch(
                "The therapist accounts were written with a different key: this is not the server secret "
                "they were made with (BROKER_SECRET_FILE), or the accounts store belongs to another installation."
            )

    async def check_key(self) -> None:
        """Fail loudly on a wrong key instead of every login silently failing."""
        if not self._key_checked:
            self._verify_key_check(await self.rows.key_check(self._key_check_blob()))
            self._key_checked = True

    async def close(self) -> None:
        await self.rows.close()

    def _seal(self, plain: bytes, column: str, row_id: str) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plain, self._aad(column, row_id))

    def _open_sealed(self, blob: bytes, column: str, row_id: str) -> bytes:
        try:
            return self._aead.decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], self._aad(column, row_id))
        except InvalidTag as exc:
            raise ValueError("the accounts were written with a different key or were altered") from exc

    @staticmethod
    def _aad(column: str, row_id: str) -> bytes:
        return f"broker/accounts/v1|{column}|{row_id}".encode()

    def account_key(self, username: str) -> str:
        """Opaque per-login-name key: the lookup key, also the throttle's account key."""
        try:
            name = normalize_username(username)
        except InvalidUsername:
            name = unicodedata.normalize("NFKC", username).strip()
        return hmac.new(self._lookup_key, name.casefold().encode("utf-8"), hashlib.sha256).hexdigest()

    async def _hash(self, password: str) -> str:
        async with self._hash_slots:
            return await asyncio.to_thread(passwords.hash_password, password, self._params)

    async def _verify(self, password: str, encoded: str) -> bool:
        async with self._hash_slots:
            return await asyncio.to_thread(passwords.verify_password, password, encoded)

    def _now(self) -> float | None:
        return self._clock() if self._clock is not None else None

    # ----- row access ---------------------------------------------------------------------

    async def _row(self, therapist_id: str) -> Row | None:
        await self.check_key()
        return await self.rows.by_id(therapist_id)

    async def _row_by_name(self, username: str) -> Row | None:
        await self.check_key()
        return await self.rows.by_key(self.account_key(username))

    async def _require(self, therapist_id: str) -> Row:
        row = await self._row(therapist_id)
        if row is None:
            raise AccountNotFound("No therapist account with that id.")
        return row

    async def _change(self, therapist_id: str, changes: Row) -> None:
        await self.check_key()
        if not await self.rows.update(therapist_id, changes):
            raise AccountNotFound("No therapist account with that id.")

    def _to_account(self, row: Row) -> Account:
        rid = row["id"]
        display = row["display_name_enc"]
        return Account(
            id=rid,
            username=self._open_sealed(row["username_enc"], "username", rid).decode("utf-8"),
            display_name=self._open_sealed(display, "display_name", rid).decode("utf-8") if display else None,
            disabled=bool(row["disabled"]),
            locked=bool(row["locked"]),
            totp_enabled=row["totp_secret_enc"] is not None,
            recovery_codes_left=len(json.loads(row["recovery_hashes"])),
            created_at=row["created_at"],
            passkeys=len(self._passkeys(row)),
            sessions_epoch=_epoch_of(row),
        )

    def _passkeys(self, row: Row) -> builtins.list[dict[str, Any]]:
        blob = row.get("passkeys_enc")
        if not blob:
            return []
        found: builtins.list[dict[str, Any]] = json.loads(self._open_sealed(blob, "passkeys", row["id"]))
        return found

    # ----- administration -----------------------------------------------------------------

    async def add(
        self,
        username: str,
        password: str,
        display_name: str | None = None,
        *,
        second_factor: bool = False,
    ) -> str:
        """Create an account and return its opaque id; the password must pass the policy."""
        name = normalize_username(username)
        display = normalize_display_name(display_name)
        pw = passwords.check_password(password, username=name, second_factor=second_factor)
        therapist_id = new_therapist_id()
        encoded = await self._hash(pw)
        row: Row = {
            "id": therapist_id,
            "username_key": self.account_key(name),
            "username_enc": self._seal(name.encode("utf-8"), "username", therapist_id),
            "display_name_enc": self._seal(display.encode("utf-8"), "display_name", therapist_id) if display else None,
            "password_hash": encoded,
            "created_at": _now_iso(),
        }
        await self.check_key()
        if not await self.rows.insert(row):
            raise UsernameTaken("That login name is already in use.")
        return therapist_id

    async def get(self, therapist_id: str) -> Account | None:
        row = await self._row(therapist_id)
        return self._to_account(row) if row is not None else None

    async def get_by_username(self, username: str) -> Account | None:
        row = await self._row_by_name(username)
        return self._to_account(row) if row is not None else None

    async def list(self) -> builtins.list[Account]:
        await self.check_key()
        return [self._to_account(r) for r in await self.rows.all()]

    async def disable(self, therapist_id: str) -> None:
        """No more logins; its login sessions end (and stay ended if it is enabled again)."""
        await self._change(therapist_id, {"disabled": 1, "sessions_epoch": new_sessions_epoch()})

    async def enable(self, therapist_id: str) -> None:
        await self._change(therapist_id, {"disabled": 0})

    async def unlock(self, therapist_id: str) -> None:
        """Administrator reset after a lockout."""
        await self._change(therapist_id, {"failures": 0, "locked": 0})

    async def reset_password(self, therapist_id: str, new_password: str, *, second_factor: bool = False) -> None:
        """Set a new password (policy-checked), clear any lockout and end every login session."""
        account = self._to_account(await self._require(therapist_id))
        pw = passwords.check_password(new_password, username=account.username, second_factor=second_factor)
        encoded = await self._hash(pw)
        changes: Row = {"password_hash": encoded, "failures": 0, "locked": 0, "sessions_epoch": new_sessions_epoch()}
        # The vault key was wrapped under a key from the old password, which nobody here knows: the
        # therapist's labels cannot be opened any more, so the wrapped key goes (docs/security.md 3.5).
        changes["vault_enc"] = None
        await self._change(therapist_id, changes)

    async def change_password(self, therapist_id: str, new_password: str, vault: str | None, *, epoch: str) -> None:
        """The therapist's own change (the caller checked the old password): a new hash, the vault
        key re-wrapped by the browser under the new password, and the new sessions ``epoch``."""
        account = self._to_account(await self._require(therapist_id))
        pw = passwords.check_password(new_password, username=account.username, second_factor=self._second(account))
        encoded = await self._hash(pw)
        changes: Row = {"password_hash": encoded, "sessions_epoch": epoch}
        changes["vault_enc"] = self._seal(vault.encode(), "vault", therapist_id) if vault is not None else None
        await self._change(therapist_id, changes)

    @staticmethod
    def _second(account: Account) -> bool:
        return account.totp_enabled or account.passkeys > 0

    async def vault(self, therapist_id: str) -> str | None:
        """The therapist's wrapped vault key as the browser made it (JSON text), or None."""
        blob = (await self._require(therapist_id)).get("vault_enc")
        return self._open_sealed(blob, "vault", therapist_id).decode() if blob else None

    async def create_vault(self, therapist_id: str, vault: str) -> bool:
        """Store a first wrapped vault key; False (and no change) when the account has one already."""
        await self.check_key()
        sealed = self._seal(vault.encode(), "vault", therapist_id)
        return await self.rows.update(therapist_id, {"vault_enc": sealed}, expect={"vault_enc": None})

    async def enable_totp(self, therapist_id: str, issuer: str) -> totp.TotpEnrolment:
        """Start TOTP enrolment: a pending secret, active only after ``confirm_totp``."""
        account = self._to_account(await self._require(therapist_id))
        enrolment = totp.enrol(account.username, issuer)
        sealed = self._seal(enrolment.secret, "totp_pending", therapist_id)
        await self._change(therapist_id, {"totp_pending_enc": sealed})
        return enrolment

    async def confirm_totp(
        self, therapist_id: str, code: str, *, epoch: str | None = None
    ) -> builtins.list[str] | None:
        """Activate the pending secret if ``code`` matches; returns the recovery codes to show once.
        Other login sessions end: the account's sessions epoch becomes ``epoch`` (default: fresh)."""
        row = await self._require(therapist_id)
        if row["totp_pending_enc"] is None:
            return None
        secret = self._open_sealed(row["totp_pending_enc"], "totp_pending", therapist_id)
        step = totp.verify_code(secret, code, last_used_step=None, now=self._now())
        if step is None:
            return None
        codes = totp.new_recovery_codes()
        changes: Row = {
            "totp_secret_enc": self._seal(secret, "totp", therapist_id),
            "totp_pending_enc": None,
            "totp_last_step": step,
            "recovery_hashes": self._recovery_hashes(codes),
            "sessions_epoch": epoch or new_sessions_epoch(),
        }
        changed = await self.rows.update(therapist_id, changes, expect={"totp_pending_enc": row["totp_pending_enc"]})
        return codes if changed else None

    def _recovery_hashes(self, codes: builtins.list[str]) -> str:
        return json.dumps(totp.hash_recovery_codes(codes, self._recovery_key))

    async def new_recovery_codes(self, therapist_id: str, *, epoch: str | None = None) -> builtins.list[str]:
        """Replace all recovery codes (the old ones stop working); returns the new ones to show once.
        Other login sessions end (the sessions epoch becomes ``epoch``, default fresh)."""
        row = await self._require(therapist_id)
        if not self._has_second_factor(row):
            raise AccountError("Recovery codes need a second factor to be set up first.")
        codes = totp.new_recovery_codes()
        changes: Row = {
            "recovery_hashes": self._recovery_hashes(codes),
            "sessions_epoch": epoch or new_sessions_epoch(),
        }
        await self._change(therapist_id, changes)
        return codes

    async def reset_2fa(self, therapist_id: str) -> None:
        """Administrator reset: forget the TOTP secret, passkeys and recovery codes; every login
        session ends."""
        changes: Row = {
            "totp_secret_enc": None,
            "totp_pending_enc": None,
            "totp_last_step": None,
            "recovery_hashes": "[]",
            "passkeys_enc": None,
            "sessions_epoch": new_sessions_epoch(),
        }
        await self._change(therapist_id, changes)

    # ----- passkeys (WebAuthn credentials; the ceremony itself is in passkeys.py) -----------

    async def passkeys(self, therapist_id: str) -> builtins.list[dict[str, Any]]:
        """The therapist's stored credentials: id, public_key, sign_count, created_at (base64url/JSON)."""
        return self._passkeys(await self._require(therapist_id))

    async def add_passkey(
        self, therapist_id: str, credential: dict[str, Any], *, epoch: str | None = None
    ) -> builtins.list[str] | None:
        """Store a verified credential; returns fresh recovery codes when this is the first second factor.
        Other login sessions end (the sessions epoch becomes ``epoch``, default fresh)."""
        row = await self._require(therapist_id)
        stored = self._passkeys(row)
        if any(c["id"] == credential["id"] for c in stored):
            raise AccountError("That passkey is already registered.")
        if len(stored) >= MAX_PASSKEYS:
            raise AccountError(f"At most {MAX_PASSKEYS} passkeys per account.")
        changes: Row = {
            "passkeys_enc": self._seal_passkeys(therapist_id, [*stored, credential]),
            "sessions_epoch": epoch or new_sessions_epoch(),
        }
        codes = None
        if not self._has_second_factor(row):
            codes = totp.new_recovery_codes()
            changes["recovery_hashes"] = self._recovery_hashes(codes)
        if not await self.rows.update(therapist_id, changes, expect={"passkeys_enc": row["passkeys_enc"]}):
            raise AccountError("The account changed at the same time; please try again.")
        return codes

    async def remove_passkey(self, therapist_id: str, credential_id: str, *, epoch: str | None = None) -> bool:
        """Forget one passkey (the last second factor takes the recovery codes with it); other login
        sessions end (the sessions epoch becomes ``epoch``, default fresh)."""
        row = await self._require(therapist_id)
        stored = self._passkeys(row)
        kept = [c for c in stored if c["id"] != credential_id]
        if len(kept) == len(stored):
            return False
        sealed = self._seal_passkeys(therapist_id, kept) if kept else None
        changes: Row = {"passkeys_enc": sealed, "sessions_epoch": epoch or new_sessions_epoch()}
        if not kept and row["totp_secret_enc"] is None:
            changes["recovery_hashes"] = "[]"
        if not await self.rows.update(therapist_id, changes, expect={"passkeys_enc": row["passkeys_enc"]}):
            raise AccountError("The account changed at the same time; please try again.")
        return True

    async def passkey_used(self, therapist_id: str, credential_id: str, sign_count: int) -> bool:
        """Record a credential's new signature counter after a verified assertion (compare-and-set)."""
        row = await self._require(therapist_id)
        stored = self._passkeys(row)
        for credential in stored:
            if credential["id"] == credential_id:
                credential["sign_count"] = sign_count
                break
        else:
            return False
        changes: Row = {"passkeys_enc": self._seal_passkeys(therapist_id, stored)}
        return await self.rows.update(therapist_id, changes, expect={"passkeys_enc": row["passkeys_enc"]})

    def _seal_passkeys(self, therapist_id: str, credentials: builtins.list[dict[str, Any]]) -> bytes:
        return self._seal(json.dumps(credentials, sort_keys=True).encode(), "passkeys", therapist_id)

    def _has_second_factor(self, row: Row) -> bool:
        return row["totp_secret_enc"] is not None or bool(row.get("passkeys_enc"))

    # ----- login --------------------------------------------------------------------------

    async def check_password(self, username: str, password: str) -> Row | None:
        """The first step of a login: the row when the password is right and the account usable.

        Unknown names cost one scrypt and one write like a wrong password, so timing does not tell
        them apart; a wrong password counts towards the lockout.
        """
        dummy = await self._dummy()
        row = await self._row_by_name(username)
        password_ok = await self._verify(password, row["password_hash"] if row is not None else dummy)
        if row is None or row["disabled"] or row["locked"]:
            await self.rows.balance()
            return None
        if not password_ok:
            await self.rows.count_failure(row["id"], self.lockout_after)
            return None
        return row

    async def verify_login(
        self,
        username: str,
        password: str,
        totp_code: str | None,
        *,
        require_second_factor: bool,
    ) -> LoginResult:
        """Check a login attempt; see the module docstring for what the result may reveal."""
        denied = LoginResult(ok=False, therapist_id=None, reason=INVALID_CREDENTIALS)
        row = await self.check_password(username, password)
        if row is None:
            return denied
        rid: str = row["id"]
        if not self._has_second_factor(row):
            if require_second_factor:
                return LoginResult(False, rid, SECOND_FACTOR_ENROLMENT_REQUIRED, _epoch_of(row))
            return await self._succeed(row, password)
        if totp_code is None or not totp_code.strip():
            return LoginResult(ok=False, therapist_id=None, reason=SECOND_FACTOR_REQUIRED)
        reason = await self._check_second_factor(row, totp_code)
        if reason is None:
            await self.rows.count_failure(rid, self.lockout_after)
            return denied
        return await self._succeed(row, password, reason)

    async def finish_login(self, row: Row, password: str, reason: str = OK) -> LoginResult:
        """Complete a login whose second factor was checked elsewhere (a passkey assertion);
        ``row`` is what ``check_password`` returned."""
        return await self._succeed(row, password, reason)

    async def check_code(self, therapist_id: str, code: str) -> str | None:
        """A logged-in therapist proving who they are again with an authenticator or recovery code:
        ``OK`` or ``RECOVERY_CODE_USED`` (that code is spent), else None; a wrong code counts
        towards the lockout like a wrong password."""
        row = await self._require(therapist_id)
        if row["disabled"] or row["locked"]:
            return None
        reason = await self._check_second_factor(row, code)
        if reason is None:
            await self.rows.count_failure(therapist_id, self.lockout_after)
        return reason

    async def clear_failures(self, therapist_id: str) -> None:
        """A second step succeeded: the consecutive-failure count starts again (a lock stays)."""
        await self.rows.update(therapist_id, {"failures": 0}, expect={"locked": 0})

    async def count_failure(self, therapist_id: str) -> None:
        """A failed second step counts towards the lockout like a wrong password."""
        await self.rows.count_failure(therapist_id, self.lockout_after)

    async def _dummy(self) -> str:
        """A hash of a random password at the current cost, for unknown login names."""
        if self._dummy_hash is None:
            self._dummy_hash = await self._hash(secrets.token_urlsafe(24))
        return self._dummy_hash

    async def _check_second_factor(self, row: Row, code: str) -> str | None:
        rid: str = row["id"]
        if totp.looks_like_recovery_code(code):
            stored = json.loads(row["recovery_hashes"])
            left = totp.use_recovery_code(code, stored, self._recovery_key)
            if left is None:
                return None
            changed = await self.rows.update(
                rid,
                {"recovery_hashes": json.dumps(left)},
                expect={"recovery_hashes": row["recovery_hashes"]},
            )
            return RECOVERY_CODE_USED if changed else None
        if row["totp_secret_enc"] is None:
            return None
        secret = self._open_sealed(row["totp_secret_enc"], "totp", rid)
        step = totp.verify_code(secret, code, last_used_step=row["totp_last_step"], now=self._now())
        if step is None:
            return None
        # Compare-and-set so two concurrent logins cannot both spend the same step.
        changed = await self.rows.update(rid, {"totp_last_step": step}, step_below=step)
        return OK if changed else None

    async def _succeed(self, row: Row, password: str, reason: str = OK) -> LoginResult:
        rid: str = row["id"]
        await self.rows.update(rid, {"failures": 0})
        if passwords.needs_rehash(row["password_hash"], self._params):
            encoded = await self._hash(password)
            await self.rows.update(
                rid,
                {"password_hash": encoded},
                expect={"password_hash": row["password_hash"]},
            )
        return LoginResult(ok=True, therapist_id=rid, reason=reason, sessions_epoch=_epoch_of(row))


def _epoch_of(row: Row) -> str:
    """The row's sessions epoch; accounts from before epochs existed have the empty one."""
    return str(row.get("sessions_epoch") or "")


async def open_accounts(config: Config, keys: Keys, **options: Any) -> AccountStore:
    """The accounts a broker process or the CLI uses: in Redis when one is configured, else SQLite.

    A wrong key fails here. Redis being away does not: the first use reports it instead, like the
    session store does, so a broker can start before its Redis.
    """
    url = config.accounts_redis
    if not url:
        return AccountStore(config.accounts_path, keys.accounts, **options)
    from broker.accounts.rows_redis import RedisAccountRows, warn_if_not_persistent
    from broker.store.redis_store import redis_client

    client = redis_client(url)
    store = AccountStore(RedisAccountRows(client), keys.accounts, **options)
    try:
        await asyncio.wait_for(store.check_key(), _REDIS_START_S)
        await warn_if_not_persistent(client)
    except (OSError, TimeoutError, RedisError):
        log.warning("event=accounts_redis_unreachable_at_start")
    return store
