"""Durable therapist accounts in a local SQLite file.

Nothing in the file identifies a person in clear: the login name is stored twice, as an HMAC
lookup key (for unique, case-insensitive lookup) and AES-GCM encrypted (for display); the
display name and TOTP secret are encrypted too. Sub-keys come from the caller's 32-byte key
through HKDF, one per purpose, and each ciphertext is bound to its row and column.

Login checks answer the same way, after the same amount of hashing, whether the login name is
unknown, the password wrong, the account disabled or locked, so the answer cannot be used to find
out which accounts exist. SQLite and scrypt run in worker threads to keep the event loop free.
"""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import threading
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from broker import passwords, totp
from broker.passwords import DEFAULT_PARAMS, ScryptParams
from broker.throttle import LOCKOUT_AFTER

KEY_BYTES = 32
USERNAME_MIN = 3
USERNAME_MAX = 64
DISPLAY_NAME_MAX = 100
_NONCE_BYTES = 12
# At most this many scrypt computations at once: each one holds ~128 MiB with the default cost.
_HASH_CONCURRENCY = 2
_KEY_CHECK = b"broker accounts key check v1"

OK = "ok"
RECOVERY_CODE_USED = "recovery_code_used"
INVALID_CREDENTIALS = "invalid_credentials"
SECOND_FACTOR_REQUIRED = "second_factor_required"
SECOND_FACTOR_ENROLMENT_REQUIRED = "second_factor_enrolment_required"

