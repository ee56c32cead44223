"""OAuth2 clients: registration and secret verification.

Secrets are 256 random bits, so a salted SHA-256 is as strong as a slow KDF here (no password
to guess) and keeps the token endpoint cheap; comparison is constant-time.

A limit (brands, regions, metrics) is either absent — every brand, region, metric — or a
non-empty set. Nothing empty ever means "all": an empty or blank ``--brands`` is refused at
registration, and a stored empty limit (written by anything but :func:`create_client`) refuses
the client its tokens instead of granting it everything.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from tally.errors import BadRequest, Unauthorized

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


def _items(text: str, sep: str = ",") -> frozenset[str]:
    return frozenset(v.strip() for v in text.split(sep) if v.strip())


def _limit(name: str, value: str | None) -> frozenset[str] | None:
    """A limit as given to :func:`create_client`: None (omitted) is no limit; a value naming
    nothing (``""``, ``","``, ``" "``) is an error — it must never widen to "all"."""
    if value is None:
        return None
    items = _items(value)
    if not items:
        raise BadRequest(f"--{name} names no {name} (got {value!r}): give at least one, or omit "
                         f"--{name} for every one; an empty limit never means all")
    return items


class EmptyStoredLimit(Exception):
    """A stored client whose limit is empty text: unusable, never unrestricted."""

    def __init__(self, client_id: str, name: str) -> None:
        super().__init__(f"client {client_id} has an empty {name} limit stored; an empty limit "
                         "never means all: register the client again with the limits it needs")


def _stored_limit(client_id: str, name: str, text: str | None) -> frozenset[str] | None:
    """A limit read back from the store: NULL is no limit, a text naming nothing is refused."""
    if text is None:
        return None
    items = _items(text)
    if not items:
        raise EmptyStoredLimit(client_id, name)
    return items


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
    scope_set = _items(scopes, " ")
    unknown = sorted(scope_set - set(SCOPES))
    if unknown or not scope_set:
        raise BadRequest(f"unknown or missing scopes {unknown}; choose from {' '.join(SCOPES)}")
    limits = (_limit("brands", brands), _limit("regions", regions), _limit("metrics", metrics))
    client_id = "cl_" + secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_bytes(16)
    con.execute(
        "INSERT INTO clients (client_id, name, secret_salt, secret_hash, scopes, brands, regions,"
        " metrics, created_at, min_group_size, cert_thumbprint)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (client_id, name.strip(), salt, _digest(salt, secret), " ".join(sorted(scope_set)),
         *(_join(limit) for limit in limits),
         datetime.now(UTC).isoformat(), min_group_size, cert_thumbprint),
    )
    return client_id, secret


def _digest(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode()).digest()


CLIENT_COLUMNS = ("client_id, name, scopes, brands, regions, metrics, min_group_size,"
                  " cert_thumbprint")


def _client(row: tuple[Any, ...]) -> Client:
    """A stored client (:data:`CLIENT_COLUMNS`); :class:`EmptyStoredLimit` for an empty limit."""
    client_id, name, scopes, brands, regions, metrics, min_group_size, cert = row
    return Client(client_id, name, frozenset(scopes.split()),
                  _stored_limit(client_id, "brands", brands),
                  _stored_limit(client_id, "regions", regions),
                  _stored_limit(client_id, "metrics", metrics), min_group_size, cert)


def authenticate(con: sqlite3.Connection, client_id: str, secret: str) -> Client | None:
    """The client if ``secret`` is its secret (None otherwise, or when it is disabled). A client
    with an empty stored limit is refused (``401 invalid_client`` naming the limit) once its
    secret is proved, so only its owner learns why."""
    row = con.execute(
        f"SELECT secret_salt, secret_hash, {CLIENT_COLUMNS} FROM clients"  # noqa: S608
        " WHERE client_id = ? AND disabled = 0",
        (client_id,),
    ).fetchone()
    if row is None:
        _digest(b"\0" * 16, secret)  # same work either way: no timing oracle on client ids
        return None
    salt, stored, *columns = row
    if not hmac.compare_digest(_digest(salt, secret), stored):
        return None
    try:
        return _client(tuple(columns))
    except EmptyStoredLimit as exc:
        raise Unauthorized(str(exc), error="invalid_client") from None


def registered_clients(con: sqlite3.Connection) -> Iterator[Client]:
    """Every client registered here, disabled ones included (their past calls stay theirs),
    read lazily: the query runs on the first ``next``. A client with an empty stored limit is
    left out: what it may see is unknown, so it is never taken to be inside anyone's limits."""
    rows = con.execute(f"SELECT {CLIENT_COLUMNS} FROM clients").fetchall()  # noqa: S608
    for row in rows:
        try:
            yield _client(row)
        except EmptyStoredLimit:
            continue
