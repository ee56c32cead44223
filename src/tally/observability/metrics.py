"""Prometheus metrics (CONTRACT §7), one registry per app so tests and replicas stay apart.

Instruments are updated where things happen (requests in the trace middleware, ingestion in
its route); the rest (cache, index size, freshness per rollup) is read at scrape time from the
live objects, so nothing is counted twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.request_seconds = Histogram(
            "tally_http_request_duration_seconds", "Request latency by route template.",
            ["route", "method"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.responses = Counter(
            "tally_http_responses", "Responses by route template and status.",
            ["route", "status"], registry=self.registry)
        self.ingested = Counter(
            "tally_ingest_events", "Events received by outcome.", ["outcome"],
            registry=self.registry)

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.request_seconds.labels(route, method).observe(seconds)
        self.responses.labels(route, str(status)).inc()

    def count_receipt(self, receipt: dict[str, Any]) -> None:
        for outcome, key in (("accepted", "accepted"), ("duplicate", "duplicates"),
                             ("rejected", "rejected")):
            self.ingested.labels(outcome).inc(int(receipt[key]))

    def watch(self, gauges: Callable[[], Iterable[tuple[str, str, dict[str, str], float]]]
              ) -> None:
        """Register values read at scrape time: (name, help, labels, value) tuples; a name
        ending in ``_total`` is exposed as a counter, any other as a gauge."""
        self.registry.register(_Gauges(gauges))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def gauge_registry(read: Callable[[], Iterable[tuple[str, str, dict[str, str], float]]]
                   ) -> CollectorRegistry:
    """A registry of gauges read at scrape time (a process with no API: ``tally consume``)."""
    registry = CollectorRegistry()
    registry.register(_Gauges(read))
    return registry


class _Gauges(Collector):
    def __init__(self, read: Callable[[], Iterable[tuple[str, str, dict[str, str], float]]]
                 ) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        for name, help_text, labels, value in self._read():
            family = families.get(name)
            if family is None:  # a name ending in _total is a counter (a count since start)
                kind = CounterMetricFamily if name.endswith("_total") else GaugeMetricFamily
                family = families[name] = kind(name.removesuffix("_total"), help_text,
                                               labels=sorted(labels))
            family.add_metric([labels[k] for k in sorted(labels)], value)
        return list(families.values())

