"""OAuth2 clients: registration and secret verification.

Secrets are 256 random bits, so a salted SHA-256 is as strong as a slow KDF here (no password
to guess) and keeps the token endpoint cheap; comparison is constant-time.

A limit (brands, regions, providers, metrics) is either absent — every brand, region,
provider, metric — or a non-empty set. Nothing empty ever means "all": an empty or blank
``--brands`` is refused at registration, and a stored empty limit (written by anything but
:func:`create_client`) refuses the client its tokens instead of granting it everything.

``tally client create`` also checks every limit against what exists (:func:`check_limits`):
brand and provider ids by the events' ``tenant_id``/``provider_id`` rule, regions against the
served ones, metrics against the catalog and the analyses the claim names (CONTRACT §6) — a
typo must not register a client that silently sees nothing. A client limited to providers is
a *partner* (a game studio): what that means for its reads is the policy module's call.

Revocation (``tally client revoke``) sets ``disabled``: the client gets no token, and
:class:`ClientStates` makes the server refuse the tokens it already holds within a second.
``rotate-secret`` replaces the secret at once; the tokens already issued live out their
lifetime (≤ 900 s) unless it is asked to refuse them too (``tokens_not_before``). Every
change is dated in the row (``revoked_at``, ``secret_rotated_at``): the audit log is the
running server's alone (it holds its lock), so the operator's actions are recorded here.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, get_args

import msgspec

from tally import metadata
from tally.errors import BadRequest, InvalidClient, InvalidToken
from tally.events.payloads import Id
from tally.semantic.catalog import METRICS

SCOPES = ("events:write", "analytics:read", "exports:write", "admin")
ANALYSES = ("funnel", "retention", "ltv")  # CONTRACT §6: the metrics claim names these too
# the catalog metrics an analysis is of: LTV is of ggr or ngr, whichever it asks for, and needs
# that metric in the claim as well as "ltv" (CONTRACT §6)
ANALYSIS_METRICS: dict[str, tuple[str, ...]] = {"ltv": ("ggr", "ngr")}
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
    providers: frozenset[str] | None = None  # a partner's game providers; None: every one


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


def _is_id(value: str) -> bool:
    try:
        msgspec.convert(value, Id)  # the envelope's tenant_id and provider_id rule, one definition
    except msgspec.ValidationError:
        return False
    return True


def _quoted(names: Collection[str]) -> str:
    return ", ".join(repr(n) for n in sorted(names))


def _bad_ids(option: str, names: str | None, field: str) -> None:
    """:class:`BadRequest` naming the values of ``option`` that break the events' id rule."""
    bad = [v if len(v) <= 40 else v[:40] + "…" for v in _items(names or "") if not _is_id(v)]
    if bad:
        meta = get_args(Id)[1]
        raise BadRequest(f"--{option}: {_quoted(bad)} is not a {option[:-1]} id (the events' "
                         f"{field}: {meta.min_length}-{meta.max_length} characters)")


def check_limits(brands: str | None, regions: str | None, metrics: str | None,
                 served_regions: Collection[str], providers: str | None = None) -> None:
    """Every named brand, region, provider and metric exists, or :class:`BadRequest` naming
    the unknown ones: a brand id follows the events' ``tenant_id`` rule and a provider id their
    ``provider_id`` rule, a region is served here, a metric is in the catalog or is one of
    :data:`ANALYSES`."""
    _bad_ids("brands", brands, "tenant_id")
    unknown = _items(regions or "") - set(served_regions)
    if unknown:
        raise BadRequest(f"--regions: unknown region {_quoted(unknown)}; this deployment "
                         f"serves {', '.join(sorted(served_regions))} (TALLY_REGIONS)")
    _bad_ids("providers", providers, "provider_id")
    unknown = _items(metrics or "") - set(METRICS) - set(ANALYSES)
    if unknown:
        raise BadRequest(f"--metrics: unknown metric {_quoted(unknown)}; metrics are "
                         f"{', '.join(sorted(METRICS))} and the analyses {', '.join(ANALYSES)}")


def _join(items: frozenset[str] | None) -> str | None:
    return None if items is None else ",".join(sorted(items))


