"""Checking an audit log: the chain across all its files, the signed head, anchors, and warnings.

What each check proves, and what it cannot (docs/security.md, section 3.7):

- The **chain** (every entry carries the hash of the one before) shows an entry was edited,
  inserted, removed or reordered, and that a rotated file is missing or out of place, unless the
  whole chain from that point on was recomputed, which needs no key at all.
- The **signed head** (an HMAC of the last entry under the audit key) shows the end was cut off
  or the chain recomputed, unless whoever did it also holds the audit key. By default that key is
  derived from the server secret in the data directory, so holding the directory is enough; with
  a separate audit key (``audit_key_file``) it is not.
- An **anchor** (``broker audit anchor``: the last entry's number, time and hash, kept off the
  machine) shows the log still holds that very entry at that place, so nothing up to it was cut,
  edited or recomputed, even by someone holding every key.
- An **integrity warning** entry says a broker found the log cut, torn or unsigned when it opened
  it, and then signed its new end; verify keeps failing until the admin acknowledges it.
"""

from __future__ import annotations

import fcntl
import hmac
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from broker.audit.format import (
    GENESIS,
    AuditEvent,
    AuditOutcome,
    entry_hash,
    head_key,
    head_mac,
    head_path,
    lock_current,
    parse_entry,
    rotated_numbers,
    rotated_path,
)

_CHUNK = 1024 * 1024
_TAIL_CHUNK = 64 * 1024
_ANCHOR = re.compile(r"anchor1/([1-9][0-9]{0,11})/(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z)/([0-9a-f]{64})")


class Problem(StrEnum):
    """What kind of problem a report found (the first one decides ``VerifyReport.kind``)."""

    NO_LOG = "no_log"
    INCOMPLETE = "incomplete"
    CHAIN = "chain"
    HEAD_MISSING = "head_missing"
    HEAD_UNVERIFIED = "head_unverified"
    HEAD_MISMATCH = "head_mismatch"
    ANCHOR = "anchor"
    UNACKNOWLEDGED = "unacknowledged_warning"


#: What a broker writes when it opens a log with each head problem.
WARNING_FOR = {
    Problem.CHAIN: AuditOutcome.CHAIN_BROKEN,
    Problem.HEAD_MISSING: AuditOutcome.HEAD_MISSING,
    Problem.HEAD_UNVERIFIED: AuditOutcome.HEAD_UNVERIFIED,
    Problem.HEAD_MISMATCH: AuditOutcome.HEAD_MISMATCH,
}

WARNING_MEANING = {
    AuditOutcome.HEAD_MISMATCH.value: "the log's end did not match its signed head: entries were cut off the end "
    "(or added without the key), or a broker crashed between writing an entry and signing it",
    AuditOutcome.HEAD_MISSING.value: "the log had entries but its signed head was missing",
    AuditOutcome.HEAD_UNVERIFIED.value: "the signed head did not verify with the audit key: the log was rewritten, "
    "or the audit key was changed",
    AuditOutcome.CHAIN_BROKEN.value: "the chain was broken",
    AuditOutcome.INCOMPLETE_ENTRY_REMOVED.value: "the last line was incomplete and was removed (a write cut short "
    "by a crash, or tampering)",
}


@dataclass(frozen=True)
class Anchor:
    """One entry of the chain, written down elsewhere: ``anchor1/<seq>/<time>/<hash>``."""

    seq: int
    time: str
    hash: str

    def __str__(self) -> str:
        return f"anchor1/{self.seq}/{self.time}/{self.hash}"

    @classmethod
    def parse(cls, text: str) -> Anchor:
        match = _ANCHOR.fullmatch(text.strip())
        if not match:
            raise ValueError(
                f"{text.strip()[:100]!r} is not an anchor: expected anchor1/<entry>/<time>/<64 hex digits>, "
                "as printed by 'broker audit anchor'"
            )
        return cls(int(match.group(1)), match.group(2), match.group(3))


@dataclass(frozen=True)
class IntegrityWarning:
    """An ``audit_integrity_warning`` entry, and the entry that acknowledged it (if any)."""

    seq: int
    time: str
    outcome: str
    acknowledged_at: int | None = None

    @property
    def meaning(self) -> str:
        return WARNING_MEANING.get(self.outcome, self.outcome)


