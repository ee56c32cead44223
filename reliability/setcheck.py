"""The Jepsen-style set check: every acknowledged event is stored exactly once.

Writers record what they sent and which of it was acknowledged (``202``); after the run the
store is read back with DuckDB (read-only, the server stopped). An acknowledged event missing
is *lost*; any event stored twice is *doubled*; an event stored that nobody sent is
*unexpected*. Events sent but never acknowledged (the server died, or refused with ``503``)
may or may not be stored: at-least-once producers retry them.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import duckdb

from reliability.findings import Findings


def stored_events(data: Path) -> Counter[tuple[str, str]]:
    """``(tenant_id, event_id)`` → stored rows, read from the store of a stopped server."""
    con = duckdb.connect(str(data / "events.duckdb"), read_only=True)
    try:
        rows = con.execute("SELECT tenant_id, event_id, count(*) FROM events GROUP BY 1, 2")
        return Counter({(tenant, event): n for tenant, event, n in rows.fetchall()})
    finally:
        con.close()


@dataclass
class EventSet:
    """What producers sent and what was acknowledged, safe to update from many threads."""

    sent: set[tuple[str, str]] = field(default_factory=set)
    acknowledged: set[tuple[str, str]] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record_sent(self, keys: Iterable[tuple[str, str]]) -> None:
        with self._lock:
            self.sent.update(keys)

    def record_acknowledged(self, keys: Iterable[tuple[str, str]]) -> None:
        with self._lock:
            self.acknowledged.update(keys)

    def check(self, data: Path, findings: Findings) -> None:
        """Read the store back and record the verdict (figures and violations)."""
        stored = stored_events(data)
        lost = [k for k in self.acknowledged if stored[k] == 0]
        doubled = [k for k, n in stored.items() if n > 1]
        unexpected = [k for k in stored if k not in self.sent]
        findings.figure("events acknowledged", len(self.acknowledged))
        findings.figure("events lost", len(lost))
        findings.figure("events doubled", len(doubled))
        findings.figure("events unexpected", len(unexpected))
        findings.expect(not lost, f"{len(lost)} of {len(self.acknowledged)} acknowledged events "
                                  f"are not in the store, e.g. {sorted(lost)[:3]}")
        findings.expect(not doubled, f"{len(doubled)} events are stored more than once, "
                                     f"e.g. {sorted(doubled)[:3]}")
        findings.expect(not unexpected, f"{len(unexpected)} stored events were never sent, "
                                        f"e.g. {sorted(unexpected)[:3]}")
