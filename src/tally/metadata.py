"""Operator metadata (clients, signing keys) in SQLite beside the event store.

DuckDB allows one writing process, and ``tally serve`` is it; SQLite in WAL mode lets the
operator's commands (``tally client create``) write while the server runs.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from tally.errors import StoreUnavailable

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
"""

# Columns added after the first release: (table, column, type). A store made by an older
# version gains them on its next open; old rows read NULL (the column's "not set").
ADDED_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("clients", "min_group_size", "INTEGER"),
    ("clients", "cert_thumbprint", "TEXT"),  # RFC 8705 x5t#S256 of a bound client certificate
    ("signing_keys", "retired_at", "TEXT"),  # set by `tally keys rotate`
)


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


def connect(data_dir: Path) -> sqlite3.Connection:
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