@dataclass(frozen=True)
class VerifyReport:
    """Result of checking a log: ``problem`` says in plain words what is wrong, if anything."""

    ok: bool
    entries: int
    first_bad_seq: int | None = None
    problem: str | None = None
    kind: Problem | None = None
    #: Every problem found after the chain itself checked out (head, anchors, warnings), in that order.
    problems: tuple[str, ...] = ()
    warnings: tuple[IntegrityWarning, ...] = ()
    files: int = 0
    first_time: str | None = None
    #: The last entry, as ``broker audit anchor`` prints it; None for an empty log.
    last: Anchor | None = None
    anchors_checked: int = 0

    @property
    def unacknowledged(self) -> tuple[IntegrityWarning, ...]:
        return tuple(w for w in self.warnings if w.acknowledged_at is None)


@dataclass
class _Found:
    """A problem and where: ``first_bad_seq`` as the report gives it."""

    kind: Problem
    text: str
    first_bad_seq: int | None = None


# ----- reading -------------------------------------------------------------------------------


def lines_of(fd: int, size: int) -> Iterator[tuple[bytes, bool]]:
    """The lines of the first ``size`` bytes of ``fd``: (line without newline, whether it ended)."""
    offset, pending = 0, b""
    while offset < size:
        chunk = os.pread(fd, min(_CHUNK, size - offset), offset)
        if not chunk:
            break
        offset += len(chunk)
        *complete, pending = (pending + chunk).split(b"\n")
        for line in complete:
            yield line, True
    if pending:
        yield pending, False


def last_entry(fd: int, size: int) -> dict[str, Any] | None:
    """The last well-formed entry in the file's tail, or None."""
    if size <= 0:
        return None
    tail = os.pread(fd, min(size, _TAIL_CHUNK), max(0, size - _TAIL_CHUNK))
    for raw in reversed(tail.rstrip(b"\n").split(b"\n")):
        entry = parse_entry(raw)
        if entry is not None:
            return entry
    return None


@dataclass
class _Snapshot:
    """Every file of a log as it stood at one instant, read later through open descriptors."""

    files: list[tuple[str, int, int]] = field(default_factory=list)  # name, fd, size
    missing: list[str] = field(default_factory=list)
    head: bytes | None = None

    def close(self) -> None:
        for _, fd, _ in self.files:
            os.close(fd)
        self.files.clear()


def _snapshot(path: Path) -> _Snapshot:
    """Opened under a shared lock on the current file, so no append or rotation is half done."""
    snap = _Snapshot()
    current = lock_current(path, None, exclusive=False)
    try:
        numbers = rotated_numbers(path)
        expected = set(range(1, (numbers[-1] if numbers else 0) + 1))
        snap.missing = [rotated_path(path, n).name for n in sorted(expected - set(numbers))]
        for n in numbers:
            fd = os.open(rotated_path(path, n), os.O_RDONLY)
            snap.files.append((rotated_path(path, n).name, fd, os.fstat(fd).st_size))
        if current is not None:
            fd = os.dup(current)
            snap.files.append((path.name, fd, os.fstat(fd).st_size))
        try:
            snap.head = head_path(path).read_bytes()
        except FileNotFoundError:
            snap.head = None
    except BaseException:
        snap.close()
        raise
    finally:
        if current is not None:
            fcntl.flock(current, fcntl.LOCK_UN)  # the copy shares the lock: release it explicitly
            os.close(current)
    return snap


def verify(
    path: str | os.PathLike[str],
    key: bytes,
    *,
    anchors: Sequence[Anchor] = (),
    require_acknowledged: bool = True,
) -> VerifyReport:
    """Check every file of the log, the signed head, the anchors given, and integrity warnings.

    An integrity warning nobody acknowledged makes the report fail unless
    ``require_acknowledged`` is off (as when a broker opens the log).
    """
    p = Path(path)
    snap = _snapshot(p)
    try:
        files = [(name, lines_of(fd, size)) for name, fd, size in snap.files]
        return check(
            files,
            snap.head,
            head_key(key),
            anchors=anchors,
            require_acknowledged=require_acknowledged,
            missing_files=snap.missing,
        )
    finally:
        snap.close()


# ----- checking ------------------------------------------------------------------------------