_T = TypeVar("_T")
# Refused attempts on unknown, disabled or locked accounts do one write like the others do,
# so the time taken does not tell them apart from a wrong password.
_BALANCING_WRITE = "UPDATE meta SET v = v WHERE k = 'key_check'"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v BLOB NOT NULL) STRICT;
CREATE TABLE IF NOT EXISTS therapist (
    id TEXT PRIMARY KEY,
    username_key TEXT NOT NULL UNIQUE,
    username_enc BLOB NOT NULL,
    display_name_enc BLOB,
    password_hash TEXT NOT NULL,
    totp_secret_enc BLOB,
    totp_pending_enc BLOB,
    totp_last_step INTEGER,
    recovery_hashes TEXT NOT NULL DEFAULT '[]',
    disabled INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0,
    locked INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL
) STRICT;
"""


class AccountError(Exception):
    """Base for account errors whose message is fit to show an administrator."""


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


@dataclass(frozen=True)
class LoginResult:
    """Outcome of a login attempt; equal for an unknown login name and a wrong password."""

    ok: bool
    therapist_id: str | None
    reason: str


def _subkey(key: bytes, purpose: str) -> bytes:
    hkdf = HKDF(algorithm=SHA256(), length=KEY_BYTES, salt=None, info=b"broker/accounts/v1/" + purpose.encode())
    return hkdf.derive(key)


def normalize_username(username: str) -> str:
    """NFKC, trimmed; refuses names that are too short/long or contain spaces or control characters."""
    name = unicodedata.normalize("NFKC", username).strip()
    if not USERNAME_MIN <= len(name) <= USERNAME_MAX:
        raise InvalidUsername(f"A login name must be {USERNAME_MIN} to {USERNAME_MAX} characters long.")
    if any(ch.isspace() or unicodedata.category(ch).startswith("C") for ch in name):
        raise InvalidUsername("A login name must not contain spaces or control characters.")
    return name


def _normalize_display_name(display_name: str | None) -> str | None:
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


def _now_iso() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


class AccountStore:
    """Therapist accounts in one SQLite file; all public methods are async."""

    def __init__(
        self,
        path: str | os.PathLike[str],
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
        self._lockout_after = lockout_after
        self._clock = clock
        self._path = Path(path)
        self._db_lock = threading.Lock()
        self._hash_slots = asyncio.Semaphore(_HASH_CONCURRENCY)
        self._dummy_hash: str | None = None
        self._conn = self._open()

    # ----- file and crypto plumbing -------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        self._path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        conn = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA secure_delete = ON")
        conn.execute("PRAGMA synchronous = FULL")
        conn.executescript(_SCHEMA)
        self._check_key(conn)
        return conn

    def _check_key(self, conn: sqlite3.Connection) -> None:
        """Fail loudly on a wrong key instead of every login silently failing."""
        row = conn.execute("SELECT v FROM meta WHERE k = 'key_check'").fetchone()
        if row is None:
            conn.execute(
                "INSERT INTO meta (k, v) VALUES ('key_check', ?)", (self._seal(_KEY_CHECK, "meta", "key_check"),)
            )
            return
        if self._open_sealed(row[0], "meta", "key_check") != _KEY_CHECK:
            raise ValueError("the accounts file was written with a different key")

    def close(self) -> None:
        with self._db_lock:
            self._conn.close()

    def _seal(self, plain: bytes, column: str, row_id: str) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plain, self._aad(column, row_id))

    def _open_sealed(self, blob: bytes, column: str, row_id: str) -> bytes:
        try:
            return self._aead.decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], self._aad(column, row_id))
        except InvalidTag as exc:
            raise ValueError("the accounts file was written with a different key or was altered") from exc

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

    async def _db(self, fn: Callable[..., _T], *args: Any) -> _T:
        def run() -> _T:
            with self._db_lock:
                return fn(*args)

        return await asyncio.to_thread(run)

    async def _hash(self, password: str) -> str:
        async with self._hash_slots:
            return await asyncio.to_thread(passwords.hash_password, password, self._params)

    async def _verify(self, password: str, encoded: str) -> bool:
        async with self._hash_slots:
            return await asyncio.to_thread(passwords.verify_password, password, encoded)

    def _now(self) -> float | None:
        return self._clock() if self._clock is not None else None

    # ----- row access (run in the worker thread under the lock) ---------------------------

    def _row_by_id(self, therapist_id: str) -> sqlite3.Row | None:
        cur = self._conn.execute("SELECT * FROM therapist WHERE id = ?", (therapist_id,))
        cur.row_factory = sqlite3.Row
        row: sqlite3.Row | None = cur.fetchone()
        return row

    def _row_by_key(self, username_key: str) -> sqlite3.Row | None:
        cur = self._conn.execute("SELECT * FROM therapist WHERE username_key = ?", (username_key,))
        cur.row_factory = sqlite3.Row
        row: sqlite3.Row | None = cur.fetchone()
        return row

    def _all_rows(self) -> builtins.list[sqlite3.Row]:
        cur = self._conn.execute("SELECT * FROM therapist ORDER BY created_at, id")
        cur.row_factory = sqlite3.Row
        return builtins.list(cur.fetchall())

    def _update(self, sql: str, params: tuple[Any, ...]) -> int:
        return self._conn.execute(sql, params).rowcount

    async def _require(self, therapist_id: str) -> sqlite3.Row:
        row = await self._db(self._row_by_id, therapist_id)
        if row is None:
            raise AccountNotFound("No therapist account with that id.")
        return row

    def _to_account(self, row: sqlite3.Row) -> Account:
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
        )

    # ----- administration -----------------------------------------------------------------

    async def add(
        self, username: str, password: str, display_name: str | None = None, *, second_factor: bool = False
    ) -> str:
        """Create an account and return its opaque id; the password must pass the policy."""
        name = normalize_username(username)
        display = _normalize_display_name(display_name)
        pw = passwords.check_password(password, username=name, second_factor=second_factor)
        therapist_id = secrets.token_urlsafe(16)
        encoded = await self._hash(pw)
        row = (
            therapist_id,
            self.account_key(name),
            self._seal(name.encode("utf-8"), "username", therapist_id),
            self._seal(display.encode("utf-8"), "display_name", therapist_id) if display else None,
            encoded,
            _now_iso(),
        )
        sql = (
            "INSERT INTO therapist (id, username_key, username_enc, display_name_enc, password_hash, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)"
        )
        try:
            await self._db(self._update, sql, row)
        except sqlite3.IntegrityError as exc:
            raise UsernameTaken("That login name is already in use.") from exc
        return therapist_id

    async def get(self, therapist_id: str) -> Account | None:
        row = await self._db(self._row_by_id, therapist_id)
        return self._to_account(row) if row is not None else None

    async def get_by_username(self, username: str) -> Account | None:
        row = await self._db(self._row_by_key, self.account_key(username))
        return self._to_account(row) if row is not None else None

    async def list(self) -> builtins.list[Account]:
        rows = await self._db(self._all_rows)
        return [self._to_account(r) for r in rows]

    async def disable(self, therapist_id: str) -> None:
        await self._set_flag(therapist_id, "UPDATE therapist SET disabled = 1 WHERE id = ?")

    async def enable(self, therapist_id: str) -> None:
        await self._set_flag(therapist_id, "UPDATE therapist SET disabled = 0 WHERE id = ?")

    async def unlock(self, therapist_id: str) -> None:
        """Administrator reset after a lockout."""
        await self._set_flag(therapist_id, "UPDATE therapist SET failures = 0, locked = 0 WHERE id = ?")

    async def _set_flag(self, therapist_id: str, sql: str) -> None:
        if await self._db(self._update, sql, (therapist_id,)) == 0:
            raise AccountNotFound("No therapist account with that id.")

    async def reset_password(self, therapist_id: str, new_password: str, *, second_factor: bool = False) -> None:
        """Set a new password (policy-checked) and clear any lockout."""
        account = self._to_account(await self._require(therapist_id))
        pw = passwords.check_password(new_password, username=account.username, second_factor=second_factor)
        encoded = await self._hash(pw)
        sql = "UPDATE therapist SET password_hash = ?, failures = 0, locked = 0 WHERE id = ?"
        await self._db(self._update, sql, (encoded, therapist_id))

    async def enable_totp(self, therapist_id: str, issuer: str) -> totp.TotpEnrolment:
        """Start TOTP enrolment: a pending secret, active only after ``confirm_totp``."""
        account = self._to_account(await self._require(therapist_id))
        enrolment = totp.enrol(account.username, issuer)
        sealed = self._seal(enrolment.secret, "totp_pending", therapist_id)
        await self._db(self._update, "UPDATE therapist SET totp_pending_enc = ? WHERE id = ?", (sealed, therapist_id))
        return enrolment

    async def confirm_totp(self, therapist_id: str, code: str) -> builtins.list[str] | None:
        """Activate the pending secret if ``code`` matches; returns the recovery codes to show once."""
        row = await self._require(therapist_id)
        if row["totp_pending_enc"] is None:
            return None
        secret = self._open_sealed(row["totp_pending_enc"], "totp_pending", therapist_id)
        step = totp.verify_code(secret, code, last_used_step=None, now=self._now())
        if step is None:
            return None
        codes = totp.new_recovery_codes()
        hashes = json.dumps(totp.hash_recovery_codes(codes, self._recovery_key))
        sql = (
            "UPDATE therapist SET totp_secret_enc = ?, totp_pending_enc = NULL, totp_last_step = ?,"
            " recovery_hashes = ? WHERE id = ? AND totp_pending_enc = ?"
        )
        params = (self._seal(secret, "totp", therapist_id), step, hashes, therapist_id, row["totp_pending_enc"])
        changed = await self._db(self._update, sql, params)
        return codes if changed else None

    async def new_recovery_codes(self, therapist_id: str) -> builtins.list[str]:
        """Replace all recovery codes (the old ones stop working); returns the new ones to show once."""
        row = await self._require(therapist_id)
        if row["totp_secret_enc"] is None:
            raise AccountError("Recovery codes need a second factor to be set up first.")
        codes = totp.new_recovery_codes()
        hashes = json.dumps(totp.hash_recovery_codes(codes, self._recovery_key))
        await self._db(self._update, "UPDATE therapist SET recovery_hashes = ? WHERE id = ?", (hashes, therapist_id))
        return codes

    async def reset_2fa(self, therapist_id: str) -> None:
        """Administrator reset: forget the TOTP secret and recovery codes."""
        sql = (
            "UPDATE therapist SET totp_secret_enc = NULL, totp_pending_enc = NULL, totp_last_step = NULL,"
            " recovery_hashes = '[]' WHERE id = ?"
        )
        await self._set_flag(therapist_id, sql)

    # ----- login --------------------------------------------------------------------------

    async def verify_login(
        self, username: str, password: str, totp_code: str | None, *, require_second_factor: bool
    ) -> LoginResult:
        """Check a login attempt; see the module docstring for what the result may reveal."""
        denied = LoginResult(ok=False, therapist_id=None, reason=INVALID_CREDENTIALS)
        dummy = await self._dummy()
        row = await self._db(self._row_by_key, self.account_key(username))
        password_ok = await self._verify(password, row["password_hash"] if row is not None else dummy)
        if row is None or row["disabled"] or row["locked"]:
            await self._db(self._update, _BALANCING_WRITE, ())
            return denied
        rid: str = row["id"]
        if not password_ok:
            await self._count_failure(rid)
            return denied
        if row["totp_secret_enc"] is None:
            if require_second_factor:
                return LoginResult(ok=False, therapist_id=rid, reason=SECOND_FACTOR_ENROLMENT_REQUIRED)
            return await self._succeed(row, password)
        if totp_code is None or not totp_code.strip():
            return LoginResult(ok=False, therapist_id=None, reason=SECOND_FACTOR_REQUIRED)
        reason = await self._check_second_factor(row, totp_code)
        if reason is None:
            await self._count_failure(rid)
            return denied
        return await self._succeed(row, password, reason)

    async def _dummy(self) -> str:
        """A hash of a random password at the current cost, for unknown login names."""
        if self._dummy_hash is None:
            self._dummy_hash = await self._hash(secrets.token_urlsafe(24))
        return self._dummy_hash

    async def _check_second_factor(self, row: sqlite3.Row, code: str) -> str | None:
        rid: str = row["id"]
        if totp.looks_like_recovery_code(code):
            stored = json.loads(row["recovery_hashes"])
            left = totp.use_recovery_code(code, stored, self._recovery_key)
            if left is None:
                return None
            sql = "UPDATE therapist SET recovery_hashes = ? WHERE id = ? AND recovery_hashes = ?"
            changed = await self._db(self._update, sql, (json.dumps(left), rid, row["recovery_hashes"]))
            return RECOVERY_CODE_USED if changed else None
        secret = self._open_sealed(row["totp_secret_enc"], "totp", rid)
        step = totp.verify_code(secret, code, last_used_step=row["totp_last_step"], now=self._now())
        if step is None:
            return None
        # Compare-and-set so two concurrent logins cannot both spend the same step.
        sql = "UPDATE therapist SET totp_last_step = ? WHERE id = ? AND (totp_last_step IS NULL OR totp_last_step < ?)"
        changed = await self._db(self._update, sql, (step, rid, step))
        return OK if changed else None

    async def _count_failure(self, therapist_id: str) -> None:
        sql = (
            "UPDATE therapist SET failures = failures + 1,"
            " locked = CASE WHEN failures + 1 >= ? THEN 1 ELSE locked END WHERE id = ?"
        )
        await self._db(self._update, sql, (self._lockout_after, therapist_id))

    async def _succeed(self, row: sqlite3.Row, password: str, reason: str = OK) -> LoginResult:
        rid: str = row["id"]
        await self._db(self._update, "UPDATE therapist SET failures = 0 WHERE id = ?", (rid,))
        if passwords.needs_rehash(row["password_hash"], self._params):
            encoded = await self._hash(password)
            sql = "UPDATE therapist SET password_hash = ? WHERE id = ? AND password_hash = ?"
            await self._db(self._update, sql, (encoded, rid, row["password_hash"]))
        return LoginResult(ok=True, therapist_id=rid, reason=reason)
