"""Every metric a broker process exports, in one table, and the calls that move them.

One ``Metrics`` per broker process object, each with a registry of its own (never
prometheus-client's global one), so several brokers in one process (the tests) keep apart.
Each labelled metric's children are bound once here, for every value its label may take
(labels.py), so they are exported from the start at 0 and counting one is a dict lookup and
an increment. What is counted per relayed message or received frame is kept in plain integers
and read at scrape time (scrape.py): nothing on the way of a relay calls into prometheus-client. docs/deploy.md
("Metrics") describes each one: its type, what it means, and what a healthy value looks like.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from broker.metrics.call_setup import CallSetups
from broker.metrics.labels import (
    JOIN_OUTCOMES,
    CloseCode,
    Decision,
    Generation,
    JoinOutcome,
    LoginOutcome,
    PreflightOutcome,
    RelayKind,
    StoreOperation,
    ThrottleLimit,
    values,
)
from broker.metrics.scrape import LocalCounter, LocalHistogram
from broker.signaling.protocol import Answer, Candidate, ErrorCode, Offer, ProtocolError, Renegotiate, Roster
from broker.store.base import StoreUnavailable

#: Seconds: from a millisecond (a quick local step) to ten seconds (something is wrong).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Call set-up: a few tens of milliseconds on a good network, seconds with TURN or a slow page.
SETUP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Received text frames: a candidate is a few hundred bytes, an offer a few KiB, the limit 64 KiB.
SIZE_BUCKETS = (128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)  # ints: the cheapest bisect

_RELAY_KINDS: dict[type, RelayKind] = {
    Offer: RelayKind.OFFER,
    Answer: RelayKind.ANSWER,
    Candidate: RelayKind.CANDIDATE,
    Renegotiate: RelayKind.RENEGOTIATE,
    Roster: RelayKind.ROSTER,
}
#: The hub's audit events that are admission decisions.
_DECISIONS = {
    "seat_admitted": Decision.ADMITTED,
    "seat_declined": Decision.DECLINED,
    "seat_removed": Decision.REMOVED,
    "seat_allowed_back": Decision.ALLOWED_BACK,
}


def _children(metric: Any, label: str, names: tuple[str, ...]) -> dict[str, Any]:
    """The metric's child for every value of its one label, bound now (so each is exported at 0)."""
    return {name: metric.labels(**{label: name}) for name in names}


