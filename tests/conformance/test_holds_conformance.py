"""The conformance rules of private time and the roster (broker/conformance/checks_holds.py): they
pass against this broker, and a broker that relays to held clients fails ``hold.no-relay``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from broker.signaling import session as sm
from broker.signaling.relay import Relays
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
