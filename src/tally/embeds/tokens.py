"""Embed tokens (CONTRACT §9): a JWT (HS256) signed with a key of the deployment, made on
first use in the metadata database and never used for anything else, that carries the whole
widget — its stored query, chart, title, refresh period, expiry — and its creator's limits
(brands, regions, metrics, providers, group size) as locked parameters. The page and its data
request read everything from the token and nothing from the request, so nothing a viewer
sends can widen what it shows; a changed byte, an expired token, or a token signed by a
replaced key (``tally keys rotate-embed-key``) is refused (``403``).

The token's audience is its own (``tally-embed``) and its key is not an access-token key: an
embed token is never a bearer token, and a bearer token is never an embed token.
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

import jwt

from tally.errors import Forbidden
from tally.metadata import deployment_key
from tally.security.tokens import Principal, principal_of_record, principal_record

KEY_NAME = "embed_tokens"
ALGORITHM = "HS256"
AUDIENCE = "tally-embed"
MAX_TTL_SECONDS = 86_400
DEFAULT_TTL_SECONDS = 3_600
MIN_REFRESH_SECONDS = 10
MAX_TOKEN_CHARS = 6_000  # a URL path every browser and proxy carries
# the charts, and the kinds of query each can draw
CHARTS: dict[str, frozenset[str]] = {
    "line": frozenset({"timeseries", "retention", "ltv"}),
    "bar": frozenset({"timeseries", "slice", "funnel", "retention"}),
    "table": frozenset({"timeseries", "slice", "funnel", "retention", "ltv"}),
    "funnel": frozenset({"funnel"}),
}


class EmbedRefused(Forbidden):
    code = "embed-refused"
    doc = ("The embed link is tampered with, expired, signed by a replaced key, or its "
           "creator's client was revoked: ask its creator for a new one (POST /v1/embeds).")


@dataclass(frozen=True)
class Embed:
    id: str
    query: dict[str, Any]  # {"kind", "params"} (insights/kinds.py)
    chart: str
    title: str | None
    refresh_seconds: int | None
    issued_at: int
    expires_at: int
    creator: dict[str, Any]  # the creator's principal (security/tokens.principal_record)

    def principal(self) -> Principal:
        """Who the widget reads as: its creator's limits, reading analytics only."""
        return principal_of_record(self.creator)


def make(principal: Principal, query: dict[str, Any], chart: str, title: str | None,
         ttl_seconds: int, refresh_seconds: int | None) -> Embed:
    now = int(time.time())
    creator = principal_record(principal) | {"scopes": ["analytics:read"],
                                             "cert_thumbprint": None}
    return Embed(f"emb_{secrets.token_hex(12)}", query, chart, title, refresh_seconds, now,
                 now + ttl_seconds, creator)


def sign(con: sqlite3.Connection, embed: Embed) -> str:
    claims = {"aud": AUDIENCE, "jti": embed.id, "iat": embed.issued_at,
              "exp": embed.expires_at, "query": embed.query, "chart": embed.chart,
              "title": embed.title, "refresh": embed.refresh_seconds, "creator": embed.creator}
    return jwt.encode(claims, deployment_key(con, KEY_NAME), algorithm=ALGORITHM)


def verify(con: sqlite3.Connection, token: str) -> Embed:
    """The embed a token carries, or :class:`EmbedRefused` saying why not."""
    if len(token) > MAX_TOKEN_CHARS:
        raise EmbedRefused("the embed link is not one Tally made")
    try:
        claims = jwt.decode(token, deployment_key(con, KEY_NAME), algorithms=[ALGORITHM],
                            audience=AUDIENCE,
                            options={"require": ["aud", "jti", "iat", "exp"]})
    except jwt.ExpiredSignatureError:
        raise EmbedRefused("the embed link has expired: ask its creator for a new one") \
            from None
    except jwt.InvalidTokenError:
        raise EmbedRefused("the embed link is not valid (tampered with, or signed by a "
                           "replaced key)") from None
    try:
        return Embed(str(claims["jti"]), dict(claims["query"]), str(claims["chart"]),
                     claims["title"], claims["refresh"], int(claims["iat"]),
                     int(claims["exp"]), dict(claims["creator"]))
    except (KeyError, TypeError, ValueError):  # signed by us, so never: but not a 500
        raise EmbedRefused("the embed link is not one Tally made") from None

