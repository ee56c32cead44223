"""Data versions: which journal sequence last changed each (brand, UTC day), each brand's
greatest applied occurred_at, and the earliest occurred_at of its events acknowledged but not
yet applied. The applier bumps them as it applies; answers derive their ETag from the versions
of the brand-days they read (a late event for the range changes it, an event elsewhere does
not) and their watermark from :meth:`DataVersions.complete_before`, which never claims an
event the store does not hold yet: while a brand has acknowledged events waiting for the
applier, its watermark stops at the earliest of them."""

from __future__ import annotations

import threading
from datetime import date, datetime, timedelta

import pyarrow as pa
import pyarrow.compute as pc

from tally.storage.base import Backend


class DataVersions:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._days: dict[str, dict[int, int]] = {}  # brand → {day ordinal → seq}
        self._latest: dict[str, datetime] = {}
        self._pending: dict[str, dict[int, datetime]] = {}  # brand → {seq → min occurred_at}

    def load(self, backend: Backend) -> None:
        table = backend.data_versions()
        self._merge(table.column("tenant_id").to_pylist(), table.column("day").to_pylist(),
                    table.column("seq").to_pylist(), table.column("latest").to_pylist())

    def add_pending(self, seq: int, events: list[pa.Table]) -> None:
        """Events of journal record ``seq`` are acknowledged, not yet applied."""
        for table in events:
            if not table.num_rows:
                continue
            earliest = pa.table({"tenant_id": table.column("tenant_id"),
                                 "at": table.column("occurred_at")}) \
                .group_by("tenant_id").aggregate([("at", "min")])
            with self._lock:
                for brand, at in zip(earliest.column("tenant_id").to_pylist(),
                                     earliest.column("at_min").to_pylist(), strict=True):
                    per_seq = self._pending.setdefault(brand, {})
                    per_seq[seq] = min(at, per_seq.get(seq, at))

    def applied(self, events: list[pa.Table], seq: int) -> None:
        """Records up to ``seq`` are in the store, with these ``events`` (rows set aside as
        poison are not among them: they count nowhere)."""
        self.bump(events, seq)
        with self._lock:
            for brand in list(self._pending):
                per_seq = self._pending[brand]
                for done in [s for s in per_seq if s <= seq]:
                    del per_seq[done]
                if not per_seq:
                    del self._pending[brand]

    def bump(self, events: list[pa.Table], seq: int) -> None:
        for table in events:
            if not table.num_rows:
                continue
            days = pc.cast(table.column("occurred_at"), pa.date32())
            grouped = pa.table({"tenant_id": table.column("tenant_id"), "day": days,
                                "at": table.column("occurred_at")}) \
                .group_by(["tenant_id", "day"]).aggregate([("at", "max")])
            self._merge(grouped.column("tenant_id").to_pylist(),
                        grouped.column("day").to_pylist(), [seq] * grouped.num_rows,
                        grouped.column("at_max").to_pylist())

    def _merge(self, brands: list[str], days: list[date], seqs: list[int],
               latest: list[datetime]) -> None:
        with self._lock:
            for brand, day, seq, at in zip(brands, days, seqs, latest, strict=True):
                per_day = self._days.setdefault(brand, {})
                ordinal = day.toordinal()
                per_day[ordinal] = max(per_day.get(ordinal, 0), seq)
                if brand not in self._latest or at > self._latest[brand]:
                    self._latest[brand] = at

    def version(self, brands: tuple[str, ...] | None,
                reads: tuple[datetime, datetime] | None) -> int:
        """The latest change to any of ``brands`` (None: all) on the days of ``reads``
        (``[start, end)``; None: any day)."""
        first, last = 0, date.max.toordinal()
        if reads is not None:
            first = reads[0].date().toordinal()
            last = (reads[1] - timedelta(microseconds=1)).date().toordinal()
        with self._lock:
            chosen = self._days.values() if brands is None else \
                [self._days.get(b, {}) for b in brands]
            return max((_latest(per_day, first, last) for per_day in chosen), default=0)

    def complete_before(self, brands: tuple[str, ...] | None) -> datetime | None:
        """The instant before which every acknowledged event of ``brands`` (None: all) is in
        the store: the greatest applied occurred_at, or, while some of their events wait for
        the applier, the earliest of those (it is before the greatest accepted occurred_at,
        and nothing earlier is missing)."""
        with self._lock:
            waiting = [at for brand, per_seq in self._pending.items()
                       if brands is None or brand in brands for at in per_seq.values()]
            if waiting:
                return min(waiting)
            values = [at for brand, at in self._latest.items()
                      if brands is None or brand in brands]
        return max(values, default=None)


def _latest(per_day: dict[int, int], first: int, last: int) -> int:
    """The latest change of one brand on the days ``first``..``last`` (ordinals): a range
    shorter than the brand's history looked up day by day (a funnel asks once a day of its
    range), a longer one (or any day) by scanning the history."""
    if last - first + 1 < len(per_day):
        return max((per_day[d] for d in range(first, last + 1) if d in per_day), default=0)
    return max((seq for day, seq in per_day.items() if first <= day <= last), default=0)
