"""The whole suite: every scenario in document order, and ``broker conformance`` behind it."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TextIO

from broker.conformance import checks_admission, checks_connection, checks_devices, checks_holds, checks_relay
from broker.conformance.report import Context, Scenario, SessionSource, Summary, run_all
from broker.conformance.wire import Target

SCENARIOS: tuple[Scenario, ...] = (
    *checks_connection.checks.scenarios,
    *checks_admission.checks.scenarios,
    *checks_devices.checks.scenarios,
    *checks_relay.checks.scenarios,
    *checks_holds.checks.scenarios,
)


def select(only: Sequence[str] = ()) -> list[Scenario]:
    """The scenarios judging at least one rule whose id starts with one of ``only`` (all without)."""
    if not only:
        return list(SCENARIOS)
    return [s for s in SCENARIOS if any(r.id.startswith(p) for r in s.rules for p in only)]


async def run_suite(
    target: Target, sessions: SessionSource, *, only: Sequence[str] = (), out: TextIO | None = None
) -> Summary:
    return await run_all(Context(target, sessions), select(only), out or sys.stdout)


async def conformance_command(url: str, *, data_dir: str | None, origin: str | None, only: Sequence[str]) -> int:
    """``broker conformance URL``: 0 when every rule passed, 1 when one failed, 2 when it cannot run."""
    from broker.conformance.sessions import AdminSessions

    try:
        target = Target.of(url, origin)
    except ValueError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    if not select(only):
        print(f"Error: no rule id starts with {', '.join(only)}", file=sys.stderr)
        return 2
    sessions = AdminSessions(data_dir)
    try:
        await sessions.create()  # one session first: say at once if none can be scheduled
    except Exception as exc:
        print(f"Error: cannot schedule a session on the broker: {exc}", file=sys.stderr)
        return 2
    summary = await run_suite(target, sessions, only=only)
    return 1 if summary.failed else 0
