"""The audit log's format: fixed words, opaque ids, one canonical JSON line per entry.

Shared by the writer (``broker.audit.log``) and the verifier (``broker.audit.verify``) so that both
read exactly the same thing. The files of one log are ``<log>.1``, ``<log>.2``, ... (rotated,
oldest first, never written again) followed by ``<log>`` itself (the one being appended to); the
signed chain head is ``<log>.head``.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import re
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

GENESIS = "0" * 64
FIELDS = frozenset({"seq", "time", "event", "actor", "session", "outcome", "prev", "hash"})
#: An aggregate entry stands for ``count`` more events of its kind between ``since`` and ``time``.
AGGREGATE_FIELDS = frozenset({"count", "since"})
# Opaque ids are random tokens (url-safe base64 or hex); dots, colons, @ and spaces never pass.
OPAQUE_ID = re.compile(r"[A-Za-z0-9_-]{16,64}")
TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
HEX64 = re.compile(r"[0-9a-f]{64}")
_ROTATED = re.compile(r"\.([1-9][0-9]{0,8})")
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
    #: The therapist put a client on hold (private time) or brought them back; ``actor`` names the held seat.
    SEAT_HELD = "seat_held"
    SEAT_RELEASED = "seat_released"
    #: A client left on purpose (a leave, the quick exit included: the broker cannot tell them apart).
    SEAT_LEFT = "seat_left"
    #: A client's link opened on another device than the one holding its seat (issue 25, finding 1).
    OTHER_DEVICE_JOINED = "other_device_joined"
    OTHER_DEVICE_ADMITTED = "other_device_admitted"
    OTHER_DEVICE_DECLINED = "other_device_declined"
    SESSION_ENDED = "session_ended"
    CHECKLIST_PASSED = "checklist_passed"
    CHECKLIST_FAILED = "checklist_failed"
    INTERCEPTION_WARNING = "interception_warning"
    AUDIT_INTEGRITY_WARNING = "audit_integrity_warning"
    #: The practice admin looked into every integrity warning before this entry (``broker audit acknowledge``).
    AUDIT_WARNINGS_ACKNOWLEDGED = "audit_warnings_acknowledged"


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
    HEAD_MISSING = "head_missing"
    HEAD_UNVERIFIED = "head_unverified"
    INCOMPLETE_ENTRY_REMOVED = "incomplete_entry_removed"


#: Events that people without an account (or with only an invite link) can cause as often as they
#: like: the log writes a few of each per window and counts the rest into one aggregate entry.
FLOODABLE_EVENTS = frozenset(
    {
        AuditEvent.LOGIN_FAILURE.value,
        AuditEvent.LOGIN_LOCKED.value,
        AuditEvent.INTERCEPTION_WARNING.value,
        AuditEvent.CHECKLIST_FAILED.value,
        AuditEvent.OTHER_DEVICE_JOINED.value,  # anyone holding a client's link can cause it
        AuditEvent.SEAT_LEFT.value,  # a page holding a seat can leave and come back as often as it likes
    }
)

EVENTS = frozenset(e.value for e in AuditEvent)
OUTCOMES = frozenset(o.value for o in AuditOutcome)


class AuditFieldRejected(ValueError):
    """A value that is not one of the fixed words or not an opaque id."""


# ----- files ---------------------------------------------------------------------------------


def head_path(path: str | os.PathLike[str]) -> Path:
    """Where the signed chain head of ``path`` is kept."""
    p = Path(path)
    return p.with_name(p.name + ".head")


def rotated_path(path: str | os.PathLike[str], number: int) -> Path:
    """The ``number``-th file rotated out of ``path`` (1 is the oldest)."""
    p = Path(path)
    return p.with_name(f"{p.name}.{number}")


def rotated_numbers(path: str | os.PathLike[str]) -> list[int]:
    """The numbers of the files rotated out of ``path`` that exist, in order."""
    p = Path(path)
    numbers = []
    try:
        names = os.listdir(p.parent)
    except FileNotFoundError:
        return []
    for name in names:
        if name.startswith(p.name):
            match = _ROTATED.fullmatch(name[len(p.name) :])
            if match:
                numbers.append(int(match.group(1)))
    return sorted(numbers)


def lock_current(path: Path, fd: int | None, *, exclusive: bool) -> int | None:
    """Lock the file that is at ``path`` now, following a rotation or a replaced file.

    Returns the descriptor that holds the lock: ``fd`` itself, or a new one when ``path`` no longer
    names the file ``fd`` is open on (``fd`` is then closed). An exclusive lock opens (creating)
    the file for appending; a shared lock opens it read-only and returns None when it does not exist.
    """
    flags = (os.O_RDWR | os.O_APPEND | os.O_CREAT) if exclusive else os.O_RDONLY
    while True:
        if fd is None:
            try:
                fd = os.open(path, flags, 0o600)
            except FileNotFoundError:
                if exclusive:
                    raise
                return None
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        mine = os.fstat(fd)
        try:
            named = os.stat(path)
            if (named.st_ino, named.st_dev) == (mine.st_ino, mine.st_dev):
                return fd
        except FileNotFoundError:
            pass
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        fd = None


# ----- keys and the signed head ---------------------------------------------------------------


def head_key(key: bytes) -> bytes:
    """The MAC key of the signed head, bound to this one purpose."""
    if len(key) < _MIN_KEY_BYTES:
        raise ValueError(f"the audit key must be at least {_MIN_KEY_BYTES} bytes")
    hkdf = HKDF(algorithm=SHA256(), length=32, salt=None, info=b"broker/audit/v1/head")
    return hkdf.derive(key)


def head_mac(key: bytes, seq: int, entry_hash: str) -> str:
    return hmac.new(key, f"audit-head|{seq}|{entry_hash}".encode("ascii"), hashlib.sha256).hexdigest()


def head_bytes(key: bytes, seq: int, entry_hash: str) -> bytes:
    """The head file's content for a chain whose last entry is ``seq`` with ``entry_hash``."""
    return canonical({"seq": seq, "hash": entry_hash, "mac": head_mac(key, seq, entry_hash)}) + b"\n"


