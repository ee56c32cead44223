"""The Jepsen-style set check: every acknowledged event is stored exactly once.

Writers record what they sent and which of it was acknowledged (``202``); after the run the
store is read back (the server stopped) on the engine it ran on. An acknowledged event missing
is *lost*; any event stored twice is *doubled*; an event stored that nobody sent is
*unexpected*. Events sent but never acknowledged (the server died, or refused with ``503``)
may or may not be stored: at-least-once producers retry them.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from reliability.findings import Findings
from tally.config import Settings
from tally.ingest.service import IngestService
from tally.runtime import open_store

Key = tuple[str, str]


def stored_events(data: Path) -> Counter[Key]:
    """``(tenant_id, event_id)`` → stored rows, read from the store of a stopped server (the
    store ``TALLY_STORE`` names, opened as Tally opens it) once its journal is applied."""
    return read_back(data)[0]


def read_back(data: Path) -> tuple[Counter[Key], dict[Key, str]]:
    """:func:`stored_events`, and why the applier set aside the events it did (key → reason):
    quarantined under client ``(applier)`` or parked under ``DATA/parked``. A lost event
    found there was refused by the store; one not found there vanished."""
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
        aside = {(r["tenant_id"], r["event_id"]): f"quarantined: {r['reason'][:200]}"
                 for r in store.query("SELECT tenant_id, event_id, reason FROM quarantine "
                                      "WHERE client_id = '(applier)'").to_pylist()}
    finally:
        store.close()
    for parked in sorted((data / "parked").glob("*.jsonl")):
        for line in parked.read_text().splitlines():
            item = json.loads(line)
            event = item.get("item") or {}
            aside[(event.get("tenant_id"), event.get("event_id"))] = \
                f"parked: {str(item.get('reason'))[:200]}"
    return Counter({(r["tenant_id"], r["event_id"]): r["n"] for r in rows}), aside


def logged_errors(workdir: Path, most: int = 5) -> list[str]:
    """The distinct error messages the servers of a run logged (``serve-*.log`` beside the
    data dir), for a verdict that says what went wrong as well as that it did."""
    seen: dict[str, None] = {}
    for log in sorted(workdir.glob("serve-*.log")):
        for line in log.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("level") in ("error", "critical"):
                seen.setdefault(f"{entry.get('msg')} {entry.get('error', '')}"[:300], None)
    return list(seen)[:most]


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
        stored, aside = read_back(data)
        lost = [k for k in self.acknowledged if stored[k] == 0]
        doubled = [k for k, n in stored.items() if n > 1]
        unexpected = [k for k in stored if k not in self.sent]
        findings.figure("events acknowledged", len(self.acknowledged))
        findings.figure("events lost", len(lost))
        findings.figure("events doubled", len(doubled))
        findings.figure("events unexpected", len(unexpected))
        if lost:
            why = Counter(aside[k] for k in lost if k in aside)
            findings.expect(False, f"{len(lost)} of {len(self.acknowledged)} acknowledged "
                                   f"events are not in the store, e.g. {sorted(lost)[:3]}; "
                                   f"set aside: {dict(why) or 'none'}; "
                                   f"errors logged: {logged_errors(data.parent) or 'none'}")
        findings.expect(not doubled, f"{len(doubled)} events are stored more than once, "
                                     f"e.g. {sorted(doubled)[:3]}")
        findings.expect(not unexpected, f"{len(unexpected)} stored events were never sent, "
                                        f"e.g. {sorted(unexpected)[:3]}")
