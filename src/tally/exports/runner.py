"""Running export jobs: one worker thread, one job at a time, off the request path.

A job pages through its query exactly as a client would (the route's plan, the creator's
principal, the largest page), writing each page as it comes — CSV (RFC 4180, the rows of
``Accept: text/csv``) or Parquet (a row group a page; ``ts`` a UTC timestamp, money and counts
``int64``) — so memory holds one page, never the export. Over ``TALLY_EXPORT_MAX_ROWS`` rows or
``TALLY_EXPORT_MAX_BYTES`` bytes the job fails with that reason (never a truncated file). The
file is written as ``<id>.<ext>.part``, fsynced, then renamed: a file under its final name is
whole. Finished jobs' files are deleted once they expire. With a ``webhook_url``, the outcome
is delivered signed (``webhooks/delivery.py``) and each attempt recorded on the job.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import asdict
from datetime import date, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq

from tally.audit import record
from tally.config import Settings
from tally.errors import TallyError
from tally.exports import jobs
from tally.exports.jobs import Job
from tally.insights.kinds import plan_for
from tally.insights.series import Context, Table
from tally.insights.tables import csv_rows
from tally.observability.outcomes import Outcomes
from tally.security.tokens import Principal
from tally.webhooks import secrets
from tally.webhooks.delivery import deliver
from tally.workers import Worker

log = logging.getLogger(__name__)
POLL_SECONDS = 0.5
ARROW = {"timestamp": pa.timestamp("us", tz="UTC"), "date": pa.date32(), "int": pa.int64(),
         "float": pa.float64(), "bool": pa.bool_(), "str": pa.string()}


class TooLarge(TallyError):
    pass


class _Interrupted(Exception):
    """The server is stopping: the job goes back to the queue, its partial file away."""


class _Sink:
    """One export file being written, page by page."""

    def __init__(self, path: Path, fmt: str, table: Table) -> None:
        self.path, self.fmt, self.table = path, fmt, table
        self._file = path.open("wb")
        self._parquet: pq.ParquetWriter | None = None
        self._first = True

    def write(self, rows: list[dict[str, Any]]) -> None:
        if self.fmt == "csv":
            self._file.write(csv_rows(rows, self.table.columns, header=self._first))
        else:
            batch = pa.Table.from_pylist([self._typed(r) for r in rows], self._schema())
            if self._parquet is None:
                self._parquet = pq.ParquetWriter(self._file, batch.schema)
            self._parquet.write_table(batch)
        self._first = False

    def _schema(self) -> pa.Schema:
        return pa.schema([pa.field(c, ARROW[self.table.kinds.get(c, "str")])
                          for c in self.table.columns])

    def _typed(self, row: dict[str, Any]) -> dict[str, Any]:
        out = {c: row.get(c) for c in self.table.columns}
        for column, value in out.items():
            if value is None:
                continue
            kind = self.table.kinds.get(column, "str")
            if kind == "timestamp":
                out[column] = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
            elif kind == "date":
                out[column] = date.fromisoformat(str(value))
            elif kind == "str":  # keys as text, whatever they were
                out[column] = str(value)
        return out

    def size(self) -> int:
        self._file.flush()
        return self._file.tell()

    def close(self) -> None:
        if self._parquet is not None:
            self._parquet.close()
        elif self.fmt == "parquet":  # no page at all: a valid file of no rows
            pq.write_table(pa.Table.from_pylist([], self._schema()), self._file)
        elif self._first:
            self._file.write(csv_rows([], self.table.columns))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


def file_of(directory: Path, job: Job) -> Path:
    return directory / f"{job.id}.{job.extension}"


class ExportWorker(Worker):
    def __init__(self, settings: Settings, meta: sqlite3.Connection,
                 context_for: Callable[[Principal], Context],
                 catch_up: Callable[[float], None] = lambda seconds: None,
                 audit: Callable[[dict[str, Any]], object] = lambda entry: None) -> None:
        """``context_for``: what a query of a principal is planned with (``Runtime``'s);
        ``catch_up(seconds)``: wait (that long at most) for the events acknowledged so far
        to be in the store, as a route does before it answers (read-your-writes); ``audit``:
        append an entry to the audit log (a webhook delivery's)."""
        self.settings, self.meta, self.context_for = settings, meta, context_for
        self.catch_up, self.audit = catch_up, audit
        self.directory = settings.data_dir / "exports"
        # since start, read at scrape time: tally_export_jobs_total, tally_webhook_deliveries
        self.finished = Outcomes("succeeded", "failed")
        self.deliveries = Outcomes("delivered", "failed")
        super().__init__("tally-exports", "exports: the worker", POLL_SECONDS)

    def start(self) -> None:
        self.directory.mkdir(mode=0o700, exist_ok=True)
        jobs.recover(self.meta)
        super().start()

    def wake(self) -> None:
        """A job was queued: run it now rather than at the next poll."""
        super().wake()

    def step(self) -> float | None:
        """Sweep expired files, then run the next queued job (and look again at once)."""
        self._sweep()
        job = jobs.claim(self.meta)
        if job is None:
            return POLL_SECONDS
        self.run(job)
        return None

    def run(self, job: Job) -> None:
        """Run a claimed job to its end (succeeded or failed), then tell its webhook."""
        final = file_of(self.directory, job)
        part = final.with_name(final.name + ".part")
        sink: _Sink | None = None
        try:
            self.catch_up(self.settings.read_your_writes_ms / 1000)
            ctx = self.context_for(job.who())
            plan = plan_for(job.query, ctx)
            assert plan.table is not None
            mark = ctx.watermark(plan.brands)  # as the route's X-Data-Watermark says it
            job.watermark = (mark or datetime(1970, 1, 1)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            sink = _Sink(part, job.format, plan.table)
            rows = 0
            while True:
                answer = plan.run()
                page = plan.table.table_rows(answer)
                rows += len(page)
                if rows > self.settings.export_max_rows:
                    raise TooLarge(f"the export has more than TALLY_EXPORT_MAX_ROWS "
                                   f"({self.settings.export_max_rows}) rows: narrow the query")
                sink.write(page)
                if sink.size() > self.settings.export_max_bytes:
                    raise TooLarge(f"the export is over TALLY_EXPORT_MAX_BYTES "
                                   f"({self.settings.export_max_bytes}) bytes: narrow the query")
                cursor = answer.get("next_cursor")
                if not cursor:
                    break
                if self.stopping:  # a stop does not wait for a long export
                    raise _Interrupted
                plan = plan_for(job.query, ctx, cursor)
            sink.close()
            sink = None
            part.replace(final)
            job.status, job.rows, job.bytes = "succeeded", rows, final.stat().st_size
            job.sha256 = _sha256(final)
        except _Interrupted:
            jobs.requeue(self.meta, job)
            return
        except (TallyError, OSError) as exc:  # the query's, a limit's, the disk's
            job.status = "failed"
            job.error = getattr(exc, "detail", None) or str(exc) or type(exc).__name__
        finally:
            if sink is not None:
                sink.close()
            part.unlink(missing_ok=True)
        jobs.finish(self.meta, job)
        self.finished.add(job.status)
        log.info("exports: job finished", extra={"job": job.id, "status": job.status,
                                                 "rows": job.rows, "error": job.error})
        if job.webhook_url:
            threading.Thread(target=self._notify, args=(job,), name="tally-export-webhook",
                             daemon=True).start()

    def _notify(self, job: Job) -> None:
        body = json.dumps({"type": f"export.{job.status}", "data": view(job)}).encode()
        assert job.webhook_url is not None
        outcome = deliver(job.webhook_url, body, secrets.signing(self.meta, job.client_id),
                          allow_loopback=self.settings.webhook_allow_loopback)
        last = outcome.attempts[-1].status if outcome.attempts else None
        self.deliveries.add("delivered" if outcome.delivered else "failed")
        try:  # every webhook is in the audit log (CONTRACT §8)
            self.audit(record.delivery(job.id, job.client_id, str(job.principal["token_id"]),
                                       urlsplit(job.webhook_url).hostname or "",
                                       len(outcome.attempts), last))
        except Exception:  # the log cannot take it: the delivery stays on the job
            log.exception("exports: a webhook delivery could not be audited",
                          extra={"job": job.id})
        job.deliveries = [{"message_id": outcome.message_id, **asdict(a)}
                          for a in outcome.attempts]
        jobs.record_deliveries(self.meta, job)  # after the audit entry: shown once recorded

    def _sweep(self) -> None:
        for job in jobs.expired(self.meta):
            file_of(self.directory, job).unlink(missing_ok=True)
            jobs.file_deleted(self.meta, job)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def view(job: Job, download_url: str | None = None) -> dict[str, Any]:
    """A job as the API shows it (CONTRACT §8)."""
    out: dict[str, Any] = {
        "id": job.id, "status": job.status, "format": job.format,
        "query": job.query["params"] | {"kind": job.query["kind"]},
        "created_at": job.created_at, "finished_at": job.finished_at, "rows": job.rows,
        "bytes": job.bytes, "sha256": job.sha256, "watermark": job.watermark,
        "expires_at": job.expires_at, "download_url": download_url,
        "links": {"self": f"/v1/exports/{job.id}"},
    }
    if job.error is not None:
        out["error"] = job.error
    if job.webhook_url is not None:
        out["webhook_url"] = job.webhook_url
        out["deliveries"] = job.deliveries
    return out
