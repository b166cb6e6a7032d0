"""Audit log: entry format, content-free fields, concurrency and every kind of tampering."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import os
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from broker.audit.log import (
    GENESIS,
    AcknowledgeRefused,
    Anchor,
    AuditEvent,
    AuditFieldRejected,
    AuditLog,
    AuditOutcome,
    Problem,
    head_path,
    rotated_path,
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


def sign_head(path: Path, last: dict[str, Any], key: bytes = KEY) -> None:
    """What someone holding the audit key can do: sign any chain's end."""
    from broker.audit.format import head_bytes, head_key

    head_path(path).write_bytes(head_bytes(head_key(key), last["seq"], last["hash"]))


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


async def test_a_new_log_signs_its_empty_head_and_verifies(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl", KEY)
    assert log.open_report.ok and (await log.verify()).entries == 0
    log.close()
    head = json.loads(head_path(tmp_path / "audit.jsonl").read_text())
    assert (head["seq"], head["hash"]) == (0, GENESIS)
    assert verify(tmp_path / "audit.jsonl", KEY).ok


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


async def test_cutting_the_tail_then_restarting_fails_verify_until_acknowledged(log_path: Path) -> None:
    # Finding 6 of issue 25: the broker re-signs the head after writing its warning, and verify used to pass.
    entries = read_entries(log_path)
    write_entries(log_path, entries[:-2])
    log = AuditLog(log_path, KEY)
    assert not log.open_report.ok
    await log.append(AuditEvent.LOGIN_SUCCESS, actor=ACTOR)
    after = read_entries(log_path)
    warning = after[len(entries) - 2]
    assert (warning["event"], warning["outcome"]) == ("audit_integrity_warning", "head_mismatch")
    report = verify(log_path, KEY)
    assert not report.ok and report.kind is Problem.UNACKNOWLEDGED and report.first_bad_seq == warning["seq"]
    assert f"acknowledge --through {warning['seq']}" in str(report.problem)
    assert [(w.seq, w.outcome, w.acknowledged_at) for w in report.warnings] == [(warning["seq"], "head_mismatch", None)]
    # The chain itself is whole again: a broker opening it adds no second warning.
    assert verify(log_path, KEY, require_acknowledged=False).ok
    seq, acknowledged = await log.acknowledge_warnings(through=warning["seq"])
    log.close()
    assert [w.seq for w in acknowledged] == [warning["seq"]]
    report = verify(log_path, KEY)
    assert report.ok and report.warnings[0].acknowledged_at == seq  # still on record, and who looked at it when
    assert read_entries(log_path)[-1]["event"] == "audit_warnings_acknowledged"


async def test_acknowledging_is_refused_for_a_newer_warning_or_a_broken_chain(log_path: Path) -> None:
    head_path(log_path).unlink()
    AuditLog(log_path, KEY).close()  # records head_missing
    first = read_entries(log_path)[-1]["seq"]
    with open(log_path, "ab") as f:
        f.write(b'{"actor":null,"eve')
    log = AuditLog(log_path, KEY)  # records incomplete_entry_removed
    second = read_entries(log_path)[-1]["seq"]
    assert [w.outcome for w in verify(log_path, KEY).warnings] == ["head_missing", "incomplete_entry_removed"]
    with pytest.raises(AcknowledgeRefused, match=f"entry {second} is an integrity warning after entry {first}"):
        await log.acknowledge_warnings(through=first)
    assert not verify(log_path, KEY).ok  # nothing was recorded
    lines = log_path.read_bytes().split(b"\n")
    lines[0] = lines[0].replace(b'"ok"', b'"failed"')
    log_path.write_bytes(b"\n".join(lines))
    with pytest.raises(AcknowledgeRefused, match="not intact"):
        await log.acknowledge_warnings(through=second)
    log.close()


async def test_a_missing_head_is_reported_after_a_restart_too(log_path: Path) -> None:
    head_path(log_path).unlink()
    assert "head is missing" in str(verify(log_path, KEY).problem)
    AuditLog(log_path, KEY).close()
    report = verify(log_path, KEY)
    assert not report.ok and [w.outcome for w in report.warnings] == ["head_missing"]


async def test_a_log_missing_while_its_head_exists_is_reported(log_path: Path) -> None:
    log_path.unlink()
    report = verify(log_path, KEY)
    assert not report.ok and report.kind is Problem.HEAD_MISMATCH and "removed from the end" in str(report.problem)
    AuditLog(log_path, KEY).close()
    report = verify(log_path, KEY)
    assert not report.ok and [w.outcome for w in report.warnings] == ["head_mismatch"]


async def test_an_emptied_log_without_its_head_is_not_intact(log_path: Path) -> None:
    # Finding 6: truncating the log and deleting its head used to verify as "intact: 0 entries".
    log_path.write_bytes(b"")
    head_path(log_path).unlink()
    report = verify(log_path, KEY)
    assert not report.ok and report.kind is Problem.NO_LOG and "removed" in str(report.problem)
    log_path.unlink()
    assert verify(log_path, KEY).kind is Problem.NO_LOG


async def test_an_anchor_catches_a_rewrite_signed_with_the_key(log_path: Path) -> None:
    anchor = verify(log_path, KEY).last
    assert anchor is not None and anchor.seq == 7 and Anchor.parse(str(anchor)) == anchor
    assert str(anchor).startswith("anchor1/7/") and str(anchor).endswith(read_entries(log_path)[-1]["hash"])
    log = AuditLog(log_path, KEY)
    await log.append(AuditEvent.LOGOUT, actor=ACTOR)
    log.close()
    assert verify(log_path, KEY, anchors=[anchor]).ok  # later entries do not disturb an anchor
    # Someone holding the key drops the failed login, relinks the chain and signs the new head.
    rewritten = relink([e for e in read_entries(log_path) if e["event"] != "login_failure"])
    write_entries(log_path, rewritten)
    sign_head(log_path, rewritten[-1])
    assert verify(log_path, KEY).ok  # the key alone cannot tell
    report = verify(log_path, KEY, anchors=[anchor])
    assert not report.ok and report.kind is Problem.ANCHOR and report.first_bad_seq == 7
    # Cutting the log back to before the anchor, and signing that, is caught the same way.
    write_entries(log_path, rewritten[:4])
    sign_head(log_path, rewritten[3])
    report = verify(log_path, KEY, anchors=[anchor])
    assert not report.ok and "ends at entry 4, before the anchored entry 7" in str(report.problem)


async def test_an_anchor_catches_a_log_removed_and_started_again(log_path: Path) -> None:
    anchor = verify(log_path, KEY).last
    assert anchor is not None
    log_path.unlink()
    head_path(log_path).unlink()
    log = AuditLog(log_path, KEY)  # the broker cannot tell this from a new log
    await log.append(AuditEvent.LOGIN_SUCCESS, actor=ACTOR)
    log.close()
    assert verify(log_path, KEY).ok
    report = verify(log_path, KEY, anchors=[anchor])
    assert not report.ok and report.kind is Problem.ANCHOR


@pytest.mark.parametrize(
    "text",
    ["", "anchor1/7/2026-12-10T10:00:00Z/" + "a" * 63, "anchor2/7/2026-12-10T10:00:00Z/" + "a" * 64, "7:" + "a" * 64],
)
def test_a_malformed_anchor_is_refused_clearly(text: str) -> None:
    with pytest.raises(ValueError, match="is not an anchor"):
        Anchor.parse(text)


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
    report = verify(log_path, KEY)
    assert not report.ok and report.kind is Problem.UNACKNOWLEDGED
    assert verify(log_path, KEY, require_acknowledged=False).ok


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


# ----- a running writer finds its file replaced ------------------------------------------------


async def test_a_log_removed_under_a_running_writer_is_recorded(log_path: Path) -> None:
    log = AuditLog(log_path, KEY)
    log_path.unlink()  # the head still records entry 7
    await log.append(AuditEvent.LOGOUT, actor=ACTOR)
    log.close()
    entries = read_entries(log_path)
    assert [(e["event"], e["outcome"]) for e in entries] == [
        ("audit_integrity_warning", "head_mismatch"),
        ("logout", "ok"),
    ]
    report = verify(log_path, KEY)
    assert not report.ok and report.kind is Problem.UNACKNOWLEDGED


# ----- a separate audit key ----------------------------------------------------------------------


def _key_file(path: Path, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(os.urandom(32).hex() + "\n")
    path.chmod(mode)
    return path


async def _rewrite_with_the_data_directory_key(config: Any) -> None:
    """Someone holding only the data directory drops an entry and signs the new end with what it holds."""
    from broker.config import Keys, load_or_create_secret

    rewritten = relink(read_entries(config.audit_path)[:-1])
    write_entries(config.audit_path, rewritten)
    sign_head(config.audit_path, rewritten[-1], Keys(load_or_create_secret(config)).audit)


@pytest.mark.parametrize("separate", [False, True])
async def test_a_separate_audit_key_stops_a_rewrite_signed_from_the_data_directory(
    tmp_path: Path, separate: bool
) -> None:
    from broker.audit.setup import audit_key, open_audit_log
    from broker.config import Config

    settings: dict[str, Any] = {"data_dir": tmp_path / "data"}
    if separate:
        settings["audit_key_file"] = str(_key_file(tmp_path / "elsewhere" / "audit.key"))
    config = Config(**settings)
    log = open_audit_log(config)
    for _ in range(3):
        await log.append(AuditEvent.SESSION_CREATED, session=SESSION)
    await log.aclose()
    await _rewrite_with_the_data_directory_key(config)
    report = verify(config.audit_path, audit_key(config))
    if not separate:
        assert report.ok  # what docs/security.md 3.7 says a co-located key cannot detect
        return
    assert not report.ok and report.kind is Problem.HEAD_UNVERIFIED
    open_audit_log(config).close()  # a broker restarted on the directory says so too
    assert [w.outcome for w in verify(config.audit_path, audit_key(config)).warnings] == ["head_unverified"]


def test_the_audit_key_comes_from_a_file_or_the_environment(tmp_path: Path) -> None:
    from broker.audit.setup import audit_key
    from broker.config import Keys, load_config, load_or_create_secret

    data = str(tmp_path / "data")
    derived = Keys(load_or_create_secret(load_config({"BROKER_DATA_DIR": data}))).audit
    assert audit_key(load_config({"BROKER_DATA_DIR": data})) == derived
    key_file = _key_file(tmp_path / "audit.key")
    from_file = audit_key(load_config({"BROKER_DATA_DIR": data, "BROKER_AUDIT_KEY_FILE": str(key_file)}))
    from_env = audit_key(load_config({"BROKER_DATA_DIR": data, "BROKER_AUDIT_KEY": key_file.read_text().strip()}))
    assert from_file == from_env != derived
    assert key_file.read_text().strip() not in repr(load_config({"BROKER_AUDIT_KEY": key_file.read_text().strip()}))


def test_check_config_knows_the_audit_settings(tmp_path: Path) -> None:
    from broker.config import Config
    from broker.config_check import check_config

    data = tmp_path / "data"

    def problems(**settings: Any) -> str:
        return "\n".join(check_config(Config(data_dir=data, **settings)))

    assert problems() == ""
    assert problems(audit_key_file=str(_key_file(tmp_path / "good.key"))) == ""
    assert "cannot read the audit key file" in problems(audit_key_file=str(tmp_path / "absent.key"))
    short = tmp_path / "short.key"
    short.write_text("ab" * 8)
    short.chmod(0o600)
    assert "too short" in problems(audit_key_file=str(short))
    assert "chmod 600" in problems(audit_key_file=str(_key_file(tmp_path / "open.key", 0o644)))
    assert "inside the data directory" in problems(audit_key_file=str(_key_file(data / "audit.key")))
    assert "not both" in problems(audit_key_file=str(tmp_path / "good.key"), audit_key="ab" * 32)
    assert "too short" in problems(audit_key="not a long key")
    assert "audit_rotate_bytes" in problems(audit_rotate_bytes=100)
    assert problems(audit_rotate_bytes=0) == ""


# ----- rotation ----------------------------------------------------------------------------------


def all_files(path: Path) -> list[Path]:
    from broker.audit.format import rotated_numbers

    return [rotated_path(path, n) for n in rotated_numbers(path)] + [path]


@pytest.fixture
async def rotated_log(tmp_path: Path) -> Path:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, KEY, durable=False, rotate_bytes=1500)
    for _ in range(40):
        await log.append(AuditEvent.SESSION_CREATED, actor=ACTOR, session=SESSION)
    log.close()
    return path


async def test_the_chain_continues_across_rotated_files(rotated_log: Path) -> None:
    files = all_files(rotated_log)
    assert len(files) >= 4 and files[0].name == "audit.jsonl.1"
    assert [e["seq"] for f in files for e in read_entries(f)] == list(range(1, 41))
    for earlier, later in itertools.pairwise(files):
        assert read_entries(later)[0]["prev"] == read_entries(earlier)[-1]["hash"]
        assert earlier.stat().st_size >= 1500 and stat.S_IMODE(earlier.stat().st_mode) == 0o600
    report = verify(rotated_log, KEY)
    assert report.ok and report.entries == 40 and report.files == len(files)
    # Reopening continues in the newest file, which is rotated in its turn.
    log = AuditLog(rotated_log, KEY, durable=False, rotate_bytes=1500)
    assert log.open_report.ok
    for _ in range(10):
        await log.append(AuditEvent.LOGOUT, actor=ACTOR)
    log.close()
    report = verify(rotated_log, KEY)
    assert report.ok and report.entries == 50 and report.files > len(files)


async def test_a_removed_rotated_file_is_detected(rotated_log: Path) -> None:
    rotated_path(rotated_log, 2).unlink()
    report = verify(rotated_log, KEY)
    assert not report.ok and "audit.jsonl.2 is missing" in str(report.problem)


async def test_the_newest_rotated_file_removed_is_detected(rotated_log: Path) -> None:
    files = all_files(rotated_log)
    files[-2].unlink()
    report = verify(rotated_log, KEY)
    assert not report.ok and "missing (removed)" in str(report.problem) and "audit.jsonl, line 1" in str(report.problem)


async def test_the_oldest_files_removed_and_renumbered_are_detected(rotated_log: Path) -> None:
    files = all_files(rotated_log)
    files[0].unlink()
    for number, file in enumerate(files[1:-1], start=1):
        file.rename(rotated_path(rotated_log, number))
    report = verify(rotated_log, KEY)
    assert not report.ok and report.first_bad_seq == 1 and "are missing (removed)" in str(report.problem)


async def test_reordered_rotated_files_are_detected(rotated_log: Path) -> None:
    one, two = rotated_path(rotated_log, 1), rotated_path(rotated_log, 2)
    swap = rotated_log.with_name("swap")
    one.rename(swap)
    two.rename(one)
    swap.rename(two)
    report = verify(rotated_log, KEY)
    assert not report.ok and report.first_bad_seq == 1 and "audit.jsonl.1, line 1" in str(report.problem)


async def test_appends_that_come_together_are_synced_together(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The entries that wait while one write is under way go to disk together: one sync of the log
    and one of its head for all of them (issue 32: three syncs per entry, one entry at a time, kept
    call set-ups waiting seconds at 50 sessions a second beginning and ending). Each append still
    returns only once its entry is synced, in one chain with the others."""
    syncs: list[int] = []
    real_fsync = os.fsync

    def counted_fsync(fd: int) -> None:
        syncs.append(fd)
        real_fsync(fd)

    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, KEY)
    monkeypatch.setattr(os, "fsync", counted_fsync)
    seqs = await asyncio.gather(*(log.append(AuditEvent.SESSION_CREATED, session=SESSION) for _ in range(200)))
    assert sorted(seqs) == list(range(1, 201))
    assert len(syncs) <= 30, f"{len(syncs)} syncs for 200 entries"
    log.close()
    report = verify(path, KEY)
    assert report.ok and report.entries == 200


async def test_a_batch_the_disk_will_not_sync_fails_every_caller_and_leaves_the_chain_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, KEY)
    assert await log.append(AuditEvent.SESSION_CREATED, session=SESSION) == 1
    real_fsync = os.fsync

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    outcomes = await asyncio.gather(
        *(log.append(AuditEvent.SEAT_ADMITTED, session=SESSION) for _ in range(20)), return_exceptions=True
    )
    assert all(isinstance(o, OSError) for o in outcomes)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert await log.append(AuditEvent.SESSION_ENDED, session=SESSION) == 2, "the chain goes on from entry 1"
    log.close()
    report = verify(path, KEY)
    assert report.ok and report.entries == 2
    assert [e["event"] for e in read_entries(path)] == ["session_created", "session_ended"]


async def test_two_writers_keep_one_chain_across_rotations(tmp_path: Path) -> None:
    # As two broker processes sharing a data directory would, each rotating when it finds the file full.
    path = tmp_path / "audit.jsonl"
    a, b = (AuditLog(path, KEY, durable=False, rotate_bytes=1200) for _ in range(2))
    writes = [w.append(AuditEvent.SEAT_ADMITTED, session=SESSION) for _ in range(30) for w in (a, b)]
    seqs = await asyncio.gather(*writes)
    a.close()
    b.close()
    assert sorted(seqs) == list(range(1, 61))
    report = verify(path, KEY)
    assert report.ok and report.entries == 60 and report.files >= 4


# ----- flood control -----------------------------------------------------------------------------


async def wait_for_aggregate(path: Path, within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while not any("count" in e for e in read_entries(path)):
        assert time.monotonic() < deadline, "no aggregate entry was written when the window closed"
        await asyncio.sleep(0.05)


async def test_events_anyone_can_cause_are_written_a_few_per_window_then_counted(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, KEY, durable=False, flood_burst=3, flood_window_s=0.5)
    seqs = [await log.append(AuditEvent.LOGIN_FAILURE, outcome=AuditOutcome.THROTTLED) for _ in range(100)]
    assert seqs[:3] == [1, 2, 3] and seqs[3:] == [None] * 97
    for _ in range(20):  # what a therapist or the admin does is never held back
        assert await log.append(AuditEvent.SESSION_CREATED, session=SESSION) is not None
    await wait_for_aggregate(path)
    entries = read_entries(path)
    throttled = [e for e in entries if e["event"] == "login_failure"]
    assert len(throttled) == 4 and throttled[-1]["count"] == 97 and throttled[-1]["outcome"] == "throttled"
    assert throttled[0]["time"] <= throttled[-1]["since"] <= throttled[-1]["time"]
    assert sum(e.get("count", 1) for e in throttled) == 100
    assert len([e for e in entries if e["event"] == "session_created"]) == 20
    assert set(throttled[-1]) == {
        "seq",
        "time",
        "event",
        "actor",
        "session",
        "outcome",
        "prev",
        "hash",
        "count",
        "since",
    }
    assert await log.append(AuditEvent.LOGIN_FAILURE, outcome=AuditOutcome.THROTTLED) is not None  # a new window
    log.close()
    assert verify(path, KEY).ok


async def test_each_reporting_seat_has_its_own_window_and_closing_writes_what_was_counted(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, KEY, durable=False, flood_burst=2, flood_window_s=3600)
    other = "Zq3v9mZkRwJpHxBn"
    for actor in (ACTOR, other):
        for _ in range(50):
            await log.append(AuditEvent.INTERCEPTION_WARNING, actor, SESSION, AuditOutcome.WARNING)
    await log.aclose()
    entries = read_entries(path)
    for actor in (ACTOR, other):
        mine = [e for e in entries if e["actor"] == actor]
        assert [e.get("count") for e in mine] == [None, None, 48]
    assert verify(path, KEY).ok


async def test_a_forged_aggregate_count_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, KEY, durable=False, flood_burst=1, flood_window_s=3600)
    for _ in range(5):
        await log.append(AuditEvent.LOGIN_FAILURE, outcome=AuditOutcome.DENIED)
    log.close()
    entries = read_entries(path)
    entries[-1]["count"] = 1
    write_entries(path, entries)
    assert "changed after it was written" in str(verify(path, KEY).problem)


# ----- flood control in a real broker --------------------------------------------------------------


async def test_a_thousand_reports_from_a_joined_client_make_a_few_entries_that_count_them_all(
    tmp_path: Path,
) -> None:
    # Finding 7 of issue 25: each report used to append its own entry with two fsyncs.
    import aiohttp

    from broker.audit.flood import DEFAULT_BURST, DEFAULT_WINDOW_S
    from broker.audit.setup import audit_key
    from tests.conftest import schedule, start_broker

    running = await start_broker(tmp_path / "data", rate_per_s=1e6, rate_burst=1_000_000)
    try:
        links = await schedule(running)
        client, therapist = links.peers[links.client], links.peers[links.therapist]
        report = json.dumps({"type": "report", "event": "interception_warning", "peer": therapist, "reason": "bad_mac"})
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(running.url + "/ws", origin=running.url)
            await ws.send_str(json.dumps({"type": "hello", "protocol": 1}))
            await ws.send_str(json.dumps({"type": "join", "token": links.tokens[client]}))
            began = time.monotonic()
            for _ in range(1000):
                await ws.send_str(report)
            await ws.send_str(json.dumps({"type": "ping", "n": 7}))
            while True:  # messages take effect in order: the pong comes after every report
                message = json.loads((await ws.receive(timeout=60)).data)
                assert message["type"] != "error", message
                if message["type"] == "pong" and message.get("n") == 7:
                    break
            elapsed = time.monotonic() - began
            await ws.close()
    finally:
        await running.stop()  # closing the audit log writes the open window's aggregate
    entries = [e for e in read_entries(running.config.audit_path) if e["event"] == "interception_warning"]
    windows = 2 + int(elapsed // DEFAULT_WINDOW_S)
    assert 1 < len(entries) <= windows * (DEFAULT_BURST + 1)
    assert sum(e.get("count", 1) for e in entries) == 1000
    assert {(e["actor"], e["session"], e["outcome"]) for e in entries} == {
        (f"{links.session}-{client}", links.session, "warning")
    }
    assert verify(running.config.audit_path, audit_key(running.config)).ok


async def test_a_thousand_throttled_logins_make_a_few_entries_that_count_them_all(tmp_path: Path) -> None:
    import aiohttp

    from broker.audit.flood import DEFAULT_BURST, DEFAULT_WINDOW_S
    from broker.audit.setup import audit_key
    from tests.conftest import start_broker

    running = await start_broker(tmp_path / "data")
    statuses: dict[int, int] = {}
    try:
        async with aiohttp.ClientSession() as http:
            began = time.monotonic()
            for _ in range(1000):
                body = {"username": "nobody-at-all", "password": "not the password 123"}
                async with http.post(running.url + "/api/login", json=body, headers={"Origin": running.url}) as r:
                    statuses[r.status] = statuses.get(r.status, 0) + 1
            elapsed = time.monotonic() - began
    finally:
        await running.stop()
    assert statuses.get(429, 0) > 900 and set(statuses) <= {401, 429}
    logins = [e for e in read_entries(running.config.audit_path) if e["event"] in ("login_failure", "login_locked")]
    kinds = {(e["event"], e["outcome"]) for e in logins}
    windows = 2 + int(elapsed // DEFAULT_WINDOW_S)
    assert len(logins) <= len(kinds) * windows * (DEFAULT_BURST + 1)
    assert sum(e.get("count", 1) for e in logins) == 1000
    assert all(e["actor"] is None and e["session"] is None for e in logins)  # nothing about who tried
    assert verify(running.config.audit_path, audit_key(running.config)).ok


def test_verify_while_another_process_appends_and_rotates_is_never_misled(tmp_path: Path) -> None:
    """verify reads every file under a shared lock: never half an entry, nor a head newer than the log."""
    import subprocess
    import sys

    path = tmp_path / "audit.jsonl"
    AuditLog(path, KEY).close()
    script = (
        "import asyncio, sys\n"
        "from broker.audit.log import AuditEvent, AuditLog\n"
        "async def main():\n"
        f"    log = AuditLog({str(path)!r}, {KEY!r}, durable=False, rotate_bytes=65536)\n"
        "    for _ in range(3000):\n"
        f"        await log.append(AuditEvent.SEAT_ADMITTED, session={SESSION!r})\n"
        "    log.close()\n"
        "asyncio.run(main())\n"
    )
    repo = Path(__file__).resolve().parents[2]
    writer = subprocess.Popen([sys.executable, "-c", script], cwd=repo)
    reports = []
    while writer.poll() is None:
        reports.append(verify(path, KEY))
    assert writer.wait() == 0
    assert len(reports) > 1 and [r.problem for r in reports if not r.ok] == []
    final = verify(path, KEY)
    assert final.ok and final.entries == 3000 and final.files > 5