class Metrics:
    """One broker process's metrics: the table, and one small method per instrumentation point."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        # ---------------------------------------------------------------- the table
        # (name, type, labels; the gauges counted at scrape time are in scrape.py)
        self.joins = Counter(
            "broker_joins",
            "Joins, by outcome: ok or the error code the join was refused with.",
            ["outcome"],
            registry=registry,
        )
        self.admissions = Counter(
            "broker_admissions", "The therapist's admission decisions, by decision.", ["decision"], registry=registry
        )
        self.relayed = LocalCounter(
            "broker_relayed_messages",
            "Signaling messages relayed between peers, by type.",
            "type",
            {kind: name.value for kind, name in _RELAY_KINDS.items()},
        )
        registry.register(self.relayed)
        self.error_replies = Counter(
            "broker_error_replies", "Error messages sent to peers, by error code.", ["code"], registry=registry
        )
        self.closes = Counter(
            "broker_websocket_closes", "Signaling WebSockets closed, by close code.", ["code"], registry=registry
        )
        self.message_sizes = LocalHistogram(
            "broker_message_size_bytes",
            "Sizes of the text frames peers sent (characters; JSON is ASCII).",
            SIZE_BUCKETS,
        )
        registry.register(self.message_sizes)
        self.call_setup = Histogram(
            "broker_call_setup_seconds",
            "From the moment two peers could call (both joined, the client admitted) to the first answer between them.",
            buckets=SETUP_BUCKETS,
            registry=registry,
        )
        self.preflights = Counter(
            "broker_preflights", "Network pre-flights, by outcome.", ["outcome"], registry=registry
        )
        self.store_seconds = Histogram(
            "broker_store_command_seconds",
            "Time of each store operation on Redis, by operation.",
            ["operation"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.store_errors = Counter(
            "broker_store_errors",
            "Store operations on Redis that failed (Redis unreachable, hung, loading).",
            ["operation"],
            registry=registry,
        )
        self.logins = Counter(
            "broker_login_attempts", "Therapist login attempts, by outcome.", ["outcome"], registry=registry
        )
        self.throttled = Counter(
            "broker_throttled",
            "Requests, connections or messages refused by a limit, by limit.",
            ["limit"],
            registry=registry,
        )
        self.loop_lag = Histogram(
            "broker_event_loop_lag_seconds",
            "How late the event loop woke a timer (sampled ten times a second).",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.stall_max = Gauge(
            "broker_event_loop_stall_max_seconds",
            "The longest event-loop lag seen in the last minute.",
            registry=registry,
        )
        self.gc_pauses = Histogram(
            "broker_gc_pause_seconds",
            "Pauses of the cyclic garbage collector, by generation.",
            ["generation"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        # ---------------------------------------------------------------- children, bound once
        self._joins = _children(self.joins, "outcome", JOIN_OUTCOMES)
        self._admissions = _children(self.admissions, "decision", values(Decision))
        self._errors = {code: self.error_replies.labels(code=code.value) for code in ErrorCode}
        self._closes = _children(self.closes, "code", values(CloseCode))
        self._preflights = _children(self.preflights, "outcome", values(PreflightOutcome))
        self._store_seconds = _children(self.store_seconds, "operation", values(StoreOperation))
        self._store_errors = _children(self.store_errors, "operation", values(StoreOperation))
        self._logins = _children(self.logins, "outcome", values(LoginOutcome))
        self._throttled = _children(self.throttled, "limit", values(ThrottleLimit))
        self.gc_by_generation = _children(self.gc_pauses, "generation", values(Generation))
        #: The moments peers became able to call, until their first answer (call_setup).
        self.setups = CallSetups(self.call_setup.observe)
        #: What reads its figures just before a scrape (scrape.HubCollector.refresh).
        self.before_scrape: list[Callable[[], Awaitable[None]]] = []

    async def scrape(self) -> bytes:
        """Every metric in Prometheus's text format, with the figures read at scrape time fresh."""
        for refresh in self.before_scrape:
            await refresh()
        return generate_latest(self.registry)

    # ---------------------------------------------------------------- signaling

    async def count_join(self, join: Awaitable[None]) -> None:
        """Await a join and count its outcome (a refusal goes on to be answered as before)."""
        try:
            await join
        except ProtocolError as exc:
            self._joins[exc.code.value].inc()
            raise
        except StoreUnavailable:
            self._joins[ErrorCode.UNAVAILABLE.value].inc()
            raise
        except Exception:
            self._joins[ErrorCode.INTERNAL.value].inc()
            raise
        self._joins[JoinOutcome.OK.value].inc()

    def admission(self, event: str, session_id: str | None = None, peer_id: str | None = None) -> None:
        """A therapist's decision (the hub's audit event name); an admitted seat may now call."""
        decision = _DECISIONS.get(event)
        if decision is None:
            return
        self._admissions[decision.value].inc()
        if decision is Decision.ADMITTED and session_id is not None and peer_id is not None:
            self.setups.ready(session_id, peer_id)

    def relayed_message(self, message: object, session_id: str, sender: str, recipient: str) -> None:
        """Every relay passes here: one increment of a plain integer; an answer may end a call set-up."""
        kind = type(message)
        self.relayed.counts[kind] += 1
        if kind is Answer:
            self.setups.answered(session_id, sender, recipient)

    def error_reply(self, code: ErrorCode) -> None:
        self._errors[code].inc()

    def closed(self, code: int | None) -> None:
        self._closes[CloseCode.of(code).value].inc()

    def preflight(self, outcome: PreflightOutcome) -> None:
        self._preflights[outcome.value].inc()

    def throttle(self, limit: ThrottleLimit) -> None:
        self._throttled[limit.value].inc()

    def login(self, outcome: LoginOutcome) -> None:
        self._logins[outcome.value].inc()

    # ---------------------------------------------------------------- the store

    def store_command(self, operation: str, seconds: float, failed: bool) -> None:
        """The Redis store's report of one operation (``RedisStore.on_command``)."""
        timing = self._store_seconds.get(operation)
        if timing is None:
            return
        timing.observe(seconds)
        if failed:
            self._store_errors[operation].inc()


#: Where an aiohttp application keeps its broker's metrics (None in apps built without them).
METRICS = web.AppKey("metrics", Metrics)


def metrics_of(app: web.Application) -> Metrics | None:
    return app.get(METRICS)
