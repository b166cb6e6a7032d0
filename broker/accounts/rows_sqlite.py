"""Therapist account rows in one SQLite file: the embedded default, for a practice that runs one broker.

The file is 0600 with ``secure_delete`` on, so a deleted row's bytes do not linger in free pages;
calls run in a worker thread so that a slow disk never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import builtins
import os
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from broker.accounts.rows import DEFAULTS, Row, check_columns

P = ParamSpec("P")
T = TypeVar("T")

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
#: How long a call waits for another process's write to the file (a start, an account added) to end.
BUSY_TIMEOUT_S = 30.0
# Columns added after the first release, added to older files when they are opened.
_LATER_COLUMNS = {"passkeys_enc": "BLOB", "sessions_epoch": "TEXT", "vault_enc": "BLOB"}


class SqliteAccountRows:
    """Rows in one SQLite file (0600, secure_delete on); calls run in a worker thread."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=BUSY_TIMEOUT_S)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA secure_delete = ON")
        self._conn.execute("PRAGMA synchronous = FULL")
        self._create_or_migrate()

    def _create_or_migrate(self) -> None:
        """Create the tables and add the later columns in one write transaction. Processes that
        open the file together (brokers, ``broker therapist add``) take turns, and each finds the
        schema as the one before left it: two adding a column at once was an error (duplicate
        column name)."""
        self._conn.execute("BEGIN IMMEDIATE")  # the write lock now, before anything is read
        try:
            for statement in filter(str.strip, _SCHEMA.split(";")):
                self._conn.execute(statement)
            present = {r["name"] for r in self._conn.execute("PRAGMA table_info(therapist)")}
            for name, kind in _LATER_COLUMNS.items():
                if name not in present:
                    self._conn.execute(f"ALTER TABLE therapist ADD COLUMN {name} {kind}")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

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
