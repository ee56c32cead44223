"""The Jepsen-style set check: every acknowledged event is stored exactly once.

Writers record what they sent and which of it was acknowledged (``202``); after the run the
store is read back (the server stopped) on the engine it ran on. An acknowledged event missing
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

from reliability.findings import Findings
from tally.config import Settings
from tally.ingest.service import IngestService
from tally.runtime import open_store


def stored_events(data: Path) -> Counter[tuple[str, str]]:
    """``(tenant_id, event_id)`` → stored rows, read from the store of a stopped server (the
    store ``TALLY_STORE`` names, opened as Tally opens it) once its journal is applied."""
    store = open_store(Settings(data_dir=data))
    try:
        # what the journal holds and the store does not yet (a bounded shutdown leaves a
        # backlog) is applied first, as the next start would: acknowledged is not lost
        service = IngestService(store, data / "journal", 10_000)
        service.start()
        drained = service.flush(timeout=600)
        service.stop()
        assert drained, "the journal's backlog was not applied within 10 minutes"
        rows = store.query("SELECT tenant_id, event_id, count(*) AS n FROM events "
                           "GROUP BY tenant_id, event_id").to_pylist()
        return Counter({(r["tenant_id"], r["event_id"]): r["n"] for r in rows})
    finally:
        store.close()


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