def create_client(con: sqlite3.Connection, name: str, scopes: str, brands: str | None = None,
                  regions: str | None = None, metrics: str | None = None,
                  min_group_size: int | None = None,
                  cert_thumbprint: str | None = None,
                  providers: str | None = None) -> tuple[str, str]:
    """Register a client; returns ``(client_id, client_secret)``. The secret is shown once."""
    if not name.strip():
        raise BadRequest("client name must not be empty")
    if min_group_size is not None and not 1 <= min_group_size <= MAX_MIN_GROUP_SIZE:
        raise BadRequest(f"min group size must be 1..{MAX_MIN_GROUP_SIZE}")
    scope_set = _items(scopes, " ")
    unknown = sorted(scope_set - set(SCOPES))
    if unknown or not scope_set:
        raise BadRequest(f"unknown or missing scopes {unknown}; choose from {' '.join(SCOPES)}")
    limits = (_limit("brands", brands), _limit("regions", regions), _limit("metrics", metrics),
              _limit("providers", providers))
    client_id = "cl_" + secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_bytes(16)
    con.execute(
        "INSERT INTO clients (client_id, name, secret_salt, secret_hash, scopes, brands, regions,"
        " metrics, providers, created_at, min_group_size, cert_thumbprint)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (client_id, name.strip(), salt, _digest(salt, secret), " ".join(sorted(scope_set)),
         *(_join(limit) for limit in limits),
         datetime.now(UTC).isoformat(), min_group_size, cert_thumbprint),
    )
    return client_id, secret


def _digest(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode()).digest()


CLIENT_COLUMNS = ("client_id, name, scopes, brands, regions, metrics, min_group_size,"
                  " cert_thumbprint, providers")


def _client(row: tuple[Any, ...]) -> Client:
    """A stored client (:data:`CLIENT_COLUMNS`); :class:`EmptyStoredLimit` for an empty limit."""
    client_id, name, scopes, brands, regions, metrics, min_group_size, cert, providers = row
    return Client(client_id, name, frozenset(scopes.split()),
                  _stored_limit(client_id, "brands", brands),
                  _stored_limit(client_id, "regions", regions),
                  _stored_limit(client_id, "metrics", metrics), min_group_size, cert,
                  _stored_limit(client_id, "providers", providers))


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
        raise InvalidClient(str(exc)) from None


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


# ------------------------------------------------------------------ the operator's commands


class UnknownClient(LookupError):
    def __init__(self, client_id: str) -> None:
        super().__init__(f"no client {client_id!r} in this store (see tally client list)")


class RevokedClient(Exception):
    def __init__(self, client_id: str) -> None:
        super().__init__(f"client {client_id} is revoked: register a new one instead")


@dataclass(frozen=True)
class ClientRecord:
    """What the operator sees of a client (never its secret or the secret's hash)."""

    client_id: str
    name: str
    scopes: tuple[str, ...]
    brands: tuple[str, ...] | None  # None: every brand; () a stored empty limit (refused)
    regions: tuple[str, ...] | None
    metrics: tuple[str, ...] | None
    providers: tuple[str, ...] | None  # a partner's (game studio's) providers; None: all
    min_group_size: int | None
    cert_thumbprint: str | None
    created_at: str
    revoked: bool
    revoked_at: str | None
    secret_rotated_at: str | None
    tokens_not_before: int | None  # epoch s: tokens issued before it are refused

    @property
    def status(self) -> str:
        return "revoked" if self.revoked else "active"

    @property
    def tokens_not_before_at(self) -> str | None:
        if self.tokens_not_before is None:
            return None
        return datetime.fromtimestamp(self.tokens_not_before, UTC).isoformat()

    def public(self) -> dict[str, Any]:
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__}
        lists = {k: list(v) for k, v in fields.items() if isinstance(v, tuple)}
        return {**fields, **lists, "status": self.status,
                "tokens_not_before": self.tokens_not_before_at}


RECORD_COLUMNS = ("client_id, name, scopes, brands, regions, metrics, providers,"
                  " min_group_size, cert_thumbprint, created_at, disabled, revoked_at,"
                  " secret_rotated_at, tokens_not_before")


