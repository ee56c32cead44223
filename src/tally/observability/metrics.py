"""Prometheus metrics (CONTRACT §7), one registry per app so tests and replicas stay apart.

Instruments are updated where things happen (requests in the trace middleware, ingestion in
its route); the rest (cache, index size, freshness per rollup, refusals, exports) is read at
scrape time from the live objects, so nothing is counted twice.

Hygiene (checked by ``promtool check metrics`` in tests/test_exposition.py): a count since
start is a counter (its name ends in ``_total``), never a gauge; counters and histograms carry
no ``_created`` series (one more series per label set that no rule of ours reads); the
process's own ``process_*`` and ``python_info`` series, and ``tally_build_info``, come from
this registry too. The latency buckets include each objective of CONTRACT §7 (0.8, 2 and 5 s)
so the rules in deploy/prometheus/ count good requests exactly, not by interpolation.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tally import __version__
from tally.observability.slo import SloWindow

# 0.8, 2 and 5 s are the latency objectives (timeseries, slice, retention p95; CONTRACT §7)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 0.8, 1, 2, 2.5, 5,
                   10)
INGEST_OUTCOMES = ("accepted", "duplicate", "rejected")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.request_seconds = Histogram(
            "tally_http_request_duration_seconds", "Request latency by route template.",
            ["route", "method"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.responses = Counter(
            "tally_http_responses", "Responses by route template, method and status.",
            ["route", "method", "status"], registry=self.registry)
        self.ingested = Counter(
            "tally_ingest_events", "Events received by outcome.", ["outcome"],
            registry=self.registry)
        for outcome in INGEST_OUTCOMES:  # 0 from the start: rate() sees the first one
            self.ingested.labels(outcome)
        Info("tally_build", "The running Tally: its version and Python's.",
             registry=self.registry).info({"version": __version__,
                                           "python_version": platform.python_version()})
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, memory, fds...
        PlatformCollector(registry=self.registry)  # python_info
        self.slo = SloWindow()  # the objectives over the last hour, for /status

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.request_seconds.labels(route, method).observe(seconds)
        self.responses.labels(route, method, str(status)).inc()
        self.slo.observe(route, status, seconds)

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
        return generate_latest(_WithoutCreated(self.registry))


def gauge_registry(read: Callable[[], Iterable[tuple[str, str, dict[str, str], float]]]
                   ) -> CollectorRegistry:
    """A registry of gauges read at scrape time (a process with no API: ``tally consume``)."""
    registry = CollectorRegistry()
    registry.register(_Gauges(read))
    return registry


class _WithoutCreated(Collector):
    """A registry's families less their ``_created`` samples. prometheus_client's own switch
    (``disable_created_metrics``) is process-wide; this is this registry's alone."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        for family in self._registry.collect():  # fresh objects on every collect
            created = family.name + "_created"
            family.samples = [s for s in family.samples if s.name != created]
            yield family


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

