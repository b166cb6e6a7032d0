"""Append-only, hash-chained, content-free audit log.

Each line is one JSON entry: who (an opaque id) did what (a fixed event type) to which session
(an opaque id), when, and with what outcome (a fixed word). Nothing else can be written: there is
no free-text field, and ids must look like random tokens, so names, addresses and messages cannot
end up here by mistake. The one addition is an aggregate entry's ``count`` and ``since``: events
anyone can cause (failed logins, reports) are written a few per window and counted beyond that
(``broker.audit.flood``).

Every entry carries the hash of the one before it (``prev``) and its own ``hash``, so editing,
inserting, removing or reordering entries breaks the chain. When the file reaches
``rotate_bytes`` it is renamed ``<log>.N`` and a new one continues the chain. The chain head (last
seq and hash) is kept in ``<log>.head`` with an HMAC under the audit key, so cutting entries off
the end, or rewriting the whole log, is detected too by anyone who does not hold that key; anchors
kept off the machine cover those who do (``broker.audit.verify``).

When the log is opened, or found changed under a running writer, and its end does not match the
signed head (a crash between the two writes, or tampering), an ``audit_integrity_warning`` entry
is written before anything else, and ``broker audit verify`` fails until an admin acknowledges it.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from broker.audit.flood import DEFAULT_BURST, DEFAULT_WINDOW_S, FloodGate, FloodKey
from broker.audit.format import (
    EVENTS,
    FLOODABLE_EVENTS,
    GENESIS,
    OPAQUE_ID,
    OUTCOMES,
    AuditEvent,
    AuditFieldRejected,
    AuditOutcome,
    canonical,
    check_id,
    check_word,
    entry_hash,
    format_time,
    head_bytes,
    head_key,
    head_path,
    lock_current,
    rotated_numbers,
    rotated_path,
)
from broker.audit.verify import (
    WARNING_FOR,
    Anchor,
    IntegrityWarning,
    Problem,
    VerifyReport,
    check,
    compare_head,
    last_entry,
    lines_of,
    verify,
)

log = logging.getLogger("broker.audit")

_TAIL_CHUNK = 64 * 1024
#: A new file is started once the current one reaches this size (0: never).
DEFAULT_ROTATE_BYTES = 16 * 1024 * 1024

__all__ = [
    "DEFAULT_ROTATE_BYTES",
    "GENESIS",
    "OPAQUE_ID",
    "AcknowledgeRefused",
    "Anchor",
    "AuditEvent",
    "AuditFieldRejected",
    "AuditLog",
    "AuditOutcome",
    "IntegrityWarning",
    "Problem",
    "VerifyReport",
    "entry_hash",
    "head_path",
    "rotated_path",
    "verify",
]


#: An entry to write: event, actor, session, outcome and any extra fields.
_Entry = tuple[str, str | None, str | None, str, dict[str, Any] | None]


class AcknowledgeRefused(ValueError):
    """``broker audit acknowledge`` cannot record an acknowledgement; the message says why."""


class AuditLog:
    """Appends audit entries to ``path``; safe for concurrent appends (asyncio lock + file lock),
    also from several processes sharing the directory."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        key: bytes,
        *,
        durable: bool = True,
        clock: Callable[[], float] = time.time,
        rotate_bytes: int = DEFAULT_ROTATE_BYTES,
        flood_burst: int = DEFAULT_BURST,
        flood_window_s: float = DEFAULT_WINDOW_S,
    ) -> None:
        self._path = Path(path)
        self._head_path = head_path(path)
        self._key = key
        self._head_key = head_key(key)
        self._durable = durable
        self._clock = clock
        self._rotate_bytes = max(0, rotate_bytes)
        self._lock = asyncio.Lock()
        #: Entries waiting for the next write, each with what its caller awaits (``_write``).
        self._waiting: list[tuple[_Entry, asyncio.Future[int]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._flood = FloodGate(self._write_aggregate, burst=flood_burst, window_s=flood_window_s, clock=clock)
        self._closed = False
        self._path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._fd = os.open(self._path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        self._seq = 0
        self._last_hash = GENESIS
        self._size = -1
        #: The file (device, inode) that ``_seq``, ``_last_hash`` and ``_size`` describe.
        self._file: tuple[int, int] | None = None
        self.open_report = self._open_check()

    @property
    def path(self) -> Path:
        return self._path

    def close(self) -> None:
        """Write what the flood gate counted so far, then close (``aclose`` also waits for writes under way)."""
        if self._closed:
            return
        for (event, outcome, actor, session), count, since in self._flood.take_pending():
            try:
                self._append_locked(event, actor, session, outcome, _aggregate(count, since))
            except OSError:
                log.exception("event=audit_aggregate_failed audit_event=%s count=%d", event, count)
        self._closed = True
        os.close(self._fd)

    async def aclose(self) -> None:
        await self._flood.drain()
        async with self._lock:  # after every write under way or waiting (the writer holds the lock for them all)
            self.close()

    async def append(
        self,
        event: AuditEvent | str,
        actor: str | None = None,
        session: str | None = None,
        outcome: AuditOutcome | str = AuditOutcome.OK,
    ) -> int | None:
        """Record one event and return its seq; refuses anything but fixed words and opaque ids.

        None: an event anyone can cause that was counted into its window's aggregate entry instead.
        """
        ev = check_word(event, EVENTS, "event")
        out = check_word(outcome, OUTCOMES, "outcome")
        check_id(actor, "actor")
        check_id(session, "session")
        if ev in FLOODABLE_EVENTS and not self._flood.admit((ev, out, actor, session)):
            return None
        return await self._write(ev, actor, session, out, None)

    async def verify(self, anchors: Sequence[Anchor] = ()) -> VerifyReport:
        """Verify this log (see ``broker.audit.verify.verify``)."""
        async with self._lock:
            return await asyncio.to_thread(verify, self._path, self._key, anchors=anchors)

    async def acknowledge_warnings(self, through: int) -> tuple[int, tuple[IntegrityWarning, ...]]:
        """Record that an admin looked into every integrity warning up to entry ``through``:
        the new entry's seq and the warnings it acknowledges. Refused (ValueError, saying why)
        when the log itself is not intact, or a warning after ``through`` is still unreviewed."""
        async with self._lock:
            report = await asyncio.to_thread(verify, self._path, self._key, require_acknowledged=False)
            if not report.ok:
                raise AcknowledgeRefused(
                    f"the log itself is not intact ({report.problem}); acknowledging warnings would not mend that"
                )
            pending = report.unacknowledged
            if not pending:
                raise AcknowledgeRefused("there is no unacknowledged integrity warning in the log")
            newer = [w for w in pending if w.seq > through]
            if newer:
                raise AcknowledgeRefused(
                    f"entry {newer[0].seq} is an integrity warning after entry {through}: look into it too, "
                    f"then acknowledge through {pending[-1].seq}"
                )
            event, outcome = AuditEvent.AUDIT_WARNINGS_ACKNOWLEDGED.value, AuditOutcome.OK.value
            seq = await asyncio.to_thread(self._append_locked, event, None, None, outcome)
            return seq, pending

    async def _write(
        self, event: str, actor: str | None, session: str | None, outcome: str, extra: dict[str, Any] | None
    ) -> int:
        """Append one entry; returns once it is on disk. Entries asked for while a write is under way
        go together in the next one: the log and its head are synced once for all of them. (One write
        of three syncs per entry kept call set-ups waiting seconds behind the disk at 50 sessions a
        second beginning and ending: issue 32.)"""
        loop = asyncio.get_running_loop()
        written: asyncio.Future[int] = loop.create_future()
        self._waiting.append(((event, actor, session, outcome, extra), written))
        if self._writer is None:
            self._writer = loop.create_task(self._write_waiting())
        return await written

    async def _write_waiting(self) -> None:
        """Write what waits, in turns, until nothing does (one turn per write of the batch)."""
        try:
            async with self._lock:
                while self._waiting:
                    batch, self._waiting = self._waiting, []
                    results: list[int | Exception]
                    try:
                        results = [*await asyncio.to_thread(self._append_batch_locked, [e for e, _ in batch])]
                    except Exception as exc:  # closed, or the file could not be locked: each caller is told
                        results = [exc] * len(batch)
                    for (_, written), result in zip(batch, results, strict=True):
                        if written.done():  # its caller gave up waiting; the entry is written all the same
                            continue
                        if isinstance(result, Exception):
                            written.set_exception(result)
                        else:
                            written.set_result(result)
        finally:
            self._writer = None

    async def _write_aggregate(self, key: FloodKey, count: int, since: float) -> None:
        event, outcome, actor, session = key
        await self._write(event, actor, session, outcome, _aggregate(count, since))

    # The methods below do blocking file I/O; they run in a worker thread or at start-up.

    def _open_check(self) -> VerifyReport:
        """Drop a torn last line, resync with the files, and record any mismatch with the head."""
        self._fd = lock_current(self._path, self._fd, exclusive=True)  # type: ignore[assignment]
        try:
            removed_torn_line = self._drop_torn_line()
            self._resync()
            size = os.fstat(self._fd).st_size
            report = check(
                [(self._path.name, lines_of(self._fd, size))],
                self._read_head(),
                self._head_key,
                start=self._previous_end(),
                require_acknowledged=False,
            )
            warning = AuditEvent.AUDIT_INTEGRITY_WARNING
            if removed_torn_line:
                self._write_entry(warning, None, None, AuditOutcome.INCOMPLETE_ENTRY_REMOVED)
            if report.kind is Problem.NO_LOG and not removed_torn_line and not rotated_numbers(self._path):
                # A new log: sign its empty head, so that an empty log without one means removal.
                self._write_head()
                log.info("event=audit_log_created")
                return VerifyReport(True, 0)
            if not report.ok:
                outcome = (
                    AuditOutcome.HEAD_MISSING
                    if report.kind is None
                    else WARNING_FOR.get(report.kind, AuditOutcome.HEAD_MISSING)
                )
                self._write_entry(warning, None, None, outcome)
                log.warning("event=audit_integrity_warning problem=%s", report.kind)
            return report
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _append_locked(
        self, event: str, actor: str | None, session: str | None, outcome: str, extra: dict[str, Any] | None = None
    ) -> int:
        if self._closed:
            raise OSError("the audit log is closed")
        self._fd = lock_current(self._path, self._fd, exclusive=True)  # type: ignore[assignment]
        try:
            self._follow_other_writers()
            if self._rotate_bytes and self._size >= self._rotate_bytes:
                self._rotate()
            return self._write_entry(event, actor, session, outcome, extra)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _append_batch_locked(self, entries: Sequence[_Entry]) -> list[int | OSError]:
        """Append ``entries`` under the file lock and sync them together; each one's seq, or the
        error that kept it out of the log."""
        if self._closed:
            raise OSError("the audit log is closed")
        self._fd = lock_current(self._path, self._fd, exclusive=True)  # type: ignore[assignment]
        try:
            self._follow_other_writers()
            results: list[int | OSError] = []
            unsynced: list[int] = []  # results of entries written since the last sync
            synced_size = self._size
            for event, actor, session, outcome, extra in entries:
                if self._rotate_bytes and self._size >= self._rotate_bytes:
                    self._sync_batch(results, unsynced, synced_size)  # all of the full file on disk first
                    try:
                        self._rotate()
                    except OSError as exc:
                        results.append(exc)
                        continue
                    synced_size = self._size
                try:
                    results.append(self._write_entry(event, actor, session, outcome, extra, sync=False))
                    unsynced.append(len(results) - 1)
                except OSError as exc:
                    results.append(exc)
            self._sync_batch(results, unsynced, synced_size)
            return results
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _sync_batch(self, results: list[int | OSError], unsynced: list[int], synced_size: int) -> None:
        """Sync the entries written since the last sync, then the head. If the log cannot be synced
        they are cut off its end (as a single entry's failed write is) and fail."""
        if not unsynced:
            return
        try:
            if self._durable:
                os.fsync(self._fd)
        except OSError as exc:
            os.ftruncate(self._fd, synced_size)
            self._resync()
            for i in unsynced:
                results[i] = exc
            unsynced.clear()
            return
        try:
            self._write_head()
        except OSError as exc:  # the entries are in the log; the head's mismatch is reported when it is next opened
            for i in unsynced:
                results[i] = exc
        unsynced.clear()

    def _follow_other_writers(self) -> None:
        """Continue from what another process wrote (or a rotation it made) since our last write,
        and record it when the file's end then does not match the signed head."""
        now = os.fstat(self._fd)
        if (now.st_dev, now.st_ino) == self._file and now.st_size == self._size:
            return  # a file another writer rotated in can have our old size: its identity tells them apart
        self._resync()
        found = compare_head(self._read_head(), self._head_key, self._seq, self._last_hash)
        if found is not None:
            outcome = WARNING_FOR.get(found.kind, AuditOutcome.HEAD_MISSING)
            self._write_entry(AuditEvent.AUDIT_INTEGRITY_WARNING, None, None, outcome)
            log.warning("event=audit_integrity_warning problem=%s", found.kind)

    def _rotate(self) -> None:
        """Rename the full file to the next ``<log>.N`` and continue the chain in a new one."""
        numbers = rotated_numbers(self._path)
        target = rotated_path(self._path, (numbers[-1] if numbers else 0) + 1)
        if target.exists():
            raise OSError(f"cannot rotate the audit log: {target.name} already exists")
        os.rename(self._path, target)
        if self._durable:
            _fsync_dir(self._path.parent)
        log.info("event=audit_log_rotated file=%s", target.name)
        self._fd = lock_current(self._path, self._fd, exclusive=True)  # type: ignore[assignment]
        # Read where the chain stands: other writers may have written, and even rotated, files of their
        # own between the rename and the lock (the file then found empty was not started by us).
        self._file = None
        self._follow_other_writers()

    def _write_entry(
        self,
        event: str,
        actor: str | None,
        session: str | None,
        outcome: str,
        extra: dict[str, Any] | None = None,
        *,
        sync: bool = True,
    ) -> int:
        """Write one entry at the end; with ``sync``, sync it and the head now (else the caller does)."""
        entry: dict[str, Any] = {
            "seq": self._seq + 1,
            "time": _now(self._clock),
            "event": str(event),
            "actor": actor,
            "session": session,
            "outcome": str(outcome),
            "prev": self._last_hash,
            **(extra or {}),
        }
        if "since" in entry and entry["since"] > entry["time"]:
            entry["since"] = entry["time"]  # the clock went back: an aggregate never ends before it began
        entry["hash"] = entry_hash(entry)
        line = canonical(entry) + b"\n"
        try:
            _write_all(self._fd, line)
            if self._durable and sync:
                os.fsync(self._fd)
        except OSError:
            os.ftruncate(self._fd, self._size)  # never leave half an entry behind
            raise
        self._seq, self._last_hash = entry["seq"], entry["hash"]
        self._size += len(line)
        if sync:
            self._write_head()
        return self._seq

    def _read_head(self) -> bytes | None:
        try:
            return self._head_path.read_bytes()
        except FileNotFoundError:
            return None

    def _write_head(self) -> None:
        tmp = self._head_path.with_name(self._head_path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, head_bytes(self._head_key, self._seq, self._last_hash))
            if self._durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self._head_path)
        if self._durable:
            _fsync_dir(self._head_path.parent)

    def _drop_torn_line(self) -> bool:
        size = os.fstat(self._fd).st_size
        if size == 0:
            return False
        tail = os.pread(self._fd, min(size, _TAIL_CHUNK), max(0, size - _TAIL_CHUNK))
        if tail.endswith(b"\n"):
            return False
        cut = tail.rfind(b"\n")
        keep = (size - len(tail) + cut + 1) if cut >= 0 else (0 if size <= _TAIL_CHUNK else size)
        if keep == size:
            return False  # one enormous line: leave it for verify to report
        os.ftruncate(self._fd, keep)
        if self._durable:
            os.fsync(self._fd)
        return True

    def _previous_end(self) -> tuple[int, str]:
        """Seq and hash of the last entry of the newest rotated file (where this file continues)."""
        numbers = rotated_numbers(self._path)
        if not numbers:
            return 0, GENESIS
        try:
            fd = os.open(rotated_path(self._path, numbers[-1]), os.O_RDONLY)
        except FileNotFoundError:
            return 0, GENESIS
        try:
            entry = last_entry(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        return (entry["seq"], entry["hash"]) if entry is not None else (0, GENESIS)

    def _resync(self) -> None:
        """Continue the chain from the last entry actually written (in this file or the one before)."""
        now = os.fstat(self._fd)
        self._size, self._file = now.st_size, (now.st_dev, now.st_ino)
        entry = last_entry(self._fd, self._size)
        if entry is not None:
            self._seq, self._last_hash = entry["seq"], entry["hash"]
        else:
            self._seq, self._last_hash = self._previous_end()


def _aggregate(count: int, since: float) -> dict[str, Any]:
    return {"count": count, "since": format_time(since)}


def _now(clock: Callable[[], float]) -> str:
    return format_time(clock())


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
