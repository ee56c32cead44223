"""Token signing keys: Ed25519, persisted in ``meta.sqlite3``, rotated by ``tally keys rotate``.

One key is active (it signs). Rotating makes a new active key and *retires* the old ones: a
retired key no longer signs but stays in the JWKS and keeps verifying for
:data:`RETIREMENT_GRACE` seconds (the longest token lifetime plus the clock-skew leeway), so
every token signed before the rotation lives out its life. After that it verifies nothing and
the next rotation deletes it. ``--revoke`` retires the old keys with no grace (a leaked key):
their tokens fail at once.

``tally serve`` learns of a rotation made by another process within :data:`RELOAD_SECONDS`:
the key ring checks SQLite's ``data_version`` (a counter bumped by other connections' commits)
at most that often, and reloads only when it moved.
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ALGORITHM = "EdDSA"
MAX_TOKEN_SECONDS = 900  # the cap on TALLY_TOKEN_TTL_SECONDS
LEEWAY_SECONDS = 30  # clock skew allowed on exp, nbf and iat
RETIREMENT_GRACE = MAX_TOKEN_SECONDS + LEEWAY_SECONDS
RELOAD_SECONDS = 1.0
INSERT_KEY = ("INSERT INTO signing_keys (kid, algorithm, private_pem, created_at, active)"
              " VALUES (?, ?, ?, ?, 1)")


@dataclass(frozen=True)
class SigningKey:
    kid: str
    private: Ed25519PrivateKey
    public: Ed25519PublicKey
    created_at: datetime
    retired_at: datetime | None  # None: the active key

    def verifies_at(self, now: datetime) -> bool:
        return self.retired_at is None or (now - self.retired_at).total_seconds() < \
            RETIREMENT_GRACE


def _now() -> datetime:
    return datetime.now(UTC)


def _new_key_row(now: datetime) -> tuple[str, str, bytes, str]:
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return secrets.token_hex(8), ALGORITHM, pem, now.isoformat()


def ensure_active_key(con: sqlite3.Connection) -> None:
    """Create the first key of a new store (two processes starting at once agree on one)."""
    con.execute("BEGIN IMMEDIATE")
    try:
        if con.execute("SELECT 1 FROM signing_keys WHERE active = 1").fetchone() is None:
            con.execute(INSERT_KEY, _new_key_row(_now()))
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


def rotate(con: sqlite3.Connection, revoke: bool = False) -> dict[str, object]:
    """A new active key; the previous ones retire (with grace, or none with ``revoke``).
    Keys whose grace is over are deleted. Returns what changed, for the operator."""
    now = _now()
    retired_at = now if not revoke else datetime.fromtimestamp(0, UTC)
    con.execute("BEGIN IMMEDIATE")
    try:
        retiring = [r[0] for r in con.execute("SELECT kid FROM signing_keys WHERE active = 1")]
        con.execute("UPDATE signing_keys SET active = 0, retired_at = ? WHERE active = 1",
                    (retired_at.isoformat(),))
        cutoff = datetime.fromtimestamp(now.timestamp() - RETIREMENT_GRACE, UTC).isoformat()
        expired = "active = 0 AND (retired_at IS NULL OR retired_at <= ?)"
        deleted = [r[0] for r in con.execute(
            f"SELECT kid FROM signing_keys WHERE {expired}", (cutoff,))]  # noqa: S608
        con.execute(f"DELETE FROM signing_keys WHERE {expired}", (cutoff,))  # noqa: S608
        row = _new_key_row(now)
        con.execute(INSERT_KEY, row)
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    return {"active": row[0], "retired": sorted(set(retiring) - set(deleted)),
            "deleted": sorted(deleted),
            "verifies_until": None if revoke else datetime.fromtimestamp(
                now.timestamp() + RETIREMENT_GRACE, UTC).isoformat()}


def list_keys(con: sqlite3.Connection) -> list[dict[str, object]]:
    now = _now()
    return [{"kid": k.kid, "created_at": k.created_at.isoformat(),
             "state": "active" if k.retired_at is None
             else "retired" if k.verifies_at(now) else "expired",
             "retired_at": k.retired_at.isoformat() if k.retired_at else None}
            for k in _load(con)]


def _load(con: sqlite3.Connection) -> list[SigningKey]:
    keys = []
    for kid, pem, created_at, active, retired_at in con.execute(
        "SELECT kid, private_pem, created_at, active, retired_at FROM signing_keys"
        " ORDER BY created_at, kid"
    ):
        private = serialization.load_pem_private_key(pem, password=None)
        assert isinstance(private, Ed25519PrivateKey)
        retired = None if active else (datetime.fromisoformat(retired_at) if retired_at
                                       else datetime.fromtimestamp(0, UTC))
        keys.append(SigningKey(kid, private, private.public_key(),
                               datetime.fromisoformat(created_at), retired))
    return keys


class KeyRing:
    """The keys of one process: the active one signs, every unexpired one verifies."""

    def __init__(self, con: sqlite3.Connection) -> None:
        self._con = con
        self._lock = threading.Lock()
        ensure_active_key(con)
        self._version = self._data_version()
        self._checked = time.monotonic()
        self._keys = {k.kid: k for k in _load(con)}

    def _data_version(self) -> int:
        return int(self._con.execute("PRAGMA data_version").fetchone()[0])

    def _refresh(self) -> None:
        if time.monotonic() - self._checked < RELOAD_SECONDS:
            return
        with self._lock:
            if time.monotonic() - self._checked < RELOAD_SECONDS:
                return
            version = self._data_version()
            if version != self._version:
                self._keys = {k.kid: k for k in _load(self._con)}
                self._version = version
            self._checked = time.monotonic()

    @property
    def active(self) -> SigningKey:
        self._refresh()
        # the newest active key (two processes may each have created one on a new store)
        return [k for k in self._keys.values() if k.retired_at is None][-1]

    def verifying(self, kid: str) -> SigningKey | None:
        """The key ``kid`` if it may verify now; None when unknown, expired or revoked."""
        self._refresh()
        key = self._keys.get(kid)
        return key if key is not None and key.verifies_at(_now()) else None

    def published(self) -> list[SigningKey]:
        """The keys a verifier needs now: the active one and retired ones in their grace."""
        self._refresh()
        now = _now()
        return [k for k in self._keys.values() if k.verifies_at(now)]
