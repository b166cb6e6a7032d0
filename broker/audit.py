"""Append-only, hash-chained, content-free audit log.

Each line is one JSON entry: who (an opaque id) did what (a fixed event type) to which session
(an opaque id), when, and with what outcome (a fixed word). Nothing else can be written: there is
no free-text field, and ids must look like random tokens, so names, addresses and messages cannot
end up here by mistake.

Every entry carries the hash of the one before it (``prev``) and its own ``hash``, so editing,
inserting, removing or reordering entries breaks the chain. The chain head (last seq and hash) is
kept in a side file ``<log>.head`` with an HMAC under a key derived from the server key, so cutting
entries off the end, or rewriting the whole file, is detected too. What no local scheme can stop
is someone with the key and the files rolling both back together; ship copies off the machine if
that matters.

When the log is opened and its end does not match the signed head (a crash between the two
writes, or tampering), an ``audit_integrity_warning`` entry is written before anything else, so
the discrepancy stays on record after the head is signed again.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import hmac
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

GENESIS = "0" * 64
_FIELDS = frozenset({"seq", "time", "event", "actor", "session", "outcome", "prev", "hash"})
# Opaque ids are random tokens (url-safe base64 or hex); dots, colons, @ and spaces never pass.
OPAQUE_ID = re.compile(r"[A-Za-z0-9_-]{16,64}")
_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_TAIL_CHUNK = 64 * 1024
_MIN_KEY_BYTES = 16


class AuditEvent(StrEnum):
    """Everything the audit log can record."""

    LOGIN_SUCCESS = "login_success"
    LOGIN_FAILURE = "login_failure"
    LOGIN_LOCKED = "login_locked"
    LOGOUT = "logout"
    SECOND_FACTOR_CHANGED = "second_factor_changed"
    RECOVERY_CODE_USED = "recovery_code_used"
    REAUTHENTICATED = "reauthenticated"
    ACCOUNT_ADDED = "account_added"
    ACCOUNT_DISABLED = "account_disabled"
    ACCOUNT_ENABLED = "account_enabled"
    ACCOUNT_UNLOCKED = "account_unlocked"
    PASSWORD_RESET = "password_reset"
    SESSION_CREATED = "session_created"
    SEAT_ADMITTED = "seat_admitted"
    SEAT_DECLINED = "seat_declined"
    SEAT_REMOVED = "seat_removed"
    SEAT_ALLOWED_BACK = "seat_allowed_back"
    SEAT_REVOKED = "seat_revoked"
    SESSION_ENDED = "session_ended"
    CHECKLIST_PASSED = "checklist_passed"
    CHECKLIST_FAILED = "checklist_failed"
    INTERCEPTION_WARNING = "interception_warning"
    AUDIT_INTEGRITY_WARNING = "audit_integrity_warning"


class AuditOutcome(StrEnum):
    """The fixed words an entry's outcome may take."""

    OK = "ok"
    FAILED = "failed"
    DENIED = "denied"
    INVALID = "invalid"
    LOCKED = "locked"
    THROTTLED = "throttled"
    EXPIRED = "expired"
    TIMEOUT = "timeout"
    ERROR = "error"
    WARNING = "warning"
    CHAIN_BROKEN = "chain_broken"
    HEAD_MISMATCH = "head_mismatch"
    INCOMPLETE_ENTRY_REMOVED = "incomplete_entry_removed"


_EVENTS = frozenset(e.value for e in AuditEvent)
_OUTCOMES = frozenset(o.value for o in AuditOutcome)


class AuditFieldRejected(ValueError):
    """A value that is not one of the fixed words or not an opaque id."""


@dataclass(frozen=True)
class VerifyReport:
    """Result of checking a log: ``problem`` says in plain words what is wrong, if anything."""

    ok: bool
    entries: int
    first_bad_seq: int | None = None
    problem: str | None = None


def head_path(path: str | os.PathLike[str]) -> Path:
    """Where the signed chain head of ``path`` is kept."""
    p = Path(path)
    return p.with_name(p.name + ".head")


def _head_key(key: bytes) -> bytes:
    if len(key) < _MIN_KEY_BYTES:
        raise ValueError(f"the audit key must be at least {_MIN_KEY_BYTES} bytes")
    hkdf = HKDF(algorithm=SHA256(), length=32, salt=None, info=b"broker/audit/v1/head")
    return hkdf.derive(key)


def _head_mac(head_key: bytes, seq: int, entry_hash: str) -> str:
    return hmac.new(head_key, f"audit-head|{seq}|{entry_hash}".encode("ascii"), hashlib.sha256).hexdigest()


def _canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def entry_hash(entry: dict[str, Any]) -> str:
    """SHA-256 (hex) of the entry's canonical bytes, ``hash`` itself left out."""
    return hashlib.sha256(_canonical({k: v for k, v in entry.items() if k != "hash"})).hexdigest()


