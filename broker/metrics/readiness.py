"""What /readyz says, as metrics an alert rule can watch: ready or not, and a Redis that came back empty.

``broker_ready`` is 1 when /readyz would answer 200 (the store answers and the process accepts
peers), 0 otherwise; it is worked out at scrape time by the same check /readyz runs, so the two
never disagree. ``broker_store_emptied_timestamp_seconds`` is the time the session Redis was
found emptied (``store_emptied_at`` in /readyz, broker/store/redis_marker.py), 0 while there is
no such record (always 0 on the embedded store). Neither carries a label.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from prometheus_client import Metric


class ReadinessCollector(Collector):
    """Readiness and the emptied-store record, read just before each scrape (``refresh``)."""

    def __init__(self, ready: Callable[[], Awaitable[bool]], emptied_at: Callable[[], int | None]) -> None:
        """``ready``: /readyz's own check; ``emptied_at``: the marker's record (None: none)."""
        self._ready = ready
        self._emptied_at = emptied_at
        self.ready = False

    async def refresh(self) -> None:
        self.ready = await self._ready()

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "broker_ready",
            "1 when /readyz answers 200 (the store answers and the process accepts peers), else 0.",
            value=1 if self.ready else 0,
        )
        yield GaugeMetricFamily(
            "broker_store_emptied_timestamp_seconds",
            "When the session Redis was found to have come back empty (Unix time), 0 if it was not.",
            value=self._emptied_at() or 0,
        )