# ----- entries -------------------------------------------------------------------------------


def canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def entry_hash(entry: dict[str, Any]) -> str:
    """SHA-256 (hex) of the entry's canonical bytes, ``hash`` itself left out."""
    return hashlib.sha256(canonical({k: v for k, v in entry.items() if k != "hash"})).hexdigest()


def check_id(value: str | None, what: str) -> None:
    if value is not None and (not isinstance(value, str) or not OPAQUE_ID.fullmatch(value)):
        raise AuditFieldRejected(f"{what} must be an opaque id (16-64 characters of A-Z a-z 0-9 _ -) or None")


def check_word(value: object, allowed: frozenset[str], what: str) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise AuditFieldRejected(f"{what} must be one of the fixed audit words")
    return str(value)


def format_time(now: float) -> str:
    return datetime.fromtimestamp(int(now), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_entry(raw: bytes) -> dict[str, Any] | None:
    """A well-formed entry, or None if the line is not one (garbled, extra or missing fields)."""
    try:
        entry = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(entry, dict):
        return None
    keys = set(entry)
    if keys != FIELDS and keys != FIELDS | AGGREGATE_FIELDS:
        return None
    try:
        check_id(entry["actor"], "actor")
        check_id(entry["session"], "session")
        check_word(entry["event"], EVENTS, "event")
        check_word(entry["outcome"], OUTCOMES, "outcome")
    except AuditFieldRejected:
        return None
    seq, when, prev, own = entry["seq"], entry["time"], entry["prev"], entry["hash"]
    if type(seq) is not int or seq < 1 or not isinstance(when, str) or not TIME.fullmatch(when):
        return None
    if not isinstance(prev, str) or not HEX64.fullmatch(prev) or not isinstance(own, str) or not HEX64.fullmatch(own):
        return None
    if "count" in entry:
        count, since = entry["count"], entry["since"]
        if type(count) is not int or count < 1 or not isinstance(since, str) or not TIME.fullmatch(since):
            return None
        if since > when:
            return None
    return entry
