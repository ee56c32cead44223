"""Who pays for the rows a query scans: the scan meter of the request being served.

Every analytics query goes through ``Backend.execute``; the backend asks the meter of the
current request (a context variable, set per HTTP request by the API) before running a
statement, with a way to estimate the rows it will scan, and tells it afterwards how many rows
it did scan. Work outside a request (``tally demo``, background jobs) has no meter and is only
counted in the process total (the Prometheus counter ``tally_rows_scanned_total``).
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from typing import Protocol


class ScanMeter(Protocol):
    def before_scan(self, estimate: Callable[[], int]) -> None:
        """Refuse (raise a ``UserError``) a statement the request may not run; ``estimate``
        is called only if the meter needs it (it costs a planning pass)."""

    def after_scan(self, rows: int) -> None:
        """Charge the rows the statement scanned."""


current_meter: ContextVar[ScanMeter | None] = ContextVar("tally_scan_meter", default=None)
