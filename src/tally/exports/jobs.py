"""Export jobs kept in the metadata database (``metadata.SCHEMA``), so they outlive a restart.

A job is ``queued`` → ``running`` → ``succeeded`` or ``failed``. It holds the creator's
principal as its token said when the job was made (its brands, regions, metrics...): the
query runs confined by exactly that, whoever runs it later. A job found ``running`` at start
was cut off by a stop: it is queued again, and failed after :data:`MAX_ATTEMPTS` tries.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from tally.security.tokens import Principal, principal_of_record, principal_record

MAX_ATTEMPTS = 3  # runs a job may start (a stop cuts one off) before it fails
KEEP = timedelta(hours=24)  # a finished job's file is kept this long (its expires_at)
_lock = threading.Lock()  # one connection, several threads (routes and the worker)

def now() -> datetime:
    return datetime.now(UTC)


def stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


@dataclass
class Job:
    id: str
    client_id: str
    principal: dict[str, Any]
    query: dict[str, Any]
    format: str
    webhook_url: str | None
    status: str
    attempts: int
    created_at: str
    finished_at: str | None = None
    expires_at: str | None = None
    rows: int | None = None
    bytes: int | None = None
    sha256: str | None = None
    watermark: str | None = None
    error: str | None = None
    deliveries: list[dict[str, Any]] = field(default_factory=list)

    @property
    def extension(self) -> str:
        return "csv" if self.format == "csv" else "parquet"

    def who(self) -> Principal:
        return principal_of_record(self.principal)


def _job(row: sqlite3.Row | tuple[Any, ...]) -> Job:
    (id_, client_id, principal, query, fmt, webhook_url, status, attempts, created_at,
     finished_at, expires_at, rows, size, sha256, watermark, error, deliveries) = row
    return Job(id_, client_id, json.loads(principal), json.loads(query), fmt, webhook_url,
               status, attempts, created_at, finished_at, expires_at, rows, size, sha256,
               watermark, error, json.loads(deliveries) if deliveries else [])


COLUMNS = ("id, client_id, principal, query, format, webhook_url, status, attempts, "
           "created_at, finished_at, expires_at, rows, bytes, sha256, watermark, error, "
           "deliveries")


def create(con: sqlite3.Connection, principal: Principal, query: dict[str, Any], fmt: str,
           webhook_url: str | None) -> Job:
    job = Job(f"exp_{secrets.token_hex(12)}", principal.client_id,
              principal_record(principal), query, fmt, webhook_url, "queued", 0,
              stamp(now()))
    with _lock:
        con.execute(f"INSERT INTO export_jobs ({COLUMNS}) VALUES "  # noqa: S608 - our columns
                    "(?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, NULL, NULL, NULL, NULL, NULL, "
                    "NULL)", (job.id, job.client_id, json.dumps(job.principal),
                              json.dumps(job.query), fmt, webhook_url, job.status, 0,
                              job.created_at))
    return job


def get(con: sqlite3.Connection, job_id: str) -> Job | None:
    with _lock:
        row = con.execute(f"SELECT {COLUMNS} FROM export_jobs WHERE id = ?",  # noqa: S608
                          (job_id,)).fetchone()
    return None if row is None else _job(row)


def listing(con: sqlite3.Connection, client_id: str | None, after: int,
            limit: int) -> list[tuple[int, Job]]:
    """Jobs (of ``client_id``; None: everyone's) after position ``after``, oldest first, as
    (position, job): the position is SQLite's rowid, a cursor that new jobs never shift."""
    params: list[Any]
    where, params = "rowid > ?", [after]
    if client_id is not None:
        where, params = "client_id = ? AND rowid > ?", [client_id, after]
    with _lock:
        rows = con.execute(f"SELECT rowid, {COLUMNS} FROM export_jobs WHERE {where} "  # noqa: S608
                           "ORDER BY rowid LIMIT ?", (*params, limit)).fetchall()
    return [(int(row[0]), _job(row[1:])) for row in rows]


def claim(con: sqlite3.Connection) -> Job | None:
    """The oldest queued job, now ``running`` (one attempt more), or None."""
    with _lock:
        row = con.execute("SELECT id FROM export_jobs WHERE status = 'queued' "
                          "ORDER BY rowid LIMIT 1").fetchone()
        if row is None:
            return None
        con.execute("UPDATE export_jobs SET status = 'running', attempts = attempts + 1 "
                    "WHERE id = ? AND status = 'queued'", (row[0],))
    return get(con, str(row[0]))


def finish(con: sqlite3.Connection, job: Job) -> None:
    """Record ``job``'s outcome (its status, figures or error)."""
    finished = now()
    job.finished_at, job.expires_at = stamp(finished), stamp(finished + KEEP)
    with _lock:
        con.execute("UPDATE export_jobs SET status = ?, finished_at = ?, expires_at = ?, "
                    "rows = ?, bytes = ?, sha256 = ?, watermark = ?, error = ? WHERE id = ?",
                    (job.status, job.finished_at, job.expires_at, job.rows, job.bytes,
                     job.sha256, job.watermark, job.error, job.id))


def requeue(con: sqlite3.Connection, job: Job) -> None:
    """A job cut off by a stop, queued again (its attempt counted)."""
    with _lock:
        con.execute("UPDATE export_jobs SET status = 'queued' WHERE id = ?", (job.id,))


def record_deliveries(con: sqlite3.Connection, job: Job) -> None:
    with _lock:
        con.execute("UPDATE export_jobs SET deliveries = ? WHERE id = ?",
                    (json.dumps(job.deliveries), job.id))


def recover(con: sqlite3.Connection) -> int:
    """At start: jobs a stop cut off are queued again, or failed past their attempts."""
    with _lock:
        failed = con.execute(
            "UPDATE export_jobs SET status = 'failed', error = ?, finished_at = ?, "
            "expires_at = ? WHERE status = 'running' AND attempts >= ?",
            (f"interrupted by {MAX_ATTEMPTS} stops of the server", stamp(now()),
             stamp(now() + KEEP), MAX_ATTEMPTS)).rowcount
        requeued = con.execute("UPDATE export_jobs SET status = 'queued' "
                               "WHERE status = 'running'").rowcount
    return int(failed) + int(requeued)


def expired(con: sqlite3.Connection) -> list[Job]:
    """Finished jobs past their ``expires_at`` whose file is not deleted yet."""
    with _lock:
        rows = con.execute(f"SELECT {COLUMNS} FROM export_jobs WHERE expires_at IS NOT NULL "  # noqa: S608
                           "AND expires_at < ? AND file_deleted = 0",
                           (stamp(now()),)).fetchall()
    return [_job(row) for row in rows]


def file_deleted(con: sqlite3.Connection, job: Job) -> None:
    with _lock:
        con.execute("UPDATE export_jobs SET file_deleted = 1 WHERE id = ?", (job.id,))
