"""Operator metadata (clients, signing keys, webhook secrets, export jobs, alerts) in SQLite
beside the event store.

DuckDB allows one writing process, and ``tally serve`` is it; SQLite in WAL mode lets the
operator's commands (``tally client create``, ``revoke``, ``keys rotate``) write while the
server runs, and :class:`Watched` lets the server see their commits within a second at the
cost of a clock read per use.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from tally.errors import StoreUnavailable

T = TypeVar("T")
# what makes a directory a store: any of these (``tally demo`` writes only the events)
STORE_FILES = ("meta.sqlite3", "events.duckdb")

SCHEMA = """
CREATE TABLE IF NOT EXISTS clients (
  client_id TEXT PRIMARY KEY,
  name TEXT NOT NULL,
  secret_salt BLOB NOT NULL,
  secret_hash BLOB NOT NULL,
  scopes TEXT NOT NULL,
  brands TEXT,
  regions TEXT,
  metrics TEXT,
  created_at TEXT NOT NULL,
  disabled INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS signing_keys (
  kid TEXT PRIMARY KEY,
  algorithm TEXT NOT NULL,
  private_pem BLOB NOT NULL,
  created_at TEXT NOT NULL,
  active INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS webhook_secrets (
  client_id TEXT NOT NULL,
  secret TEXT NOT NULL,
  created_at TEXT NOT NULL,
  retired_at TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS webhook_secrets_current
  ON webhook_secrets (client_id) WHERE retired_at IS NULL;
CREATE TABLE IF NOT EXISTS deployment_keys (
  name TEXT PRIMARY KEY,
  key BLOB NOT NULL,
  created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS export_jobs (
  id TEXT PRIMARY KEY,
  client_id TEXT NOT NULL,
  principal TEXT NOT NULL,
  query TEXT NOT NULL,
  format TEXT NOT NULL,
  webhook_url TEXT,
  status TEXT NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0,
  created_at TEXT NOT NULL,
  finished_at TEXT,
  expires_at TEXT,
  rows INTEGER,
  bytes INTEGER,
  sha256 TEXT,
  watermark TEXT,
  error TEXT,
  deliveries TEXT,
  file_deleted INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS export_jobs_by_client ON export_jobs (client_id, created_at);
CREATE TABLE IF NOT EXISTS alerts (
  id TEXT PRIMARY KEY,
  client_id TEXT NOT NULL,
  principal TEXT NOT NULL,
  name TEXT NOT NULL,
  query TEXT NOT NULL,
  condition TEXT NOT NULL,
  webhook_url TEXT NOT NULL,
  every_seconds INTEGER NOT NULL,
  created_at TEXT NOT NULL,
  evaluated_at TEXT,
  data_version INTEGER,
  breaching INTEGER NOT NULL DEFAULT 0,
  error TEXT
);
CREATE INDEX IF NOT EXISTS alerts_by_client ON alerts (client_id);
CREATE TABLE IF NOT EXISTS alert_subjects (
  alert_id TEXT NOT NULL,
  subject TEXT NOT NULL,
  since TEXT NOT NULL,
  PRIMARY KEY (alert_id, subject)
);
CREATE TABLE IF NOT EXISTS alert_events (
  id TEXT PRIMARY KEY,
  alert_id TEXT NOT NULL,
  client_id TEXT NOT NULL,
  type TEXT NOT NULL,
  at TEXT NOT NULL,
  body TEXT NOT NULL,
  status TEXT NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0,
  next_attempt_at REAL NOT NULL,
  last_status INTEGER,
  last_error TEXT,
  delivered_at TEXT
);
CREATE INDEX IF NOT EXISTS alert_events_by_alert ON alert_events (alert_id);
CREATE INDEX IF NOT EXISTS alert_events_pending ON alert_events (status, next_attempt_at);
"""

# Columns added after the first release: (table, column, type). A store made by an older
# version gains them on its next open; old rows read NULL (the column's "not set").
ADDED_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("clients", "min_group_size", "INTEGER"),
    ("clients", "cert_thumbprint", "TEXT"),  # RFC 8705 x5t#S256 of a bound client certificate
    ("signing_keys", "retired_at", "TEXT"),  # set by `tally keys rotate`
    ("clients", "revoked_at", "TEXT"),  # set with disabled = 1 by `tally client revoke`
    ("clients", "secret_rotated_at", "TEXT"),  # by `tally client rotate-secret`
    # epoch seconds: the client's tokens issued (iat) before it are refused (rotate-secret
    # --revoke-tokens); NULL: none
    ("clients", "tokens_not_before", "INTEGER"),
    # a partner's (game studio's) provider ids, comma-separated, like brands; NULL: every one
    ("clients", "providers", "TEXT"),
)


def deployment_key(con: sqlite3.Connection, name: str) -> bytes:
    """The deployment's secret key ``name`` (32 random bytes), made on first use — a write only
    then, since keys are read per link signed or checked."""
    read = "SELECT key FROM deployment_keys WHERE name = ?"
    row = con.execute(read, (name,)).fetchone()
    if row is None:
        made = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        con.execute("INSERT INTO deployment_keys (name, key, created_at) VALUES (?, ?, ?) "
                    "ON CONFLICT DO NOTHING", (name, secrets.token_bytes(32), made))
        row = con.execute(read, (name,)).fetchone()
    return bytes(row[0])


def rotate_deployment_key(con: sqlite3.Connection, name: str) -> None:
    """Replace the key ``name``: whatever it signed stops verifying."""
    con.execute("DELETE FROM deployment_keys WHERE name = ?", (name,))
    deployment_key(con, name)


def add_missing_columns(con: sqlite3.Connection) -> None:
    """The additive migration of :data:`ADDED_COLUMNS`, in one write transaction so two
    processes opening an old store at once do not both add a column."""
    con.execute("BEGIN IMMEDIATE")
    try:
        for table, column, kind in ADDED_COLUMNS:
            present = {row[1] for row in con.execute(f"PRAGMA table_info({table})")}
            if column not in present:
                con.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


def ensure_data_dir(data_dir: Path) -> Path:
    """Create ``data_dir`` if needed and prove it is writable, or raise a clear error."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        probe = data_dir / ".write-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise StoreUnavailable(f"data dir {data_dir} is unusable: {exc.strerror or exc}") from None
    return data_dir


class NoStore(StoreUnavailable):
    """A command that reads a store was pointed at a directory holding none (a typo)."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(f"no Tally store at {data_dir} (no {' or '.join(STORE_FILES)}): "
                         "check --data-dir or TALLY_DATA_DIR")


def require_store(data_dir: Path) -> Path:
    """``data_dir`` if it holds a store; :class:`NoStore` otherwise. Commands that only read
    or change an existing deployment call this first, so a mistyped directory is an error
    instead of an empty answer (and a new, empty store)."""
    if not any((data_dir / name).exists() for name in STORE_FILES):
        raise NoStore(data_dir)
    return data_dir


def connect_existing(data_dir: Path) -> sqlite3.Connection:
    """:func:`connect` to the metadata of an existing store only (:func:`require_store`)."""
    return connect(require_store(data_dir))


def connect(data_dir: Path) -> sqlite3.Connection:
    """The metadata of ``data_dir``, created with the directory if needed (``serve``,
    ``demo`` and ``client create`` make a store; other commands use :func:`connect_existing`)."""
    ensure_data_dir(data_dir)
    path = data_dir / "meta.sqlite3"
    try:
        con = sqlite3.connect(path, timeout=10, isolation_level=None, check_same_thread=False)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=FULL")
        con.executescript(SCHEMA)
        add_missing_columns(con)
    except sqlite3.Error as exc:
        raise StoreUnavailable(f"cannot open metadata {path}: {exc}") from None
    path.chmod(0o600)
    return con


class Watched(Generic[T]):
    """A value loaded from ``meta.sqlite3`` that follows other processes' commits: at most
    once per ``every`` seconds :meth:`get` asks SQLite's ``PRAGMA data_version`` (which moves
    when *another* connection commits) and reloads only when it moved. Between checks a use
    costs a clock read; a change made by ``tally client revoke`` is seen within ``every``."""

    def __init__(self, con: sqlite3.Connection, load: Callable[[sqlite3.Connection], T],
                 every: float = 1.0) -> None:
        self._con, self._load, self.every = con, load, every
        self._lock = threading.Lock()
        self._version = self._data_version()
        self._value = load(con)
        self._checked = time.monotonic()

    def _data_version(self) -> int:
        return int(self._con.execute("PRAGMA data_version").fetchone()[0])

    def get(self) -> T:
        # one thread checks; the others meanwhile use the value they have, never wait
        if time.monotonic() - self._checked >= self.every and self._lock.acquire(False):
            try:
                if time.monotonic() - self._checked >= self.every:
                    version = self._data_version()  # read before loading: never misses one
                    if version != self._version:
                        self._value, self._version = self._load(self._con), version
                    self._checked = time.monotonic()
            finally:
                self._lock.release()
        return self._value


def ping(con: sqlite3.Connection) -> None:
    """Raises ``sqlite3.Error`` when the metadata database does not answer (``/readyz``)."""
    con.execute("SELECT 1").fetchone()


def exclusive_file(path: Path, flags: int, what: str, hint: str = "") -> int:
    """``path`` opened (created ``0o600`` if missing, with ``flags``) under an exclusive
    ``flock`` this process holds until the descriptor is closed: one process a file (the audit
    log, the embedded ClickHouse's folder). ``StoreUnavailable`` in one line naming ``what``
    when it cannot be opened, or when another process holds it (``hint`` appended)."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, flags | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StoreUnavailable(f"{what} {path} is unusable: {exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise StoreUnavailable(f"{what} {path} is in use by another process{hint}") from None
    return fd
