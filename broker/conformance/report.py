"""Rules, the scenarios that check them, and the report: one line per rule, then the count.

A scenario sets up what its rules need (a session, peers, an admitted client) and gives each
rule a verdict; a rule checked several times passes only if every check passed. A scenario
that stops early (the broker did something else, or nothing, in time) fails every rule it
had not judged yet, with what happened.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TextIO

from broker.conformance.wire import Peer, Target, Unexpected


@dataclass(frozen=True)
class Rule:
    id: str
    text: str


@dataclass
class Outcome:
    rule: Rule
    passed: bool
    detail: str = ""
    #: Not applicable to this broker's configuration (its checklist policy has no such item).
    skipped: bool = False

    def line(self) -> str:
        if self.skipped:
            return f"SKIP {self.rule.id}: {self.detail}"
        return f"PASS {self.rule.id}: {self.rule.text}" if self.passed else f"FAIL {self.rule.id}: {self.detail}"


@dataclass(frozen=True)
class Seat:
    peer: str
    role: str
    token: str


@dataclass(frozen=True)
class Session:
    """A scheduled session as its therapist's side holds it: the link key never left here."""

    id: str
    link_key: bytes
    seats: tuple[Seat, ...]

    @property
    def therapist(self) -> Seat:
        return next(s for s in self.seats if s.role == "therapist")

    @property
    def clients(self) -> list[Seat]:
        return [s for s in self.seats if s.role == "client"]


class SessionSource(Protocol):
    """How the suite gets sessions scheduled (and links revoked) on the broker under test."""

    async def create(self, clients: int = 1, starts: int | None = None) -> Session: ...

    async def revoke(self, session: str, peer: str) -> None: ...


@dataclass
class Context:
    target: Target
    sessions: SessionSource


class Run:
    """One scenario's run: its verdicts and the peers it opened (closed when it ends)."""

    def __init__(self, context: Context, rules: Sequence[Rule]) -> None:
        self.context = context
        self.rules = {rule.id: rule for rule in rules}
        self.outcomes: dict[str, Outcome] = {}
        self.peers: list[Peer] = []

    @property
    def target(self) -> Target:
        return self.context.target

    async def session(self, clients: int = 1, starts: int | None = None) -> Session:
        return await self.context.sessions.create(clients=clients, starts=starts)

    async def open(self, **options: Any) -> Peer:
        peer = await Peer.open(self.target, **options)
        self.peers.append(peer)
        return peer

    def check(self, rule_id: str, ok: bool, problem: str = "") -> bool:
        """Record one check of a rule; a rule with one failed check fails."""
        rule = self.rules[rule_id]  # KeyError: the scenario judges a rule it did not declare
        earlier = self.outcomes.get(rule_id)
        if earlier is None or earlier.passed:
            self.outcomes[rule_id] = Outcome(rule, ok, "" if ok else problem)
        return ok

    def skip(self, rule_id: str, why: str) -> None:
        """The rule does not apply here (it needs a checklist item this broker's policy lacks)."""
        self.outcomes[rule_id] = Outcome(
            self.rules[rule_id], True, f"{self.rules[rule_id].text}; not applicable: {why}", True
        )

    def equal(self, rule_id: str, got: object, expected: object, what: str) -> bool:
        return self.check(rule_id, got == expected, f"{what}: expected {expected!r}, got {got!r}")

    async def close(self) -> None:
        await asyncio.gather(*(peer.close() for peer in self.peers), return_exceptions=True)


ScenarioFunction = Callable[[Run], Awaitable[None]]


@dataclass(frozen=True)
class Scenario:
    name: str
    rules: tuple[Rule, ...]
    run: ScenarioFunction
    #: How long it may take before its unjudged rules fail.
    timeout_s: float = 60.0


@dataclass
class Registry:
    scenarios: list[Scenario] = field(default_factory=list)

    def scenario(
        self, rules: dict[str, str], timeout_s: float = 60.0
    ) -> Callable[[ScenarioFunction], ScenarioFunction]:
        """Declare a scenario and the rules (id: what the document says) it judges."""

        def register(function: ScenarioFunction) -> ScenarioFunction:
            declared = tuple(Rule(rule_id, text) for rule_id, text in rules.items())
            self.scenarios.append(Scenario(function.__name__, declared, function, timeout_s))
            return function

        return register


async def run_scenario(context: Context, scenario: Scenario) -> list[Outcome]:
    run = Run(context, scenario.rules)
    stopped = ""
    try:
        await asyncio.wait_for(scenario.run(run), scenario.timeout_s)
    except Unexpected as exc:
        stopped = str(exc)
    except TimeoutError:
        stopped = f"scenario {scenario.name} took over {scenario.timeout_s:g} s"
    except Exception as exc:  # a broker that breaks the suite's expectations in an unforeseen way
        stopped = f"scenario {scenario.name} stopped: {type(exc).__name__}: {exc}"
    finally:
        await run.close()
    outcomes = []
    for rule in scenario.rules:
        outcome = run.outcomes.get(rule.id)
        if outcome is None:
            outcome = Outcome(rule, False, f"not reached: {stopped or 'the scenario did not judge it'}")
        outcomes.append(outcome)
    return outcomes


@dataclass
class Summary:
    outcomes: list[Outcome]
    seconds: float

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.passed]

    def line(self) -> str:
        skipped = sum(o.skipped for o in self.outcomes)
        passed = len(self.outcomes) - len(self.failed) - skipped
        also = f", {skipped} not applicable" if skipped else ""
        return f"{passed} of {len(self.outcomes)} rules passed, {len(self.failed)} failed{also} ({self.seconds:.1f} s)"


async def run_all(context: Context, scenarios: Sequence[Scenario], out: TextIO, *, parallel: int = 4) -> Summary:
    """Run the scenarios, a few at once (they use separate sessions), and print their rules in order."""
    started = time.monotonic()
    gate = asyncio.Semaphore(parallel)

    async def one(scenario: Scenario) -> list[Outcome]:
        async with gate:
            return await run_scenario(context, scenario)

    tasks = [asyncio.ensure_future(one(s)) for s in scenarios]
    outcomes: list[Outcome] = []
    for task in tasks:  # printed in the declared order, as each is ready
        for outcome in await task:
            print(outcome.line(), file=out, flush=True)
            outcomes.append(outcome)
    summary = Summary(outcomes, time.monotonic() - started)
    print(summary.line(), file=out, flush=True)
    return summary