def compare_head(head: bytes | None, key: bytes, count: int, last_hash: str) -> _Found | None:
    """The problem with a signed head (``key`` is the head key), or None when it matches."""
    if head is None:
        if count == 0:
            return _Found(
                Problem.NO_LOG,
                "the log is empty and has no signed head: a broker signs the head of every log it creates, "
                "so either no broker has used this data directory yet, or the log and its head were removed",
                1,
            )
        return _Found(
            Problem.HEAD_MISSING, "the signed head is missing, so removal of entries from the end cannot be ruled out"
        )
    try:
        parsed = json.loads(head)
        seq, signed_hash, mac = parsed["seq"], parsed["hash"], parsed["mac"]
        if type(seq) is not int or seq < 0 or not isinstance(signed_hash, str) or not isinstance(mac, str):
            raise ValueError("bad field")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return _Found(Problem.HEAD_UNVERIFIED, "the signed head is unreadable")
    if not hmac.compare_digest(head_mac(key, seq, signed_hash), mac):
        return _Found(
            Problem.HEAD_UNVERIFIED,
            "the signed head does not verify with the audit key (the server key's, unless a separate audit key "
            "is set): the log was rewritten, or the key is wrong",
        )
    if seq > count:
        return _Found(
            Problem.HEAD_MISMATCH,
            f"the log ends at entry {count} but the signed head records {seq}: entries were removed from the end",
            count + 1,
        )
    if seq < count:
        return _Found(
            Problem.HEAD_MISMATCH,
            f"entries after {seq} are not covered by the signed head"
            " (added by someone else, or written just before a crash)",
            seq + 1,
        )
    if not hmac.compare_digest(signed_hash, last_hash):
        return _Found(
            Problem.HEAD_MISMATCH, f"entry {count} differs from the signed head: the log was rewritten", count
        )
    return None


