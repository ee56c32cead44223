"""Signed checkpoints of the audit log and the Ed25519 key that signs them, in the metadata
SQLite (``meta.sqlite3``, WAL: readable by ``tally audit verify`` while the server writes).

A checkpoint is a tree head in the shape of a C2SP ``tlog-checkpoint`` note::

    tally/audit/<kid>          origin: this log and the key that signs it
    1024                       tree size (entries 1..1024)
    <base64 root>              RFC 9162 Merkle root over the entries' lines
    time 2025-11-23T22:30:00Z  extension line: when it was signed

signed whole with Ed25519. The other columns (byte length of the log at that size, the Merkle
frontier, the last entry's hash) are not signed: they only let the server resume appending
without re-reading the log, and verification recomputes everything from the log itself.
"""

from __future__ import annotations

import base64
import secrets
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_keys (
  kid TEXT PRIMARY KEY,
  private_pem BLOB NOT NULL,
  public_key TEXT NOT NULL,
  created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_checkpoints (
  tree_size INTEGER PRIMARY KEY,
  root_hash TEXT NOT NULL,
  log_bytes INTEGER NOT NULL,
  frontier TEXT NOT NULL,
  head_hash TEXT NOT NULL,
  signed_at TEXT NOT NULL,
  kid TEXT NOT NULL,
  note TEXT NOT NULL,
  signature TEXT NOT NULL
);
"""
COLUMNS = "tree_size, root_hash, log_bytes, frontier, head_hash, signed_at, kid, note, signature"


@dataclass(frozen=True)
class Checkpoint:
    tree_size: int
    root_hash: str  # hex
    log_bytes: int
    frontier: tuple[str, ...]  # hex
    head_hash: str
    signed_at: str
    kid: str
    note: str
    signature: str  # base64

    def public(self) -> dict[str, object]:
        return {"tree_size": self.tree_size, "root_hash": self.root_hash,
                "signed_at": self.signed_at, "kid": self.kid, "note": self.note,
                "signature": self.signature}


def format_note(kid: str, tree_size: int, root: bytes, signed_at: str) -> str:
    return (f"tally/audit/{kid}\n{tree_size}\n{base64.b64encode(root).decode()}\n"
            f"time {signed_at}\n")


def check_signature(checkpoint: Checkpoint, keys: dict[str, Ed25519PublicKey]) -> str | None:
    """Why ``checkpoint`` cannot be trusted, or None when its signed note vouches for it."""
    key = keys.get(checkpoint.kid)
    if key is None:
        return f"is signed by an unknown key {checkpoint.kid!r}"
    try:
        key.verify(base64.b64decode(checkpoint.signature, validate=True),
                   checkpoint.note.encode())
    except (InvalidSignature, ValueError):
        return "has an invalid signature (checkpoints altered)"
    root = bytes.fromhex(checkpoint.root_hash) if _is_hex(checkpoint.root_hash) else b""
    if checkpoint.note != format_note(checkpoint.kid, checkpoint.tree_size, root,
                                      checkpoint.signed_at):
        return "does not match its signed note (checkpoints altered)"
    return None


def _is_hex(value: str) -> bool:
    try:
        return len(bytes.fromhex(value)) == 32
    except ValueError:
        return False


class Signer:
    """The audit log's own Ed25519 key (not the token signing key), created on first use."""

    def __init__(self, con: sqlite3.Connection) -> None:
        row = con.execute("SELECT kid, private_pem FROM audit_keys ORDER BY created_at").fetchone()
        if row is None:
            key = Ed25519PrivateKey.generate()
            pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
            # INSERT OR IGNORE + re-read: two processes starting at once agree on one key
            con.execute("INSERT OR IGNORE INTO audit_keys VALUES (?, ?, ?, ?)",
                        (secrets.token_hex(8), pem, _public_text(key.public_key()),
                         datetime.now(UTC).isoformat()))
            row = con.execute(
                "SELECT kid, private_pem FROM audit_keys ORDER BY created_at").fetchone()
        loaded = serialization.load_pem_private_key(row[1], password=None)
        assert isinstance(loaded, Ed25519PrivateKey)
        self.kid: str = row[0]
        self._key = loaded

    def sign(self, tree_size: int, root: bytes, log_bytes: int, frontier: list[bytes],
             head_hash: str) -> Checkpoint:
        signed_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        note = format_note(self.kid, tree_size, root, signed_at)
        signature = base64.b64encode(self._key.sign(note.encode())).decode()
        return Checkpoint(tree_size, root.hex(), log_bytes, tuple(n.hex() for n in frontier),
                          head_hash, signed_at, self.kid, note, signature)


def _public_text(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def ensure_schema(con: sqlite3.Connection) -> None:
    con.executescript(SCHEMA)


def insert(con: sqlite3.Connection, checkpoint: Checkpoint) -> None:
    con.execute(f"INSERT OR REPLACE INTO audit_checkpoints ({COLUMNS}) "  # noqa: S608
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (checkpoint.tree_size, checkpoint.root_hash, checkpoint.log_bytes,
                 msgspec.json.encode(list(checkpoint.frontier)).decode(), checkpoint.head_hash,
                 checkpoint.signed_at, checkpoint.kid, checkpoint.note, checkpoint.signature))


def load(con: sqlite3.Connection) -> list[Checkpoint]:
    """Every checkpoint, smallest tree first (none when the tables do not exist yet)."""
    try:
        rows = con.execute(
            f"SELECT {COLUMNS} FROM audit_checkpoints ORDER BY tree_size"  # noqa: S608
        ).fetchall()
    except sqlite3.OperationalError:  # no such table: nothing was ever checkpointed
        return []
    return [Checkpoint(int(r[0]), str(r[1]), int(r[2]),
                       tuple(msgspec.json.decode(r[3], type=list[str])), *map(str, r[4:]))
            for r in rows]


def public_keys(con: sqlite3.Connection) -> dict[str, Ed25519PublicKey]:
    try:
        rows = con.execute("SELECT kid, public_key FROM audit_keys").fetchall()
    except sqlite3.OperationalError:
        return {}
    keys = {}
    for kid, text in rows:
        try:
            keys[str(kid)] = Ed25519PublicKey.from_public_bytes(base64.b64decode(text))
        except ValueError:  # a damaged key: checkpoints signed by it count as unknown-key
            continue
    return keys


def public_key_listing(con: sqlite3.Connection) -> list[dict[str, str]]:
    try:
        rows = con.execute("SELECT kid, public_key, created_at FROM audit_keys").fetchall()
    except sqlite3.OperationalError:
        return []
    return [{"kid": kid, "alg": "Ed25519", "public_key": text, "created_at": created}
            for kid, text, created in rows]


def connect_readonly(data_dir: Path) -> sqlite3.Connection | None:
    """A read-only view of ``meta.sqlite3`` (None when it does not exist): verification must
    not write, and works while the server holds the database in WAL mode."""
    path = data_dir / "meta.sqlite3"
    if not path.exists():
        return None
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10,
                           isolation_level=None, check_same_thread=False)
