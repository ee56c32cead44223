"""``tally_rows_scanned_total``: rows read by analytics queries (CONTRACT §7).

Read at scrape time from the store's own count (``Backend.rows_scanned``: on DuckDB, its
profiler's, summed over every ``execute``), so queries run outside a request count too.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector


class CountsScans(Protocol):
    @property
    def rows_scanned(self) -> int: ...


class RowsScanned(Collector):
    def __init__(self, store: CountsScans) -> None:
        self._store = store

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(
            "tally_rows_scanned", "Rows read by analytics queries (the store's own count).")
        family.add_metric([], float(self._store.rows_scanned))
        return [family]