def check(
    files: Sequence[tuple[str, Iterable[tuple[bytes, bool]]]],
    head: bytes | None,
    key: bytes,
    *,
    start: tuple[int, str] = (0, GENESIS),
    anchors: Sequence[Anchor] = (),
    require_acknowledged: bool = True,
    missing_files: Sequence[str] = (),
) -> VerifyReport:
    """Check ``files`` (name and lines, oldest first) as one chain continuing from ``start``
    (the seq and hash of the entry before the first line); ``key`` is the head key."""
    count, prev = start
    several = len(files) > 1 or start[0] > 0
    if missing_files:
        missing = _Found(
            Problem.CHAIN,
            f"{', '.join(missing_files)} {'is' if len(missing_files) == 1 else 'are'} missing: "
            "a rotated file of the log was removed or renamed",
            None,
        )
        return _report(missing, count, files=len(files))
    by_seq: dict[int, list[Anchor]] = {}
    for anchor in anchors:
        by_seq.setdefault(anchor.seq, []).append(anchor)
    anchor_problem: _Found | None = None
    warnings: list[tuple[int, str, str]] = []
    acknowledgements: list[int] = []
    first_time: str | None = None
    last_time: str | None = None
    stream = _flatten(files)
    for name, line_no, raw, complete, in_last_file in stream:
        expected = count + 1
        where = f" [{name}, line {line_no}]" if several else ""
        if not complete:
            if in_last_file:
                text = f"the line after entry {count} is incomplete (torn write or tampering)"
                return _report(_Found(Problem.INCOMPLETE, text + where, expected), count, files=len(files))
            text = f"{name} ends in the middle of an entry (the file was cut or edited)"
            return _report(_Found(Problem.CHAIN, text, expected), count, files=len(files))
        entry = parse_entry(raw)
        if entry is None:
            text = f"line {expected} is not a valid audit entry (edited or corrupted)"
            return _report(_Found(Problem.CHAIN, text + where, expected), count, files=len(files))
        seq: int = entry["seq"]
        if entry_hash(entry) != entry["hash"]:
            text = f"entry {seq} was changed after it was written (its hash does not match)"
            return _report(_Found(Problem.CHAIN, text + where, seq), count, files=len(files))
        if seq != expected:
            text = _seq_problem(expected, seq, stream)
            return _report(_Found(Problem.CHAIN, text + where, expected), count, files=len(files))
        if entry["prev"] != prev:
            text = (
                f"entry {seq} does not follow entry {seq - 1}: an entry was altered, inserted or removed there"
                if seq > 1
                else "the first entry does not start the chain: entries were removed from the start"
            )
            return _report(_Found(Problem.CHAIN, text + where, seq), count, files=len(files))
        for anchor in by_seq.get(seq, ()):
            if anchor_problem is None and (anchor.hash != entry["hash"] or anchor.time != entry["time"]):
                anchor_problem = _Found(
                    Problem.ANCHOR,
                    f"entry {seq} is not the one anchored at {anchor.time}: the log up to it was rewritten "
                    "(by someone holding the audit key, or with the log replaced)",
                    seq,
                )
        if entry["event"] == AuditEvent.AUDIT_INTEGRITY_WARNING:
            warnings.append((seq, entry["time"], entry["outcome"]))
        elif entry["event"] == AuditEvent.AUDIT_WARNINGS_ACKNOWLEDGED:
            acknowledgements.append(seq)
        first_time = first_time or entry["time"]
        last_time = entry["time"]
        count, prev = seq, entry["hash"]
    for anchor in anchors:
        if anchor.seq > count and anchor_problem is None:
            anchor_problem = _Found(
                Problem.ANCHOR,
                f"the log ends at entry {count}, before the anchored entry {anchor.seq} ({anchor.time}): "
                "entries were removed",
                count + 1,
            )
    found_warnings = tuple(
        IntegrityWarning(seq, when, outcome, next((a for a in acknowledgements if a > seq), None))
        for seq, when, outcome in warnings
    )
    found: list[_Found] = []
    head_problem = compare_head(head, key, count, prev)
    if head_problem is not None:
        found.append(head_problem)
    if anchor_problem is not None:
        found.append(anchor_problem)
    unacknowledged = [w for w in found_warnings if w.acknowledged_at is None]
    if require_acknowledged and unacknowledged:
        first = unacknowledged[0]
        more = f" (and {len(unacknowledged) - 1} more)" if len(unacknowledged) > 1 else ""
        found.append(
            _Found(
                Problem.UNACKNOWLEDGED,
                f"entry {first.seq} records an integrity warning{more}: when a broker opened the log at "
                f"{first.time}, {first.meaning}. Compare with a backup or an anchor; once explained, record "
                f"that with 'broker audit acknowledge --through {unacknowledged[-1].seq}'",
                first.seq,
            )
        )
    last = Anchor(count, last_time, prev) if count > start[0] and last_time is not None else None
    first_found = found[0] if found else None
    return VerifyReport(
        ok=not found,
        entries=count,
        first_bad_seq=first_found.first_bad_seq if first_found else None,
        problem=first_found.text if first_found else None,
        kind=first_found.kind if first_found else None,
        problems=tuple(f.text for f in found),
        warnings=found_warnings,
        files=len(files),
        first_time=first_time,
        last=last,
        anchors_checked=len(anchors),
    )


def _report(found: _Found, count: int, *, files: int) -> VerifyReport:
    return VerifyReport(False, count, found.first_bad_seq, found.text, found.kind, (found.text,), files=files)


def _flatten(
    files: Sequence[tuple[str, Iterable[tuple[bytes, bool]]]],
) -> Iterator[tuple[str, int, bytes, bool, bool]]:
    for index, (name, lines) in enumerate(files):
        for line_no, (raw, complete) in enumerate(lines, start=1):
            yield name, line_no, raw, complete, index == len(files) - 1


def _seq_problem(expected: int, seq: int, rest: Iterator[tuple[str, int, bytes, bool, bool]]) -> str:
    if seq < expected:
        return f"entry {seq} appears again where entry {expected} should be (inserted, duplicated or reordered)"
    for _, _, raw, _, _ in rest:
        entry = parse_entry(raw)
        if entry is not None and entry["seq"] == expected:
            return f"entries are out of order: entry {seq} is where entry {expected} should be (reordered)"
    if expected == seq - 1:
        return f"entry {expected} is missing (removed)"
    return f"entries {expected} to {seq - 1} are missing (removed)"


__all__ = [
    "Anchor",
    "IntegrityWarning",
    "Problem",
    "VerifyReport",
    "check",
    "compare_head",
    "last_entry",
    "lines_of",
    "verify",
]
