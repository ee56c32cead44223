"""OAuth2 clients: registration and secret verification.

Secrets are 256 random bits, so a salted SHA-256 is as strong as a slow KDF here (no password
to guess) and keeps the token endpoint cheap; comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime

from tally.errors import BadRequest

SCOPES = ("events:write", "analytics:read", "exports:write", "admin")
MAX_MIN_GROUP_SIZE = 1000


@dataclass(frozen=True)
class Client:
    client_id: str
    name: str
    scopes: frozenset[str]
    brands: frozenset[str] | None  # None: every brand
    regions: frozenset[str] | None
    metrics: frozenset[str] | None
    min_group_size: int | None = None  # privacy: smallest distinct-player count shown
    cert_thumbprint: str | None = None  # RFC 8705: tokens only over this certificate (mTLS)


def _split(value: str | None, sep: str = ",") -> frozenset[str] | None:
    if value is None:
        return None
    items = frozenset(v.strip() for v in value.split(sep) if v.strip())
    return items or None


def _join(items: frozenset[str] | None) -> str | None:
    return None if items is None else ",".join(sorted(items))


def create_client(con: sqlite3.Connection, name: str, scopes: str, brands: str | None = None,
                  regions: str | None = None, metrics: str | None = None,
                  min_group_size: int | None = None,
                  cert_thumbprint: str | None = None) -> tuple[str, str]:
    """Register a client; returns ``(client_id, client_secret)``. The secret is shown once."""
    if not name.strip():
        raise BadRequest("client name must not be empty")
    if min_group_size is not None and not 1 <= min_group_size <= MAX_MIN_GROUP_SIZE:
        raise BadRequest(f"min group size must be 1..{MAX_MIN_GROUP_SIZE}")
    scope_set = _split(scopes, " ") or frozenset()
    unknown = sorted(scope_set - set(SCOPES))
    if unknown or not scope_set:
        raise BadRequest(f"unknown or missing scopes {unknown}; choose from {' '.join(SCOPES)}")
    client_id = "cl_" + secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_bytes(16)
    con.execute(
        "INSERT INTO clients (client_id, name, secret_salt, secret_hash, scopes, brands, regions,"
        " metrics, created_at, min_group_size, cert_thumbprint)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (client_id, name.strip(), salt, _digest(salt, secret), " ".join(sorted(scope_set)),
         _join(_split(brands)), _join(_split(regions)), _join(_split(metrics)),
         datetime.now(UTC).isoformat(), min_group_size, cert_thumbprint),
    )
    return client_id, secret


def _digest(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode()).digest()


def authenticate(con: sqlite3.Connection, client_id: str, secret: str) -> Client | None:
    row = con.execute(
        "SELECT name, secret_salt, secret_hash, scopes, brands, regions, metrics, min_group_size,"
        " cert_thumbprint FROM clients"
        " WHERE client_id = ? AND disabled = 0",
        (client_id,),
    ).fetchone()
    if row is None:
        _digest(b"\0" * 16, secret)  # same work either way: no timing oracle on client ids
        return None
    name, salt, stored, scopes, brands, regions, metrics, min_group_size, cert = row
    if not hmac.compare_digest(_digest(salt, secret), stored):
        return None
    return Client(client_id, name, frozenset(scopes.split()), _split(brands), _split(regions),
                  _split(metrics), min_group_size, cert)
