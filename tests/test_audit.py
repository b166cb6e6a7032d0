"""Audit log: entry format, content-free fields, concurrency and every kind of tampering."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from broker.audit import (
    GENESIS,
    AuditEvent,
    AuditFieldRejected,
    AuditLog,
    AuditOutcome,
    head_path,
    verify,
)

KEY = b"server-secret-for-audit-tests-32"
ACTOR = "Tq3v9mZkRwJpHxBn"
SESSION = "s3ss10n-Opaque_Id-0001"


def canonical(entry: dict[str, Any]) -> bytes:
    """The spec, written out independently: sorted keys, no spaces, ASCII, without ``hash``."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def rehash(entry: dict[str, Any]) -> dict[str, Any]:
    entry = dict(entry)
    entry["hash"] = hashlib.sha256(canonical(entry)).hexdigest()
    return entry


def read_entries(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_entries(path: Path, entries: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(e, sort_keys=True, separators=(",", ":")) + "\n" for e in entries))


def relink(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What an attacker without the key can do: renumber and recompute the whole chain."""
    out, prev = [], GENESIS
    for seq, e in enumerate(entries, start=1):
        fixed = rehash({**e, "seq": seq, "prev": prev})
        out.append(fixed)
        prev = fixed["hash"]
    return out


@pytest.fixture
async def log_path(tmp_path: Path) -> AsyncIterator[Path]:
    path = tmp_path / "data" / "audit.jsonl"
    log = AuditLog(path, KEY)
    events = [
        AuditEvent.ACCOUNT_ADDED,
        AuditEvent.LOGIN_FAILURE,
        AuditEvent.LOGIN_SUCCESS,
        AuditEvent.SESSION_CREATED,
        AuditEvent.SEAT_ADMITTED,
        AuditEvent.CHECKLIST_PASSED,
        AuditEvent.SESSION_ENDED,
    ]
    for event in events:
        outcome = AuditOutcome.FAILED if event is AuditEvent.LOGIN_FAILURE else AuditOutcome.OK
        await log.append(
            event,
            actor=ACTOR,
            session=SESSION if event.value.startswith(("session", "seat", "check")) else None,
            outcome=outcome,
        )
    log.close()
    assert verify(path, KEY).ok
    yield path


async def test_entry_format_and_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    times = iter([1_800_000_000.9, 1_800_000_061.2])
    log = AuditLog(path, KEY, clock=lambda: next(times))
    assert await log.append(AuditEvent.LOGIN_SUCCESS, actor=ACTOR) == 1
    assert await log.append("session_created", actor=ACTOR, session=SESSION) == 2
    log.close()
    first, second = read_entries(path)
    assert set(first) == {"seq", "time", "event", "actor", "session", "outcome", "prev", "hash"}
    assert first["seq"] == 1 and first["prev"] == "0" * 64 == GENESIS
    assert first["time"] == "2027-01-15T08:00:00Z"
    assert (first["event"], first["actor"], first["session"], first["outcome"]) == ("login_success", ACTOR, None, "ok")
    assert first["hash"] == hashlib.sha256(canonical(first)).hexdigest()
    assert second["seq"] == 2 and second["prev"] == first["hash"]
    assert second["time"] == "2027-01-15T08:01:01Z"
    report = verify(path, KEY)
    assert report.ok and report.entries == 2 and report.first_bad_seq is None and report.problem is None


async def test_head_is_hmac_of_last_entry(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, KEY)
    await log.append(AuditEvent.LOGIN_SUCCESS, actor=ACTOR)
    log.close()
    head = json.loads(head_path(path).read_text())
    assert head["seq"] == 1 and head["hash"] == read_entries(path)[0]["hash"]
    assert len(head["mac"]) == 64 and head["mac"] != head["hash"]


async def test_files_are_private(log_path: Path) -> None:
    assert stat.S_IMODE(os.stat(log_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(head_path(log_path)).st_mode) == 0o600


async def test_empty_log_verifies(tmp_path: Path) -> None:
    assert verify(tmp_path / "missing.jsonl", KEY).ok
    log = AuditLog(tmp_path / "audit.jsonl", KEY)
    assert log.open_report.ok and (await log.verify()).entries == 0
    log.close()


@pytest.mark.parametrize(
    "field, value",
    [
        ("event", "user typed something"),
        ("event", "login"),
        ("actor", "Jane Doe"),
        ("actor", "jane.doe@example.org"),
        ("actor", "192.168.10.20"),
        ("actor", "2001:db8::1"),
        ("actor", "short"),
        ("session", "Session with Mr Smith"),
        ("session", "x" * 65),
        ("outcome", "client said she feels unsafe"),
        ("outcome", "jane_doe"),
    ],
)
async def test_free_text_is_refused(tmp_path: Path, field: str, value: str) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, KEY)
    kwargs: dict[str, Any] = {"event": AuditEvent.LOGIN_SUCCESS, "actor": ACTOR, "session": None, "outcome": "ok"}
    kwargs[field] = value
    with pytest.raises(AuditFieldRejected):
        await log.append(**kwargs)
    log.close()
    assert path.read_bytes() == b""


async def test_concurrent_appends_keep_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, KEY, durable=False)
    seqs = await asyncio.gather(*(log.append(AuditEvent.SEAT_ADMITTED, session=SESSION) for _ in range(60)))
    assert sorted(seqs) == list(range(1, 61))
    report = await log.verify()
    log.close()
    assert report.ok and report.entries == 60


async def test_two_writers_on_one_file_stay_chained(tmp_path: Path) -> None:
    # As two broker processes sharing a data directory would.
    path = tmp_path / "audit.jsonl"
    a, b = AuditLog(path, KEY), AuditLog(path, KEY)
    for _ in range(5):
        await a.append(AuditEvent.LOGIN_SUCCESS, actor=ACTOR)
        await b.append(AuditEvent.LOGOUT, actor=ACTOR)
    a.close()
    b.close()
    report = verify(path, KEY)
    assert report.ok and report.entries == 10


async def test_edited_entry_is_detected(log_path: Path) -> None:
    entries = read_entries(log_path)
    entries[1]["outcome"] = "ok"  # hide a failed login
    write_entries(log_path, entries)
    report = verify(log_path, KEY)
    assert not report.ok and report.first_bad_seq == 2 and "changed" in str(report.problem)


async def test_edited_and_rehashed_entry_is_detected(log_path: Path) -> None:
    entries = read_entries(log_path)
    entries[1] = rehash({**entries[1], "outcome": "ok"})
    write_entries(log_path, entries)
    report = verify(log_path, KEY)
    assert not report.ok and report.first_bad_seq == 3 and "does not follow entry 2" in str(report.problem)


async def test_inserted_entry_is_detected(log_path: Path) -> None:
    entries = read_entries(log_path)
    forged = rehash({**entries[2], "event": "login_success", "seq": 4, "prev": entries[2]["hash"]})
    later = [rehash({**e, "seq": e["seq"] + 1}) for e in entries[3:]]
    write_entries(log_path, [*entries[:3], forged, *later])
    report = verify(log_path, KEY)
    assert not report.ok and report.first_bad_seq == 5


async def test_inserted_entry_without_renumbering_is_detected(log_path: Path) -> None:
    entries = read_entries(log_path)
    write_entries(log_path, [*entries[:3], entries[1], *entries[3:]])
    report = verify(log_path, KEY)
    assert not report.ok and report.first_bad_seq == 4 and "appears again" in str(report.problem)


async def test_removed_middle_entry_is_detected(log_path: Path) -> None:
    entries = read_entries(log_path)
    write_entries(log_path, entries[:1] + entries[2:])
    report = verify(log_path, KEY)
    assert not report.ok and report.first_bad_seq == 2 and "entry 2 is missing" in str(report.problem)


async def test_removed_and_renumbered_entry_is_detected(log_path: Path) -> None:
    entries = read_entries(log_path)
    renumbered = [rehash({**e, "seq": e["seq"] - 1}) for e in entries[2:]]
    write_entries(log_path, entries[:1] + renumbered)
    report = verify(log_path, KEY)
    assert not report.ok and report.first_bad_seq == 2


async def test_reordered_entries_are_detected(log_path: Path) -> None:
    entries = read_entries(log_path)
    entries[2], entries[3] = entries[3], entries[2]
    write_entries(log_path, entries)
    report = verify(log_path, KEY)
    assert not report.ok and report.first_bad_seq == 3 and "out of order" in str(report.problem)


async def test_tail_truncation_is_detected(log_path: Path) -> None:
    entries = read_entries(log_path)
    write_entries(log_path, entries[:-2])
    report = verify(log_path, KEY)
    assert not report.ok and report.entries == 5 and report.first_bad_seq == 6
    assert "removed from the end" in str(report.problem)


async def test_truncation_to_empty_is_detected(log_path: Path) -> None:
    log_path.write_bytes(b"")
    report = verify(log_path, KEY)
    assert not report.ok and report.first_bad_seq == 1


async def test_full_rewrite_is_detected(log_path: Path) -> None:
    entries = read_entries(log_path)
    rewritten = relink([e for e in entries if e["event"] != "login_failure"])
    write_entries(log_path, rewritten)
    assert not verify(log_path, KEY).ok  # head no longer matches
    # Forging the head too needs the server key.
    last = rewritten[-1]
    wrong_key = hashlib.sha256(b"guessed key").digest()
    mac = hmac.new(wrong_key, f"audit-head|{last['seq']}|{last['hash']}".encode(), hashlib.sha256).hexdigest()
    head_path(log_path).write_text(json.dumps({"seq": last["seq"], "hash": last["hash"], "mac": mac}))
    report = verify(log_path, KEY)
    assert not report.ok and "server key" in str(report.problem)


async def test_same_length_rewrite_is_detected(log_path: Path) -> None:
    entries = read_entries(log_path)
    rewritten = relink([{**e, "actor": None} for e in entries])
    write_entries(log_path, rewritten)
    report = verify(log_path, KEY)
    assert not report.ok and report.first_bad_seq == len(entries) and "rewritten" in str(report.problem)


async def test_appended_forgery_is_detected(log_path: Path) -> None:
    entries = read_entries(log_path)
    extra = rehash({**entries[-1], "seq": len(entries) + 1, "prev": entries[-1]["hash"], "event": "account_added"})
    write_entries(log_path, [*entries, extra])
    report = verify(log_path, KEY)
    assert not report.ok and report.first_bad_seq == len(entries) + 1


async def test_missing_head_is_detected(log_path: Path) -> None:
    head_path(log_path).unlink()
    report = verify(log_path, KEY)
    assert not report.ok and "head is missing" in str(report.problem)


async def test_wrong_key_fails(log_path: Path) -> None:
    assert not verify(log_path, b"another server key, 32 bytes ...").ok


async def test_garbled_line_is_detected(log_path: Path) -> None:
    lines = log_path.read_bytes().split(b"\n")
    lines[3] = b'{"note":"someone wrote here"}'
    log_path.write_bytes(b"\n".join(lines))
    report = verify(log_path, KEY)
    assert not report.ok and report.first_bad_seq == 4 and "not a valid audit entry" in str(report.problem)


async def test_reopening_after_truncation_records_a_warning(log_path: Path) -> None:
    entries = read_entries(log_path)
    write_entries(log_path, entries[:-1])
    log = AuditLog(log_path, KEY)
    assert not log.open_report.ok
    await log.append(AuditEvent.LOGIN_SUCCESS, actor=ACTOR)
    log.close()
    after = read_entries(log_path)
    warning = after[len(entries) - 1]
    assert (warning["event"], warning["outcome"]) == ("audit_integrity_warning", "head_mismatch")
    assert after[-1]["seq"] == len(entries) + 1
    assert verify(log_path, KEY).ok  # chain intact again, the gap is on record


async def test_reopening_after_a_torn_write_drops_it_and_says_so(log_path: Path) -> None:
    entries = read_entries(log_path)
    with open(log_path, "ab") as f:
        f.write(b'{"actor":null,"event":"logi')
    assert "incomplete" in str(verify(log_path, KEY).problem)
    log = AuditLog(log_path, KEY)
    assert log.open_report.ok
    log.close()
    after = read_entries(log_path)
    assert len(after) == len(entries) + 1
    assert (after[-1]["event"], after[-1]["outcome"]) == ("audit_integrity_warning", "incomplete_entry_removed")
    assert verify(log_path, KEY).ok


async def test_reopening_continues_the_chain(log_path: Path) -> None:
    count = len(read_entries(log_path))
    log = AuditLog(log_path, KEY)
    assert log.open_report.ok
    assert await log.append(AuditEvent.LOGOUT, actor=ACTOR) == count + 1
    log.close()
    assert verify(log_path, KEY).ok


async def test_every_event_type_can_be_written(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl", KEY, durable=False)
    for event in AuditEvent:
        await log.append(event)
    report = await log.verify()
    log.close()
    assert report.ok and report.entries == len(AuditEvent)
    required = {
        "login_success",
        "login_failure",
        "second_factor_changed",
        "account_added",
        "account_disabled",
        "password_reset",
        "session_created",
        "seat_admitted",
        "seat_declined",
        "seat_removed",
        "session_ended",
        "checklist_passed",
        "checklist_failed",
        "interception_warning",
    }
    assert required <= {e.value for e in AuditEvent}
