"""The embedded store's durable half: what a session needs to come back after a restart, on disk.

``broker serve`` without Redis keeps session state in memory (``broker.store.memory``) and writes
the durable keys (``base.is_durable``: session records and the therapists' owner indexes) through
to ``DATA_DIR/sessions.sqlite3``, read back at start. A restart, even SIGKILL, then loses no
scheduled or live session: links resolve and peers resume with their seats. Mailboxes, rate
counters and pre-flight state stay in memory only; peers offer again once they reconnect.

On disk, one row per key: ``(id, expires, sealed)``.

- ``id`` is an HMAC of the key's name, so no session id or therapist id appears in clear.
- ``sealed`` is the name and the value sealed with AES-256-GCM (``sealing.Sealer``) under a key
  derived from the server secret for this file alone, bound to the row's id: a row copied over
  another does not open.
- ``expires`` (Unix seconds) stays in clear, so expired rows go without being opened.

The file is created 0600. SQLite's ``secure_delete`` overwrites what a delete frees, and after
every commit that deleted something the write-ahead log is checkpointed and truncated, so nothing
of an ended or expired session is left in either file.

Writes are committed in groups on a thread of their own: the event loop never waits on the disk,
and every write staged while one commit runs goes into the next. A caller of ``commit`` (a
schedule, a join) is answered only once its write is on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from broker.store.base import StoreUnavailable
from broker.store.memory import MemoryStore
from broker.store.sealing import Sealer, StoreCorrupt

log = logging.getLogger("broker.session_file")

#: How far the relay numbering moves up at each start (``seq_base``). A capped log would need
#: 2**32 entries in one process's life to reach the next start's numbers (the rate limits allow
#: a few hundred a second), and 2**53 (the protocol's largest counter) leaves 2**21 starts.
SEQ_BLOCK = 1 << 32
MAX_SEQ = 2**53 - 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entry (id BLOB PRIMARY KEY, expires REAL NOT NULL, sealed BLOB NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS entry_expires ON entry (expires);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""

#: A staged write: the value and its expiry, or None for a delete.
Staged = tuple[bytes, float] | None


def _subkey(key: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"session file v1", info=purpose).derive(key)


class SessionFile:
    """The journal of one embedded store (``memory.Journal``): a SQLite file, one writer thread."""

    def __init__(self, path: Path, key: bytes, clock: Callable[[], float] = time.time) -> None:
        if len(key) != 32:
            raise ValueError("the session file key must be 32 bytes")
        self.path = path
        self._clock = clock
        self._names = _subkey(key, b"row id")
        #: Used on the writer thread only (its nonce counter is not shared between threads).
        self._sealer = Sealer(_subkey(key, b"seal"))
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="session-file")
        self._db: sqlite3.Connection | None = None
        self._staged: dict[str, Staged] = {}
        self._generation = 0  # writes staged so far
        self._written = 0  # of which on disk
        self._flushing: asyncio.Task[None] | None = None
        self._closed = False
        #: Where new capped logs start numbering (set by ``load``).
        self.seq_base = 0

    # ------------------------------------------------------------ the event loop's side

    def stage(self, key: str, value: bytes | None, expires: float) -> None:
        if self._closed:
            raise StoreUnavailable("session file closed")
        self._staged[key] = None if value is None else (value, expires)
        self._generation += 1

    async def commit(self) -> None:
        target = self._generation
        while self._written < target:
            task = self._flushing or self._start_flush(asyncio.get_running_loop())
            await asyncio.shield(task)

    def commit_soon(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop running (a sweep outside it): the next commit takes these along
        if self._flushing is None and not self._closed:
            self._start_flush(loop)

    async def load(self) -> list[tuple[str, bytes, float]]:
        """Open (or create) the file; every live key in it, as (name, value, expires)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._load, self._clock())

    async def close(self) -> None:
        if self._closed:
            return
        with contextlib.suppress(StoreUnavailable):
            await self.commit()
        self._closed = True
        await asyncio.get_running_loop().run_in_executor(self._executor, self._close_db)
        self._executor.shutdown(wait=True)

    def _start_flush(self, loop: asyncio.AbstractEventLoop) -> asyncio.Task[None]:
        task = loop.create_task(self._flush())
        self._flushing = task
        task.add_done_callback(_retrieve)
        return task

    async def _flush(self) -> None:
        try:
            batch, generation = self._staged, self._generation
            self._staged = {}
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(self._executor, self._write, batch, self._clock())
            except (sqlite3.Error, OSError) as exc:
                for name, item in batch.items():  # tried again with the next commit, unless written since
                    self._staged.setdefault(name, item)
                log.error("event=session_file_write_failed error=%s", type(exc).__name__)
                raise StoreUnavailable("session file") from None
            self._written = max(self._written, generation)
        finally:
            self._flushing = None

    # ------------------------------------------------------------ the writer thread's side

    def _row_id(self, name: str) -> bytes:
        return hmac.new(self._names, name.encode(), hashlib.sha256).digest()[:16]

    def _seal(self, row: bytes, name: str, value: bytes) -> bytes:
        encoded = name.encode()
        return self._sealer.seal(b"row\x00" + row, len(encoded).to_bytes(2, "big") + encoded + value)

    def open_row(self, row: bytes, sealed: bytes) -> tuple[str, bytes]:
        """A row's key name and value (StoreCorrupt if it does not open): what anyone holding the
        server secret reads, as tests/store/test_session_file.py does."""
        plain = self._sealer.open(b"row\x00" + row, sealed)
        size = int.from_bytes(plain[:2], "big")
        name = plain[2 : 2 + size].decode()
        if not hmac.compare_digest(self._row_id(name), row):
            raise StoreCorrupt("a row's name does not match its id")
        return name, plain[2 + size :]

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        os.chmod(self.path, 0o600)  # SQLite gives its -wal and -shm files the same mode
        db = sqlite3.connect(self.path, isolation_level=None)
        db.execute("PRAGMA secure_delete=ON")
        db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives the process being killed (what a restart is); only an
        # OS crash or power cut may lose the last commits, as Redis with appendfsync everysec may.
        # FULL fsynced every commit and added tens of ms to every step of a call set-up (sessions.py).
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=5000")
        db.executescript(_SCHEMA)
        return db

    def _load(self, now: float) -> list[tuple[str, bytes, float]]:
        db = self._db = self._connect()
        db.execute("BEGIN IMMEDIATE")
        try:
            expired = db.execute("DELETE FROM entry WHERE expires <= ?", (now,)).rowcount
            live: list[tuple[str, bytes, float]] = []
            unreadable = 0
            for row, expires, sealed in db.execute("SELECT id, expires, sealed FROM entry").fetchall():
                try:
                    name, value = self.open_row(row, sealed)
                except (StoreCorrupt, UnicodeDecodeError):
                    unreadable += 1  # another server secret's, or altered: left to expire
                    continue
                live.append((name, value, float(expires)))
            found = db.execute("SELECT value FROM meta WHERE name = 'seq_base'").fetchone()
            base = 0 if found is None else int(found[0]) + SEQ_BLOCK
            if base > MAX_SEQ - SEQ_BLOCK:
                log.warning("event=session_file_seq_wrapped")
                base = 0
            db.execute("INSERT OR REPLACE INTO meta (name, value) VALUES ('seq_base', ?)", (base,))
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        self.seq_base = base
        if expired:
            self._truncate_log(db)
        log.info("event=session_file_loaded keys=%d expired=%d unreadable=%d", len(live), expired, unreadable)
        return live

    def _write(self, batch: dict[str, Staged], now: float) -> None:
        db = self._db
        if db is None:
            raise sqlite3.ProgrammingError("the session file is not open")
        deleted = 0
        db.execute("BEGIN IMMEDIATE")
        try:
            for name, item in batch.items():
                row = self._row_id(name)
                if item is None:
                    deleted += db.execute("DELETE FROM entry WHERE id = ?", (row,)).rowcount
                else:
                    value, expires = item
                    db.execute(
                        "INSERT OR REPLACE INTO entry (id, expires, sealed) VALUES (?, ?, ?)",
                        (row, expires, self._seal(row, name, value)),
                    )
            deleted += db.execute("DELETE FROM entry WHERE expires <= ?", (now,)).rowcount
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        if deleted:
            self._truncate_log(db)

    def _truncate_log(self, db: sqlite3.Connection) -> None:
        """Move every page into the file (where secure_delete zeroed what was freed) and empty the
        write-ahead log, which would otherwise keep older copies of deleted rows' pages."""
        busy = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        if busy:
            log.warning("event=session_file_checkpoint_busy")

    def _close_db(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def _retrieve(task: asyncio.Task[None]) -> None:
    """A commit nobody awaited (``commit_soon``) failed: it was logged, and the writes wait for the next."""
    if not task.cancelled():
        task.exception()


async def open_session_store(path: Path, key: bytes, clock: Callable[[], float] = time.time) -> MemoryStore:
    """The embedded store with its session file at ``path`` (created 0600 if absent), holding
    every live key the file had; ``key`` (32 bytes, from the server secret) seals the rows."""
    journal = SessionFile(path, key, clock)
    rows = await journal.load()
    store = MemoryStore(clock, journal=journal, seq_base=journal.seq_base)
    for name, value, expires in rows:
        store.restore(name, value, expires)
    return store