def _stored_list(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(sorted(_items(text)))


def _record(row: tuple[Any, ...]) -> ClientRecord:
    (client_id, name, scopes, brands, regions, metrics, providers, min_group_size, cert,
     created_at, disabled, revoked_at, rotated_at, not_before) = row
    return ClientRecord(client_id, name, tuple(sorted(scopes.split())), _stored_list(brands),
                        _stored_list(regions), _stored_list(metrics), _stored_list(providers),
                        min_group_size, cert, created_at, bool(disabled), revoked_at, rotated_at,
                        not_before)


def client_records(con: sqlite3.Connection) -> list[ClientRecord]:
    """Every client, oldest first."""
    rows = con.execute(f"SELECT {RECORD_COLUMNS} FROM clients"  # noqa: S608
                       " ORDER BY created_at, client_id").fetchall()
    return [_record(row) for row in rows]


def client_record(con: sqlite3.Connection, client_id: str) -> ClientRecord:
    """The client ``client_id``, or :class:`UnknownClient`."""
    row = con.execute(f"SELECT {RECORD_COLUMNS} FROM clients"  # noqa: S608
                      " WHERE client_id = ?", (client_id,)).fetchone()
    if row is None:
        raise UnknownClient(client_id)
    return _record(row)


def revoke_client(con: sqlite3.Connection, client_id: str) -> tuple[ClientRecord, bool]:
    """Disable ``client_id`` for good: no new token, and its tokens refused by a running
    server within a second (:class:`ClientStates`). Returns the client and whether this call
    revoked it (False: it already was; its ``revoked_at`` is kept)."""
    con.execute("BEGIN IMMEDIATE")
    try:
        before = client_record(con, client_id)
        if not before.revoked:
            con.execute("UPDATE clients SET disabled = 1, revoked_at = ? WHERE client_id = ?",
                        (datetime.now(UTC).isoformat(), client_id))
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    return client_record(con, client_id), not before.revoked


def rotate_secret(con: sqlite3.Connection, client_id: str,
                  revoke_tokens: bool = False) -> tuple[ClientRecord, str]:
    """A new secret for ``client_id`` (returned once); the old one gets no token from now on.
    Tokens already issued stay valid until they expire, unless ``revoke_tokens``: then every
    token issued up to this second is refused within a second (a leaked secret)."""
    secret, salt = secrets.token_urlsafe(32), secrets.token_bytes(16)
    now = datetime.now(UTC)
    con.execute("BEGIN IMMEDIATE")
    try:
        if client_record(con, client_id).revoked:
            raise RevokedClient(client_id)
        con.execute("UPDATE clients SET secret_salt = ?, secret_hash = ?, secret_rotated_at = ?"
                    " WHERE client_id = ?",
                    (salt, _digest(salt, secret), now.isoformat(), client_id))
        if revoke_tokens:  # iat is whole seconds: this second's tokens may predate the change
            con.execute("UPDATE clients SET tokens_not_before = ? WHERE client_id = ?",
                        (int(now.timestamp()) + 1, client_id))
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    return client_record(con, client_id), secret


# ------------------------------------------------------------ what a running server refuses


@dataclass(frozen=True)
class Refusals:
    revoked: frozenset[str]
    not_before: dict[str, int]  # client id → tokens issued (iat) before it are refused


def _refusals(con: sqlite3.Connection) -> Refusals:
    rows = con.execute("SELECT client_id, disabled, tokens_not_before FROM clients"
                       " WHERE disabled != 0 OR tokens_not_before IS NOT NULL").fetchall()
    return Refusals(frozenset(r[0] for r in rows if r[1]),
                    {r[0]: int(r[2]) for r in rows if r[2] is not None})


class ClientStates:
    """Which clients' tokens a running server refuses: revoked clients', and those issued
    before a ``rotate-secret --revoke-tokens``. Read from ``meta.sqlite3`` and refreshed at
    most once a second when another process committed (:class:`tally.metadata.Watched`): a
    dictionary lookup per request, a ``PRAGMA data_version`` per second."""

    def __init__(self, con: sqlite3.Connection) -> None:
        self._refusals = metadata.Watched(con, _refusals)

    def check(self, client_id: str, issued_at: float) -> None:
        """:class:`Unauthorized` if a token of ``client_id`` issued at ``issued_at`` (epoch
        seconds) may no longer be used."""
        refusals = self._refusals.get()
        if client_id in refusals.revoked:
            raise InvalidToken(f"client {client_id} has been revoked")
        not_before = refusals.not_before.get(client_id)
        if not_before is not None and issued_at < not_before:
            raise InvalidToken("token was issued before its client's secret was rotated: "
                               "get a new one with the new secret")
