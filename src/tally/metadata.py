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
    except sqlite3.Error as exc:
        raise StoreUnavailable(f"cannot open metadata {path}: {exc}") from None
    path.chmod(0o600)
    return con
