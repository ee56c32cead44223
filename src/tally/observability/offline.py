"""``tally status --data-dir``: the status of a stopped store, read without changing a byte.

What a store directory says by itself: the journal (records acknowledged and not yet applied,
their rows and the oldest one's receipt time), the store's last applied journal sequence,
whether a bulk load left rollups to derive, and the latest event applied. No objective: those
are a running server's (``GET /status``).

Read-only means: the journal's segments are read, never cut (a torn tail is reported, and the
next ``tally serve`` cuts it); DuckDB is opened ``read_only``; nothing is created. A directory
that a running Tally holds (``tally serve`` or ``tally consume``: the audit log's or the
embedded ClickHouse's lock, or DuckDB's own) is not read: :class:`StoreHeld` says so, and the
server's own ``/status`` is the place to look.
"""

from __future__ import annotations

import fcntl
import os
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from tally import __version__, metadata
from tally.config import Settings
from tally.errors import StoreUnavailable
from tally.ingest.journal import FRAME, decode
from tally.observability.slo import FRESHNESS_BOUND_SECONDS
from tally.observability.status import utc_text
from tally.rollups.spec import GRAINS
from tally.storage.base import DERIVED_PENDING
from tally.storage.factory import CHDB_DIR, LOCK_FILE, check_store, open_read_only


class StoreHeld(StoreUnavailable):
    """A running Tally holds the directory: its ``/status`` answers instead."""

    def __init__(self, data_dir: Path, what: str) -> None:
        super().__init__(f"the store at {data_dir} is held by a running Tally ({what}): read "
                         "its status with `tally status --url URL`")


@dataclass(frozen=True)
class JournalRecord:
    seq: int
    rows: int
    received: datetime | None  # the earliest receipt time of its events


@dataclass(frozen=True)
class JournalScan:
    records: list[JournalRecord]
    segments: int
    bytes: int
    torn_bytes: int  # after the last intact record of a segment: cut by the next start


def _held(path: Path) -> bool:
    """Whether another process holds an exclusive ``flock`` on ``path`` (asked with a shared,
    non-blocking lock on a read-only descriptor: nothing is written)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing releases the shared lock, if it was taken
    return False


def check_not_held(data_dir: Path, kind: str) -> None:
    if _held(data_dir / "audit" / "audit.log"):
        raise StoreHeld(data_dir, "its audit log is locked")
    if kind == "chdb" and _held(data_dir / CHDB_DIR / LOCK_FILE):
        owner = (data_dir / CHDB_DIR / LOCK_FILE).read_text().strip()
        raise StoreHeld(data_dir, f"the embedded ClickHouse is locked by process {owner}")


def scan_journal(directory: Path) -> JournalScan:
    """Every intact record of every segment, oldest first, without cutting anything."""
    records, total, torn = [], 0, 0
    segments = sorted(directory.glob("seg-*.log"))
    for segment in segments:
        data = segment.read_bytes()
        total += len(data)
        offset = 0
        while offset + FRAME.size <= len(data):
            seq, length, crc = FRAME.unpack_from(data, offset)
            body = data[offset + FRAME.size:offset + FRAME.size + length]
            if len(body) != length or zlib.crc32(body) != crc:
                break
            events = decode(body).events
            rows = sum(t.num_rows for t in events)
            earliest = [pc.min(t.column("received_at")).as_py() for t in events if t.num_rows]
            records.append(JournalRecord(seq, rows, min(earliest) if earliest else None))
            offset += FRAME.size + length
        torn += len(data) - offset
    return JournalScan(records, len(segments), total, torn)


def _aware(moment: datetime | None) -> datetime | None:
    return None if moment is None else moment.replace(tzinfo=moment.tzinfo or UTC)


def _duckdb_facts(data_dir: Path) -> dict[str, Any]:
    backend = open_read_only(data_dir)  # DuckDB's lock: a writer refuses this
    try:
        applied = backend.journal_applied_seq()
        pending = backend.setting(DERIVED_PENDING)
        row = backend.query("SELECT count(*) AS n, max(occurred_at) AS occurred, "
                            "max(received_at) AS received FROM events").to_pylist()[0]
        underived: dict[str, Any] | None = None
        if pending is not None:
            first, last = (int(part) for part in pending.split(","))
            oldest = backend.query(
                "SELECT min(received_at) AS received, count(*) AS n FROM events "
                "WHERE ingest_seq BETWEEN ? AND ?", [first, last]).to_pylist()[0]
            underived = {"first_seq": first, "last_seq": last, "rows": int(oldest["n"]),
                         "received": _aware(oldest["received"])}
    finally:
        backend.close()
    return {"applied_seq": applied, "events": int(row["n"]),
            "latest_occurred": _aware(row["occurred"]),
            "latest_received": _aware(row["received"]), "underived": underived}


def _text(moment: datetime | None) -> str | None:
    return None if moment is None else utc_text(moment)


def store_status(settings: Settings, now: datetime | None = None) -> dict[str, Any]:
    """The status document of the stopped store at ``settings.data_dir``."""
    data_dir = metadata.require_store(settings.data_dir)
    kind = check_store(settings.store)
    check_not_held(data_dir, kind)
    now = now or datetime.now(UTC)
    scan = scan_journal(data_dir / "journal")
    facts = _duckdb_facts(data_dir) if kind == "duckdb" else None
    applied = facts["applied_seq"] if facts else None
    waiting = [r for r in scan.records if applied is None or r.seq > applied]
    received = [r.received for r in waiting if r.received is not None]
    underived = facts["underived"] if facts else None
    if underived and underived["received"] is not None:
        received.append(underived["received"])
    oldest = _aware(min(received)) if received else None
    lag = round((now - oldest).total_seconds(), 3) if oldest else 0.0
    return {
        "status": "stopped",
        "source": "data-dir",
        "data_dir": str(data_dir),
        "version": __version__,
        "checked_at": utc_text(now),
        "health": {
            "store": {"kind": kind, "inspected": facts is not None,
                      "note": None if facts else
                      f"a {kind} store is not opened by `tally status --data-dir` (it would "
                      "need the store's writer); the journal below is the local part"},
            "journal": {"segments": scan.segments, "bytes": scan.bytes,
                        "records": len(scan.records), "torn_tail_bytes": scan.torn_bytes},
        },
        "freshness": {
            "objective_seconds": FRESHNESS_BOUND_SECONDS,
            # the age of the oldest acknowledged events the rollups lack (0: caught up); all
            # rollups are derived in the apply transaction (and a bulk load's catch-up)
            "rollups": [{"rollup": grain, "lag_seconds": lag if facts else None}
                        for grain in GRAINS],
            "oldest_waiting_received_at": _text(oldest),
            "underived_bulk_load": None if underived is None else
            {k: v for k, v in underived.items() if k != "received"},
            "latest_occurred_at": _text(facts["latest_occurred"]) if facts else None,
            "latest_received_at": _text(facts["latest_received"]) if facts else None,
            "events_stored": facts["events"] if facts else None,
        },
        "backlog": {
            "pending_records": len(waiting) if facts else None,
            "pending_rows": sum(r.rows for r in waiting) if facts else None,
            "journal_rows": sum(r.rows for r in scan.records),
            "applied_seq": applied,
            "last_journal_seq": scan.records[-1].seq if scan.records else None,
        },
        "slo": None,  # a stopped store answers no request: the objectives are a server's
    }
