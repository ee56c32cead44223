"""Each client's webhook signing secret (``GET``/``POST /v1/webhook-secret``, CONTRACT §8).

A secret is made on first use (``whsec_`` and 32 random bytes, base64, as Standard Webhooks
writes them) and kept in the metadata database beside the client (``metadata.SCHEMA``).
Rotating makes a new one and retires the old, which still signs alongside it for
:data:`OVERLAP` so that a receiver can switch without missing a delivery: a message then
carries both signatures.
"""

from __future__ import annotations

import base64
import secrets
import sqlite3
import threading
from datetime import UTC, datetime, timedelta

OVERLAP = timedelta(hours=24)  # a retired secret still signs this long
PREFIX = "whsec_"
_lock = threading.Lock()  # one connection, many threads: a rotation is two statements

def _new() -> str:
    return PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def _now() -> datetime:
    return datetime.now(UTC)


def current(con: sqlite3.Connection, client_id: str) -> str:
    """The client's signing secret, made on first use."""
    with _lock:
        con.execute("INSERT INTO webhook_secrets (client_id, secret, created_at) VALUES "
                    "(?, ?, ?) ON CONFLICT DO NOTHING", (client_id, _new(), _now().isoformat()))
        row = con.execute("SELECT secret FROM webhook_secrets WHERE client_id = ? AND "
                          "retired_at IS NULL", (client_id,)).fetchone()
    return str(row[0])


def rotate(con: sqlite3.Connection, client_id: str) -> str:
    """A new secret for the client; the one it replaces signs alongside it for
    :data:`OVERLAP`, and older retired ones are forgotten."""
    now = _now()
    with _lock:
        con.execute("BEGIN IMMEDIATE")
        try:
            con.execute("DELETE FROM webhook_secrets WHERE client_id = ? AND retired_at < ?",
                        (client_id, (now - OVERLAP).isoformat()))
            con.execute("UPDATE webhook_secrets SET retired_at = ? WHERE client_id = ? AND "
                        "retired_at IS NULL", (now.isoformat(), client_id))
            secret = _new()
            con.execute("INSERT INTO webhook_secrets (client_id, secret, created_at) VALUES "
                        "(?, ?, ?)", (client_id, secret, now.isoformat()))
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    return secret


def signing(con: sqlite3.Connection, client_id: str) -> list[str]:
    """The secrets a message to the client is signed with now: the current one first, then
    those retired less than :data:`OVERLAP` ago."""
    newest = current(con, client_id)
    since = (_now() - OVERLAP).isoformat()
    with _lock:
        retired = [str(row[0]) for row in con.execute(
            "SELECT secret FROM webhook_secrets WHERE client_id = ? AND retired_at >= ? "
            "ORDER BY retired_at DESC", (client_id, since))]
    return [newest, *retired]
