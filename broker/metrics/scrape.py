"""What is counted when Prometheus scrapes, rather than as it happens.

- ``LocalHistogram`` and ``LocalCounter``: a histogram and a labelled counter kept in plain
  integers and exported by a collector, for what is counted on every frame or relay (message
  sizes, relayed messages): a dict or list increment, no lock, no call into prometheus-client.
- ``HubCollector``: this process's sessions by phase, its WebSockets by role and its bus's
  reconnects. The sessions are those with a connection here (per process: a session whose
  peers are on two processes is counted by both), each classed by its record, read from the
  store just before the scrape (``refresh``); a store that does not answer in time leaves the
  last figures in place, so the metrics still answer during a Redis outage.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from broker.metrics.labels import ConnectionRole, SessionPhase
from broker.signaling.protocol import Role, SeatState

if TYPE_CHECKING:
    from prometheus_client import Metric

    from broker.signaling.hub import Hub
    from broker.signaling.session import Session

#: How long a scrape waits for the records of the sessions held here.
REFRESH_TIMEOUT_S = 0.5


class LocalHistogram(Collector):
    """A histogram in plain integers: ``observe`` is cheap enough for every received frame."""

    __slots__ = ("name", "documentation", "bounds", "counts", "sum")

    def __init__(self, name: str, documentation: str, buckets: Iterable[float]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = sorted(buckets)
        #: Observations per bucket (not cumulative), the last one past every bound (+Inf).
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def collect(self) -> Iterator[Metric]:
        cumulative, buckets = 0, []
        for bound, count in zip([*(str(float(b)) for b in self.bounds), "+Inf"], self.counts, strict=True):
            cumulative += count
            buckets.append((bound, float(cumulative)))
        yield HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=self.sum)


class LocalCounter(Collector):
    """A counter with one label in plain integers: ``counts[key] += 1`` is the whole cost of counting."""

    def __init__(self, name: str, documentation: str, label: str, names: Mapping[object, str]) -> None:
        self.name = name
        self.documentation = documentation
        self.label = label
        self.names = dict(names)
        #: Per key (one of ``names``), how many so far.
        self.counts: dict[object, int] = dict.fromkeys(self.names, 0)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=[self.label])
        for key, count in self.counts.items():
            family.add_metric([self.names[key]], count)
        yield family


def phase_of(session: Session) -> SessionPhase:
    """Live once a client is in the call, waiting while one waits to be let in, scheduled before."""
    clients = session.clients()
    if any(seat.state is SeatState.ADMITTED for seat in clients):
        return SessionPhase.LIVE
    if any(
        seat.state is SeatState.WAITING or (seat.other is not None and seat.other.state is SeatState.WAITING)
        for seat in clients
    ):
        return SessionPhase.WAITING
    return SessionPhase.SCHEDULED


class HubCollector(Collector):
    """This process's sessions by phase, WebSockets by role, and bus reconnects, at scrape time."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.phases = dict.fromkeys(SessionPhase, 0)

    async def refresh(self) -> None:
        """Read the record of every session held here (before a scrape), within REFRESH_TIMEOUT_S."""
        held = {conn.session_id for conn in self.hub.connections if conn.session_id is not None}
        try:
            async with asyncio.timeout(REFRESH_TIMEOUT_S):
                records = await asyncio.gather(*(self.hub.records.get(sid) for sid in held), return_exceptions=True)
        except TimeoutError:
            return
        phases = dict.fromkeys(SessionPhase, 0)
        for record in records:
            if record is not None and not isinstance(record, BaseException):
                phases[phase_of(record)] += 1
        self.phases = phases

    def collect(self) -> Iterator[Metric]:
        sessions = GaugeMetricFamily(
            "broker_sessions", "Sessions with a connection on this process, by phase.", labels=["state"]
        )
        for phase, count in self.phases.items():
            sessions.add_metric([phase.value], count)
        yield sessions
        roles = dict.fromkeys(ConnectionRole, 0)
        for conn in self.hub.connections:
            roles[_role(conn.role)] += 1
        connections = GaugeMetricFamily(
            "broker_websocket_connections", "Signaling WebSockets open on this process, by role.", labels=["role"]
        )
        for role, count in roles.items():
            connections.add_metric([role.value], count)
        yield connections
        reconnects = getattr(self.hub.bus, "reconnects", 0)
        yield CounterMetricFamily(
            "broker_bus_reconnects", "Times the bus's connection to Redis was lost and made again.", value=reconnects
        )


def _role(role: Role | None) -> ConnectionRole:
    if role is Role.THERAPIST:
        return ConnectionRole.THERAPIST
    if role is Role.CLIENT:
        return ConnectionRole.CLIENT
    return ConnectionRole.NONE
