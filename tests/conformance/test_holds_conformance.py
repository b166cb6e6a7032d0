"""The conformance rules of private time and the roster (broker/conformance/checks_holds.py): they
pass against this broker, and a broker that relays to held clients fails ``hold.no-relay``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from broker.signaling import session as sm
from broker.signaling.decisions import TherapistDecisions
from broker.signaling.protocol import SeatState, TherapistNote, encode
from broker.signaling.relay import Relays
from broker.store.bus import Envelope
from tests.conformance.test_suite import SUMMARY, run_in_process, serving

RULES = ("hold.", "roster.", "joined.seat-keys")


class HoldlessRelays(Relays):
    """A broker that breaks one rule (docs/protocol.md section 3: nothing is relayed to or from a
    held client): it checks relays as if nobody were held."""

    def checked(self, conn: Any, message: Any, session: Any) -> tuple[Any, ...]:
        unheld = sm.copy_session(session)
        for seat in unheld.seats:
            seat.held = False
        return Relays.checked(self, conn, message, unheld)


async def test_the_hold_and_roster_rules_pass_and_a_broker_ignoring_holds_fails_them(tmp_path: Path) -> None:
    async for running in serving(tmp_path / "data"):
        honest, failed = await run_in_process(running, only=RULES)
        assert failed == 0, honest
        judged = [line for line in honest.splitlines() if line.startswith("PASS ")]
        assert len(judged) == 9, honest
        running.hub.relays.__class__ = HoldlessRelays
        text, failed = await run_in_process(running, only=RULES)
    assert failed >= 1
    lines = text.splitlines()
    assert any(line.startswith("FAIL hold.no-relay: ") for line in lines), text
    assert "PASS roster.not-allowed: " in text and "PASS hold.views: " in text  # the other rules still hold
    found = SUMMARY.search(text)
    assert found is not None and found.group(3) == str(failed)


class NoteToAnyoneDecisions(TherapistDecisions):
    """A broker that breaks one rule (docs/protocol.md 5 ``waiting_note``: only to a client who is
    checking or waiting): it passes a note on to an admitted client too."""

    async def waiting_note(self, conn: Any, message: Any) -> None:
        session = await self.records.load(conn.session_id)
        target = next(s for s in session.seats if s.id == message.peer)
        if target.state is SeatState.ADMITTED and target.conn is not None:
            await self.bus.publish(session.id, Envelope(target.id, None, encode(TherapistNote(sealed=message.sealed))))
            return
        await TherapistDecisions.waiting_note(self, conn, message)


async def test_the_note_rules_pass_and_a_broker_sending_notes_into_the_call_fails_them(tmp_path: Path) -> None:
    async for running in serving(tmp_path / "data"):
        honest, failed = await run_in_process(running, only=("note.",))
        assert failed == 0, honest
        judged = [line for line in honest.splitlines() if line.startswith("PASS ")]
        assert len(judged) == 3, honest
        running.hub.decisions.__class__ = NoteToAnyoneDecisions
        text, failed = await run_in_process(running, only=("note.",))
    assert failed >= 1, text
    assert any(line.startswith("FAIL note.errors: ") for line in text.splitlines()), text
    assert "PASS note.confirmed: " in text