def _check_id(value: str | None, what: str) -> None:
    if value is not None and (not isinstance(value, str) or not OPAQUE_ID.fullmatch(value)):
        raise AuditFieldRejected(f"{what} must be an opaque id (16-64 characters of A-Z a-z 0-9 _ -) or None")


def _check_word(value: object, allowed: frozenset[str], what: str) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise AuditFieldRejected(f"{what} must be one of the fixed audit words")
    return str(value)


def _format_time(now: float) -> str:
    return datetime.fromtimestamp(int(now), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_entry(raw: bytes) -> dict[str, Any] | None:
    """A well-formed entry, or None if the line is not one (garbled, extra or missing fields)."""
    try:
        entry = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(entry, dict) or set(entry) != _FIELDS:
        return None
    try:
        _check_id(entry["actor"], "actor")
        _check_id(entry["session"], "session")
        _check_word(entry["event"], _EVENTS, "event")
        _check_word(entry["outcome"], _OUTCOMES, "outcome")
    except AuditFieldRejected:
        return None
    seq, when, prev, own = entry["seq"], entry["time"], entry["prev"], entry["hash"]
    if type(seq) is not int or seq < 1 or not isinstance(when, str) or not _TIME.fullmatch(when):
        return None
    if not isinstance(prev, str) or not _HEX64.fullmatch(prev) or not isinstance(own, str) or not _HEX64.fullmatch(own):
        return None
    return entry


# ----- verification --------------------------------------------------------------------------


def verify(path: str | os.PathLike[str], key: bytes) -> VerifyReport:
    """Check the whole chain and the signed head; the first problem found is reported."""
    return _verify_file(Path(path), _head_key(key))[0]


def _verify_file(path: Path, head_key: bytes) -> tuple[VerifyReport, bool]:
    """The report, and whether the chain itself (as opposed to the head) was intact."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        data = b""
    lines = data.split(b"\n")
    incomplete = lines.pop() != b""  # text after the last newline: a torn write
    entries = [_parse_entry(raw) for raw in lines]
    chain = _verify_chain(entries)
    if chain is not None:
        return chain, False
    count = len(entries)
    if incomplete:
        problem = f"the line after entry {count} is incomplete (torn write or tampering)"
        return VerifyReport(False, count, count + 1, problem), False
    last = entries[-1] if entries else None
    last_hash: str = last["hash"] if last is not None else GENESIS
    return _verify_head(path, head_key, count, last_hash), True


def _verify_chain(entries: list[dict[str, Any] | None]) -> VerifyReport | None:
    prev = GENESIS
    for index, entry in enumerate(entries):
        expected = index + 1
        if entry is None:
            return VerifyReport(
                False, index, expected, f"line {expected} is not a valid audit entry (edited or corrupted)"
            )
        seq: int = entry["seq"]
        if entry_hash(entry) != entry["hash"]:
            return VerifyReport(
                False, index, seq, f"entry {seq} was changed after it was written (its hash does not match)"
            )
        if seq != expected:
            return VerifyReport(False, index, expected, _seq_problem(entries, index, expected, seq))
        if entry["prev"] != prev:
            problem = (
                f"entry {seq} does not follow entry {seq - 1}: an entry was altered, inserted or removed there"
                if seq > 1
                else "the first entry does not start the chain: entries were removed from the start"
            )
            return VerifyReport(False, index, seq, problem)
        prev = entry["hash"]
    return None


def _seq_problem(entries: list[dict[str, Any] | None], index: int, expected: int, seq: int) -> str:
    if seq < expected:
        return f"entry {seq} appears again where entry {expected} should be (inserted, duplicated or reordered)"
    if any(e is not None and e["seq"] == expected for e in entries[index + 1 :]):
        return f"entries are out of order: entry {seq} is where entry {expected} should be (reordered)"
    if expected == seq - 1:
        return f"entry {expected} is missing (removed)"
    return f"entries {expected} to {seq - 1} are missing (removed)"


def _verify_head(path: str | os.PathLike[str], head_key: bytes, count: int, last_hash: str) -> VerifyReport:
    try:
        head = json.loads(head_path(path).read_bytes())
    except FileNotFoundError:
        if count == 0:
            return VerifyReport(True, 0)
        return VerifyReport(
            False, count, None, "the signed head is missing, so removal of entries from the end cannot be ruled out"
        )
    except ValueError:
        return VerifyReport(False, count, None, "the signed head is unreadable")
    try:
        seq, signed_hash, mac = int(head["seq"]), str(head["hash"]), str(head["mac"])
    except (KeyError, TypeError, ValueError):
        return VerifyReport(False, count, None, "the signed head is unreadable")
    if not hmac.compare_digest(_head_mac(head_key, seq, signed_hash), mac):
        return VerifyReport(
            False,
            count,
            None,
            "the signed head does not verify with the server key: the log was rewritten, or the key is wrong",
        )
    if seq > count:
        return VerifyReport(
            False,
            count,
            count + 1,
            f"the log ends at entry {count} but the signed head records {seq}: entries were removed from the end",
        )
    if seq < count:
        return VerifyReport(
            False,
            count,
            seq + 1,
            f"entries after {seq} are not covered by the signed head"
            " (added by someone else, or written just before a crash)",
        )
    if not hmac.compare_digest(signed_hash, last_hash):
        return VerifyReport(False, count, count, f"entry {count} differs from the signed head: the log was rewritten")
    return VerifyReport(True, count)


# ----- writing -------------------------------------------------------------------------------


class AuditLog:
    """Appends audit entries to ``path``; safe for concurrent appends (asyncio lock + file lock)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        key: bytes,
        *,
        durable: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._path = Path(path)
        self._head_path = head_path(path)
        self._head_key = _head_key(key)
        self._durable = durable
        self._clock = clock
        self._lock = asyncio.Lock()
        self._path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._fd = os.open(self._path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        self._seq = 0
        self._last_hash = GENESIS
        self._size = -1
        self.open_report = self._open_check()

    @property
    def path(self) -> Path:
        return self._path

    def close(self) -> None:
        os.close(self._fd)

    async def append(
        self,
        event: AuditEvent | str,
        actor: str | None = None,
        session: str | None = None,
        outcome: AuditOutcome | str = AuditOutcome.OK,
    ) -> int:
        """Record one event and return its seq; refuses anything but fixed words and opaque ids."""
        ev = _check_word(event, _EVENTS, "event")
        out = _check_word(outcome, _OUTCOMES, "outcome")
        _check_id(actor, "actor")
        _check_id(session, "session")
        async with self._lock:
            return await asyncio.to_thread(self._append_locked, ev, actor, session, out)

    async def verify(self) -> VerifyReport:
        """Verify this log (see the module-level ``verify``)."""
        async with self._lock:
            report, _ = await asyncio.to_thread(_verify_file, self._path, self._head_key)
            return report

    # The methods below do blocking file I/O; they run in a worker thread or at start-up.

    def _open_check(self) -> VerifyReport:
        """Drop a torn last line, resync with the file, and record any mismatch with the head."""
        with _FileLock(self._fd):
            removed_torn_line = self._drop_torn_line()
            self._resync()
            report, chain_ok = _verify_file(self._path, self._head_key)
            warning = AuditEvent.AUDIT_INTEGRITY_WARNING
            if removed_torn_line:
                self._write_entry(warning, None, None, AuditOutcome.INCOMPLETE_ENTRY_REMOVED)
            if not report.ok:
                self._write_entry(
                    warning, None, None, AuditOutcome.HEAD_MISMATCH if chain_ok else AuditOutcome.CHAIN_BROKEN
                )
        return report

    def _append_locked(self, event: str, actor: str | None, session: str | None, outcome: str) -> int:
        with _FileLock(self._fd):
            if os.fstat(self._fd).st_size != self._size:
                self._resync()  # another process appended since our last write
            return self._write_entry(event, actor, session, outcome)

    def _write_entry(self, event: str, actor: str | None, session: str | None, outcome: str) -> int:
        entry: dict[str, Any] = {
            "seq": self._seq + 1,
            "time": _format_time(self._clock()),
            "event": str(event),
            "actor": actor,
            "session": session,
            "outcome": str(outcome),
            "prev": self._last_hash,
        }
        entry["hash"] = entry_hash(entry)
        line = _canonical(entry) + b"\n"
        try:
            _write_all(self._fd, line)
            if self._durable:
                os.fsync(self._fd)
        except OSError:
            os.ftruncate(self._fd, self._size)  # never leave half an entry behind
            raise
        self._seq, self._last_hash = entry["seq"], entry["hash"]
        self._size += len(line)
        self._write_head()
        return self._seq

    def _write_head(self) -> None:
        head = {"seq": self._seq, "hash": self._last_hash, "mac": _head_mac(self._head_key, self._seq, self._last_hash)}
        tmp = self._head_path.with_name(self._head_path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, _canonical(head) + b"\n")
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

    def _resync(self) -> None:
        """Continue the chain from the last entry actually in the file."""
        size = os.fstat(self._fd).st_size
        self._size = size
        self._seq, self._last_hash = 0, GENESIS
        if size == 0:
            return
        tail = os.pread(self._fd, min(size, _TAIL_CHUNK), max(0, size - _TAIL_CHUNK))
        for raw in reversed(tail.rstrip(b"\n").split(b"\n")):
            entry = _parse_entry(raw)
            if entry is not None:
                self._seq, self._last_hash = entry["seq"], entry["hash"]
                return


class _FileLock:
    """Exclusive advisory lock so broker processes sharing a data dir do not interleave entries."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def __enter__(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)


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
