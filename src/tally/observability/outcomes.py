"""Counts of what happened, by outcome, since the process started: kept by the object that
sees it happen (the limits, the export worker) and read at each scrape as a Prometheus counter
(``Runtime.gauges``), so nothing is counted twice and nothing below ``api/`` needs the app's
registry. The outcomes known in advance are there from the start, at 0: a counter that
appears only at its first increment hides that increment from ``rate()``."""

from __future__ import annotations

import threading


class Outcomes:
    def __init__(self, *known: str) -> None:
        self._counts = dict.fromkeys(known, 0)
        self._lock = threading.Lock()  # counted from request, worker and webhook threads

    def add(self, outcome: str, n: int = 1) -> None:
        with self._lock:
            self._counts[outcome] = self._counts.get(outcome, 0) + n

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)
