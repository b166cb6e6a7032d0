"""Where therapist account rows live: the interface, and the SQLite file of the embedded default.

``AccountStore`` (account_store.py) holds the rules (password policy, sealing, second factors, login
answers that reveal nothing); a backend only keeps rows. A row is a dict of the columns below,
with ``None`` for an empty column. Everything that identifies a person is sealed by
``AccountStore`` before it reaches a backend, so a backend never sees a name in clear.

Changes are compare-and-set where two broker processes could race (a TOTP step spent twice, a
recovery code used twice): ``update`` takes the values a row must still hold for the change to
apply, and says whether it did.
"""

from __future__ import annotations

import asyncio
import builtins
import os
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, Protocol, TypeVar

Row = dict[str, Any]
P = ParamSpec("P")
T = TypeVar("T")

#: Every column, with its kind: "text", "int" or "bytes" (sealed blobs).
COLUMNS: dict[str, str] = {
    "id": "text",
    "username_key": "text",
    "username_enc": "bytes",
    "display_name_enc": "bytes",
    "password_hash": "text",
    "totp_secret_enc": "bytes",
    "totp_pending_enc": "bytes",
    "totp_last_step": "int",
    "recovery_hashes": "text",
    "passkeys_enc": "bytes",
    "disabled": "int",
    "failures": "int",
    "locked": "int",
    "created_at": "text",
    "sessions_epoch": "text",
}
#: Columns a new row may leave out, with the value they then hold.
DEFAULTS: Row = {
    "display_name_enc": None,
    "totp_secret_enc": None,
    "totp_pending_enc": None,
    "totp_last_step": None,
    "recovery_hashes": "[]",
    "passkeys_enc": None,
    "disabled": 0,
    "failures": 0,
    "locked": 0,
    "sessions_epoch": None,
}


def check_columns(names: Any) -> None:
    """Refuse unknown column names before they get anywhere near a query."""
    unknown = set(names) - COLUMNS.keys()
    if unknown:
        raise ValueError(f"unknown account columns: {sorted(unknown)}")


class AccountRows(Protocol):
    """Durable storage of account rows; every method is safe to call from several processes."""

    async def key_check(self, sealed: bytes) -> bytes:
        """Store ``sealed`` as the key check if there is none yet; return the stored one."""
        ...

    async def by_id(self, therapist_id: str) -> Row | None: ...

    async def by_key(self, username_key: str) -> Row | None: ...

    async def all(self) -> builtins.list[Row]:
        """Every row, oldest first."""
        ...

    async def insert(self, row: Row) -> bool:
        """Add a row; False (and no change) when its ``username_key`` is taken."""
        ...

    async def update(
        self,
        therapist_id: str,
        changes: Row,
        *,
        expect: Row | None = None,
        step_below: int | None = None,
    ) -> bool:
        """Apply ``changes`` if the row exists, still holds ``expect`` and (when given) its
        ``totp_last_step`` is empty or below ``step_below``; True when it applied."""
        ...

    async def count_failure(self, therapist_id: str, lockout_after: int) -> None:
        """One more consecutive failure, locking the account at ``lockout_after``."""
        ...

    async def balance(self) -> None:
        """A write costing about what ``count_failure`` costs, touching no account."""
        ...

    async def close(self) -> None: ...


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
# Columns added after the first release, added to older files when they are opened.
_LATER_COLUMNS = {"passkeys_enc": "BLOB", "sessions_epoch": "TEXT"}


class SqliteAccountRows:
    """Rows in one SQLite file (0600, secure_delete on); calls run in a worker thread."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA secure_delete = ON")
        self._conn.execute("PRAGMA synchronous = FULL")
        self._conn.executescript(_SCHEMA)
        present = {r["name"] for r in self._conn.execute("PRAGMA table_info(therapist)")}
        for name, kind in _LATER_COLUMNS.items():
            if name not in present:
                self._conn.execute(f"ALTER TABLE therapist ADD COLUMN {name} {kind}")

    def _run(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._conn.execute(sql, params)

    def key_check_now(self, sealed: bytes) -> bytes:
        """The synchronous key check, so a wrong key fails when the store is constructed."""
        with self._lock:
            self._conn.execute("INSERT OR IGNORE INTO meta (k, v) VALUES ('key_check', ?)", (sealed,))
            stored: bytes = self._conn.execute("SELECT v FROM meta WHERE k = 'key_check'").fetchone()[0]
        return stored

    async def key_check(self, sealed: bytes) -> bytes:
        return await _thread(self.key_check_now, sealed)

    def _one(self, sql: str, params: tuple[Any, ...]) -> Row | None:
        with self._lock:
            row = self._conn.execute(sql, params).fetchone()
        return dict(row) if row is not None else None

    async def by_id(self, therapist_id: str) -> Row | None:
        return await _thread(self._one, "SELECT * FROM therapist WHERE id = ?", (therapist_id,))

    async def by_key(self, username_key: str) -> Row | None:
        return await _thread(self._one, "SELECT * FROM therapist WHERE username_key = ?", (username_key,))

    def _all(self) -> builtins.list[Row]:
        with self._lock:
            return [dict(r) for r in self._conn.execute("SELECT * FROM therapist ORDER BY created_at, id")]

    async def all(self) -> builtins.list[Row]:
        return await _thread(self._all)

    def _insert(self, row: Row) -> bool:
        full = {**DEFAULTS, **row}
        check_columns(full)
        names = ", ".join(full)
        marks = ", ".join("?" for _ in full)
        try:
            self._run(
                f"INSERT INTO therapist ({names}) VALUES ({marks})",
                tuple(full.values()),
            )
        except sqlite3.IntegrityError:
            return False
        return True

    async def insert(self, row: Row) -> bool:
        return await _thread(self._insert, row)

    def _update(self, therapist_id: str, changes: Row, expect: Row, step_below: int | None) -> bool:
        check_columns(changes)
        check_columns(expect)
        sets = ", ".join(f"{name} = ?" for name in changes)
        where = ["id = ?"]
        params: builtins.list[Any] = [*changes.values(), therapist_id]
        for name, value in expect.items():
            if value is None:
                where.append(f"{name} IS NULL")
            else:
                where.append(f"{name} = ?")
                params.append(value)
        if step_below is not None:
            where.append("(totp_last_step IS NULL OR totp_last_step < ?)")
            params.append(step_below)
        sql = f"UPDATE therapist SET {sets} WHERE {' AND '.join(where)}"
        return self._run(sql, tuple(params)).rowcount > 0

    async def update(
        self,
        therapist_id: str,
        changes: Row,
        *,
        expect: Row | None = None,
        step_below: int | None = None,
    ) -> bool:
        return await _thread(self._update, therapist_id, changes, expect or {}, step_below)

    async def count_failure(self, therapist_id: str, lockout_after: int) -> None:
        sql = (
            "UPDATE therapist SET failures = failures + 1,"
            " locked = CASE WHEN failures + 1 >= ? THEN 1 ELSE locked END WHERE id = ?"
        )
        await _thread(self._run, sql, (lockout_after, therapist_id))

    async def balance(self) -> None:
        await _thread(self._run, "UPDATE meta SET v = v WHERE k = 'key_check'")

    async def close(self) -> None:
        with self._lock:
            self._conn.close()


async def _thread(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    return await asyncio.to_thread(fn, *args, **kwargs)
