"""Rows the store refuses are set aside, so they never block the rows behind them.

An acknowledged group is applied in one transaction. If the store refuses it because of its
rows (``WriteRejected``: a conversion, range or constraint error — the same rows would fail on
every retry, and would stop the applier and every restart after it), :func:`isolate` finds the
rows at fault and returns the write without them:

1. an empty write of the same shape must pass (a *canary*): if even that fails, the fault is
   the store or the code, not the rows, and nothing is set aside (``StoreUnavailable``: the
   applier retries later);
2. the rows are partitioned by dry runs (each a transaction rolled back): a range that passes
   is kept, one that fails is halved, and a single row that fails is at fault. If the rows
   kept then fail together (a conflict between two of them), the partition is done again,
   each range tried together with the rows already kept, so the later of two conflicting
   rows is set aside;
3. each event at fault becomes a quarantine entry (reason ``not applied: …``, the event as
   JSON) written in the same transaction as the good rows, so the operator sees it in
   ``GET /v1/admin/quarantine``; a refused quarantine entry or idempotency record, which has
   no quarantine of its own, is written to ``DATA/parked/seq-N.jsonl`` (fsynced first).

Nothing acknowledged is dropped silently: every row is stored, quarantined or parked. The dry
runs cost about 2 × log2(rows) transactions per row at fault, of shrinking size (about twice
the write's rows in all), and only on this path.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pyarrow as pa

from tally.errors import StoreUnavailable, WriteRejected
from tally.events.registry import REGISTRY
from tally.ingest.batch import Rejection, quarantine_table
from tally.ingest.columnar import typed_payload
from tally.ingest.journal import write_all
from tally.storage.base import Backend, IdempotencyRecord, WriteSet

log = logging.getLogger(__name__)
APPLIER_CLIENT = "(applier)"  # the quarantine's client_id of rows set aside when applied
Range = tuple[int, int]


@dataclass
class Isolated:
    """The write without its rows at fault, and the events that were set aside."""

    writes: WriteSet
    set_aside: pa.Table | None = None
    parked: int = 0  # items written to a parked file


@dataclass
class _Items:
    """One write's rows in one index space: events, then quarantine rows, then idempotency
    records, so a range of indexes is a sub-write."""

    events: pa.Table | None
    quarantine: pa.Table | None
    idempotency: list[IdempotencyRecord] = field(default_factory=list)

    @classmethod
    def of(cls, writes: WriteSet) -> _Items:
        return cls(pa.concat_tables(writes.events) if writes.events else None,
                   pa.concat_tables(writes.quarantine, promote_options="default")
                   if writes.quarantine else None, list(writes.idempotency))

    @property
    def n_events(self) -> int:
        return 0 if self.events is None else int(self.events.num_rows)

    @property
    def n_quarantine(self) -> int:
        return 0 if self.quarantine is None else int(self.quarantine.num_rows)

    def __len__(self) -> int:
        return self.n_events + self.n_quarantine + len(self.idempotency)

    def subset(self, ranges: list[Range]) -> WriteSet:
        e, q = self.n_events, self.n_quarantine
        out = WriteSet()
        for lo, hi in ranges:
            if self.events is not None and lo < e:
                out.events.append(self.events.slice(lo, min(hi, e) - lo))
            if self.quarantine is not None and hi > e and lo < e + q:
                start = max(lo, e) - e
                out.quarantine.append(self.quarantine.slice(start, min(hi, e + q) - e - start))
            out.idempotency += self.idempotency[max(lo - e - q, 0):max(hi - e - q, 0)]
        # schema-only tables keep an empty sub-write's shape (the canary runs every statement)
        if not out.events and self.events is not None:
            out.events.append(self.events.slice(0, 0))
        if not out.quarantine and self.quarantine is not None:
            out.quarantine.append(self.quarantine.slice(0, 0))
        return out


def isolate(backend: Backend, writes: WriteSet, parked_dir: Path, seq: int) -> Isolated:
    """``writes`` without the rows the store refuses (see the module doc). Raises
    ``StoreUnavailable`` when the store, not the rows, is at fault."""
    items = _Items.of(writes)
    error = _dry_run(backend, items.subset([]))
    if error is not None:
        raise StoreUnavailable(f"the store refuses even an empty write: {error}")
    good: list[Range] = []
    bad: list[tuple[int, str]] = []
    # halves tested alone first (about 2 × rows of dry runs per row at fault); only if the
    # rows kept then fail together is the slower partition, in the context of the rows
    # already kept, needed
    _partition(backend, items, (0, len(items)), good, bad, in_context=False)
    if _dry_run(backend, items.subset(good)) is not None:
        good, bad = [], []
        _partition(backend, items, (0, len(items)), good, bad, in_context=True)
    result = items.subset(good)
    bad_events = [(i, reason) for i, reason in bad if i < items.n_events]
    others = [(i, reason) for i, reason in bad if i >= items.n_events]
    if others:
        _park(parked_dir, seq, [_item_json(items, i, reason) for i, reason in others])
    set_aside = None
    if bad_events and items.events is not None:
        set_aside = items.events.take([i for i, _ in bad_events])
        result.quarantine += [_quarantined(row, reason) for row, (_, reason)
                              in zip(set_aside.to_pylist(), bad_events, strict=True)]
    log.error("applier: rows the store refuses were set aside",
              extra={"seq": seq, "events": len(bad_events), "parked": len(others),
                     "reasons": sorted({reason for _, reason in bad})[:5]})
    return Isolated(result, set_aside, len(others))


def park_all(isolated: Isolated, parked_dir: Path, seq: int, reason: str) -> Isolated:
    """The last resort, when even the isolated write is refused: every row of the record goes
    to a parked file and nothing to the store, so the records behind it can go on."""
    items = _Items.of(isolated.writes)
    _park(parked_dir, seq, [_item_json(items, i, reason) for i in range(len(items))])
    log.error("applier: a whole record was parked", extra={"seq": seq, "items": len(items)})
    not_stored = [t for t in (isolated.set_aside, items.events) if t is not None]
    return Isolated(WriteSet(), pa.concat_tables(not_stored) if not_stored else None,
                    isolated.parked + len(items))


def _dry_run(backend: Backend, writes: WriteSet) -> str | None:
    try:
        backend.write(writes, dry_run=True)
    except WriteRejected as exc:
        return str(exc)
    return None


def _partition(backend: Backend, items: _Items, span: Range, good: list[Range],
               bad: list[tuple[int, str]], in_context: bool) -> None:
    """Sort ``span``'s rows into ``good`` ranges and ``bad`` rows by dry runs: a range that
    passes (``in_context``: together with the good ranges found so far) is good, a failing
    one is halved, a failing single row is bad."""
    lo, hi = span
    if lo >= hi:
        return
    error = _dry_run(backend, items.subset([*good, span] if in_context else [span]))
    if error is None:
        good.append(span)
    elif hi - lo == 1:
        bad.append((lo, error))
    else:
        mid = (lo + hi) // 2
        _partition(backend, items, (lo, mid), good, bad, in_context)
        _partition(backend, items, (mid, hi), good, bad, in_context)


def event_json(row: dict[str, Any]) -> bytes:
    """A stored event row as the envelope it came from (player id as stored: pseudonymised
    when that is on), with its payload verbatim."""
    def instant(value: datetime | None) -> str | None:
        return None if value is None else value.replace(tzinfo=UTC).isoformat().replace(
            "+00:00", "Z")

    envelope: dict[str, Any] = {
        "event_id": row["event_id"], "event_type": row["event_type"],
        "occurred_at": instant(row["occurred_at"]), "ingested_at": instant(row["ingested_at"]),
        "tenant_id": row["tenant_id"], "region": row["region"],
        "player_id": row["player_id"], "trace_id": row["trace_id"],
        "schema_version": row["schema_version"],
        # an empty payload text: loaded from columns, its typed columns are its payload
        "payload": (msgspec.Raw(row["payload"].encode()) if row.get("payload")
                    else typed_payload(row) if row.get("event_type") in REGISTRY else None),
    }
    return msgspec.json.encode({k: v for k, v in envelope.items() if v is not None})


def _quarantined(row: dict[str, Any], reason: str) -> pa.Table:
    rejection = Rejection(-1, row["event_id"], f"not applied: {reason}", event_json(row))
    received = row["received_at"] or datetime.now(UTC).replace(tzinfo=None)
    return quarantine_table([rejection], received, APPLIER_CLIENT)


def _item_json(items: _Items, index: int, reason: str) -> dict[str, Any]:
    e, q = items.n_events, items.n_quarantine
    if index < e and items.events is not None:
        return {"kind": "event", "reason": reason,
                "item": msgspec.json.decode(event_json(items.events.slice(index, 1)
                                                       .to_pylist()[0]))}
    if index < e + q and items.quarantine is not None:
        row = items.quarantine.slice(index - e, 1).to_pylist()[0]
        return {"kind": "quarantine", "reason": reason,
                "item": {k: v.isoformat() if isinstance(v, datetime) else v
                         for k, v in row.items()}}
    record = items.idempotency[index - e - q]
    return {"kind": "idempotency", "reason": reason,
            "item": {"client_id": record.client_id, "key": record.key,
                     "body_sha256": record.body_sha256, "response": record.response,
                     "created_at": record.created_at.isoformat()}}


def _park(parked_dir: Path, seq: int, lines: list[dict[str, Any]]) -> None:
    """Append ``lines`` to ``seq-<seq>.jsonl`` and fsync it and its directory: the items are
    durable here before the store commits without them."""
    data = b"".join(msgspec.json.encode({"seq": seq, **line}) + b"\n" for line in lines)
    try:
        parked_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(parked_dir / f"seq-{seq:020d}.jsonl",
                     os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        directory = os.open(parked_dir, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError as exc:
        raise StoreUnavailable(f"cannot park refused rows in {parked_dir}: "
                               f"{exc.strerror or exc}") from exc
