"""The embedded store's session file (issue 26, item 1): what a session needs survives a restart,
sealed, and nothing of a session stays on disk once it has ended or expired."""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
from pathlib import Path

from broker.store.base import is_durable, session_key, session_prefix
from broker.store.memory import MemoryStore
from broker.store.session_file import SessionFile, open_session_store

KEY = secrets.token_bytes(32)


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def box(session_id: str, peer: str) -> str:
    return f"{session_prefix(session_id)}:box:{peer}"


def raw_bytes(path: Path) -> bytes:
    """Every byte SQLite keeps for the file: the database, its write-ahead log and shared memory."""
    return b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists())


def rows(path: Path) -> list[tuple[bytes, float, bytes]]:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        return [(bytes(r), float(e), bytes(s)) for r, e, s in db.execute("SELECT id, expires, sealed FROM entry")]


def opened(path: Path, key: bytes = KEY) -> dict[str, bytes]:
    """Every row as whoever holds the server secret reads it."""
    reader = SessionFile(path, key)
    return dict(reader.open_row(row, sealed) for row, _, sealed in rows(path))


def test_only_records_and_owner_indexes_are_durable() -> None:
    assert is_durable(session_key("abc"))
    assert is_durable("owner:t-1")
    assert not is_durable(box("abc", "p1"))
    assert not is_durable("login:xyz")
    assert not is_durable("passkey-challenge:x")


async def test_records_and_owner_indexes_survive_a_restart_and_nothing_else_does(tmp_path: Path) -> None:
    path = tmp_path / "sessions.sqlite3"
    first = await open_session_store(path, KEY)
    sid = secrets.token_urlsafe(16)
    await first.put(session_key(sid), b"record v1", 3600)
    assert await first.update(session_key(sid), lambda raw: ((raw or b"") + b" joined", "ok"), 3600) == "ok"
    await first.update("owner:t-1", lambda raw: (b'[["' + sid.encode() + b'",1]]', None), 3600)
    await first.put("login:abc", b"a login session", 3600)
    await first.append(box(sid, "p1"), b"an offer", 16, 3600)
    await first.incr_window("rate:x", 60)
    # No close: after SIGKILL the file is all there is.
    second = await open_session_store(path, KEY)
    try:
        assert await second.get(session_key(sid)) == b"record v1 joined"
        assert await second.get("owner:t-1") == b'[["' + sid.encode() + b'",1]]'
        assert await second.get("login:abc") is None
        assert await second.read_since(box(sid, "p1"), 0) == []
        assert sorted(await second.keys("")) == sorted(["owner:t-1", session_key(sid)])
    finally:
        await first.close()
        await second.close()


async def test_a_write_is_on_disk_before_the_store_answers(tmp_path: Path) -> None:
    path = tmp_path / "sessions.sqlite3"
    store = await open_session_store(path, KEY)
    try:
        await store.put(session_key("s1"), b"scheduled", 600)
        assert opened(path) == {session_key("s1"): b"scheduled"}
        await store.update(session_key("s1"), lambda raw: (b"admitted", None), 600)
        assert opened(path) == {session_key("s1"): b"admitted"}
    finally:
        await store.close()


async def test_relay_numbers_after_a_restart_are_above_every_number_given_before(tmp_path: Path) -> None:
    """A reconnecting peer resumes after the last number it saw; a new process that numbered from
    1 again would have its relays taken for ones already seen, and dropped."""
    path = tmp_path / "sessions.sqlite3"
    first = await open_session_store(path, KEY)
    given = [first.append_now(box("s1", "p1"), b"m", 64, 600) for _ in range(5)]
    await first.close()
    second = await open_session_store(path, KEY)
    try:
        assert second.append_now(box("s1", "p1"), b"m", 64, 600) > max(given)
        assert second.append_now(box("s2", "p1"), b"m", 64, 600) > max(given)
    finally:
        await second.close()
    assert MemoryStore().append_now("k", b"m", 4, 60) == 1  # without a file, numbering is as before


async def test_the_file_is_private_and_holds_no_name_or_value_in_clear(tmp_path: Path) -> None:
    path = tmp_path / "sessions.sqlite3"
    store = await open_session_store(path, KEY)
    sid, therapist = secrets.token_urlsafe(16), "therapist-" + secrets.token_hex(8)
    record = b'{"CANARY-record":"' + secrets.token_hex(8).encode() + b'"}'
    try:
        await store.put(session_key(sid), record, 600)
        await store.update("owner:" + therapist, lambda raw: (b'[["' + sid.encode() + b'",1]]', None), 600)
        data = raw_bytes(path)
        for clear in (sid.encode(), therapist.encode(), b"owner:", b"CANARY-record", record):
            assert clear not in data
        for part in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            if part.exists():
                assert part.stat().st_mode & 0o777 == 0o600, part
        assert opened(path)[session_key(sid)] == record  # sealed, not lost: the key opens it
    finally:
        await store.close()


async def test_an_ended_session_leaves_nothing_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "sessions.sqlite3"
    store = await open_session_store(path, KEY)
    sid = secrets.token_urlsafe(16)
    try:
        await store.put(session_key(sid), b"record " + secrets.token_bytes(64), 600)
        await store.update("owner:t-1", lambda raw: (b'[["' + sid.encode() + b'",1]]', None), 600)
        sealed = [s for _, _, s in rows(path)]
        assert len(sealed) == 2
        # As the hub ends a session: every key of it, then the owner's index entry.
        await store.delete_prefix(session_prefix(sid))
        await store.update("owner:t-1", lambda raw: (None, None), 1)
        assert rows(path) == []
        data = raw_bytes(path)
        for blob in sealed:  # no copy of a row's bytes left in the file or its log (secure_delete)
            assert blob[-48:] not in data
    finally:
        await store.close()


async def test_an_expired_session_goes_from_memory_and_the_file(tmp_path: Path) -> None:
    path = tmp_path / "sessions.sqlite3"
    clock = Clock()
    store = await open_session_store(path, KEY, clock)
    try:
        await store.put(session_key("old"), b"gone soon", 10)
        await store.put(session_key("new"), b"stays", 1000)
        clock.now += 11
        assert store.sweep() == 1
        for _ in range(100):
            if len(rows(path)) == 1:
                break
            await asyncio.sleep(0.02)
        assert set(opened(path)) == {session_key("new")}
    finally:
        await store.close()
    # And what expired while no process ran is not loaded again, and goes from the file at start.
    clock.now += 2000
    again = await open_session_store(path, KEY, clock)
    try:
        assert await again.keys("") == []
        assert rows(path) == []
    finally:
        await again.close()


async def test_rows_sealed_under_another_secret_are_not_loaded(tmp_path: Path) -> None:
    path = tmp_path / "sessions.sqlite3"
    store = await open_session_store(path, KEY)
    await store.put(session_key("s1"), b"record", 600)
    await store.close()
    other = await open_session_store(path, secrets.token_bytes(32))
    try:
        assert await other.get(session_key("s1")) is None
    finally:
        await other.close()
