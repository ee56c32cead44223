"""An external issuer: tokens from an identity provider, verified against its JWKS.

With ``TALLY_JWKS_URL`` set, this deployment issues no tokens (``POST /oauth/token`` answers
``unsupported_grant_type`` naming the issuer) and accepts the IdP's RFC 9068 access tokens:
``typ: at+jwt``, ``iss`` = ``TALLY_ISSUER``, ``aud`` = ``TALLY_AUDIENCE``, the required claims,
scopes in ``scope`` and optional ``brands``/``regions``/``metrics`` list claims (absent: no
limit). Only EdDSA, ES256 and RS256 are accepted — never an HMAC algorithm, never ``none`` —
and a key is used only for the algorithm its JWK is for.

The JWKS is fetched lazily with httpx, kept for :data:`MAX_AGE_SECONDS`, and refetched early
when a token names an unknown ``kid`` (the IdP rotated), at most once per
``TALLY_JWKS_REFRESH_SECONDS`` so tokens with invented ``kid`` values cannot make us hammer the
IdP. If a refetch fails the keys already known keep working; with none known the answer is
``503``.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from typing import Any

import httpx2 as httpx
import jwt

from tally.config import Settings
from tally.errors import DependencyUnavailable, InvalidToken
from tally.security.tokens import (
    Principal,
    TokenService,
    decode_claims,
    principal_from,
    unverified_header,
)

log = logging.getLogger(__name__)
ALGORITHMS = frozenset({"EdDSA", "ES256", "RS256"})
MAX_AGE_SECONDS = 300.0
MAX_JWKS_BYTES = 1 << 20
TIMEOUT_SECONDS = 5.0
PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


class JwksUnavailable(Exception):
    pass


def fetch_jwks(url: str) -> dict[str, tuple[jwt.PyJWK, dict[str, Any]]]:
    """The usable signing keys of the JWKS at ``url`` by ``kid``, with their JWK: a key with
    no ``kid``, for encryption, with private members, or for an algorithm outside
    :data:`ALGORITHMS` is skipped."""
    try:
        with httpx.Client(timeout=TIMEOUT_SECONDS, follow_redirects=False) as http, \
                http.stream("GET", url, headers={"Accept": "application/json"}) as response:
            response.raise_for_status()
            body = b""
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise JwksUnavailable(f"JWKS at {url} is larger than {MAX_JWKS_BYTES} bytes")
        document = json.loads(body)
    except (httpx.HTTPError, ValueError) as exc:
        raise JwksUnavailable(f"cannot fetch JWKS from {url}: {exc}") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise JwksUnavailable(f"{url} is not a JWKS (no \"keys\" list)")
    keys: dict[str, tuple[jwt.PyJWK, dict[str, Any]]] = {}
    for data in entries:
        if (not isinstance(data, dict) or not isinstance(data.get("kid"), str)
                or data.get("use", "sig") != "sig" or PRIVATE_MEMBERS & data.keys()):
            continue
        try:
            key = jwt.PyJWK(data)
        except (jwt.PyJWKError, jwt.InvalidKeyError):
            continue
        if key.algorithm_name in ALGORITHMS:
            keys[data["kid"]] = (key, data)
    return keys


class ExternalIssuer:
    """Verifies an identity provider's tokens; issues none."""

    algorithms = ALGORITHMS

    def __init__(self, url: str, issuer: str, audience: str, refresh_seconds: float) -> None:
        self.url, self.issuer, self.audience = url, issuer, audience
        self.refresh_seconds = refresh_seconds
        self._keys: dict[str, tuple[jwt.PyJWK, dict[str, Any]]] = {}
        self._fetched_at: float | None = None  # monotonic time of the last successful fetch
        self._tried_at = -float("inf")  # of the last attempt, successful or not
        self._lock = threading.Lock()

    def _refresh(self) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._tried_at < self.refresh_seconds:
                return  # another thread just did, or a recent attempt failed: rate limit
            self._tried_at = now
            try:
                self._keys = fetch_jwks(self.url)
            except JwksUnavailable as exc:
                log.warning("jwks refresh failed", extra={"detail": str(exc)})
                if self._fetched_at is None:
                    raise DependencyUnavailable(
                        "cannot verify tokens now: the identity provider's keys are "
                        "unavailable", retry_after=int(self.refresh_seconds)) from None
                return
            self._fetched_at = now

    def _key(self, kid: str) -> jwt.PyJWK | None:
        stale = (self._fetched_at is None
                 or time.monotonic() - self._fetched_at >= MAX_AGE_SECONDS)
        if stale or kid not in self._keys:
            self._refresh()
        found = self._keys.get(kid)
        return None if found is None else found[0]

    def verify(self, token: str) -> Principal:
        header = unverified_header(token, self.algorithms)
        key = self._key(header["kid"])
        if key is None:
            raise InvalidToken("token signed with a key the identity provider does not publish")
        if key.algorithm_name != header["alg"]:
            raise InvalidToken(f"key {header['kid']!r} is for {key.algorithm_name}, "
                               f"not {header['alg']}")
        return principal_from(decode_claims(token, key.key, header["alg"], self.issuer,
                                            self.audience))

    def jwks(self) -> dict[str, Any]:
        """The identity provider's keys this deployment accepts (public members only)."""
        if self._fetched_at is None:
            self._refresh()
        return {"keys": [dict(data) for _, data in self._keys.values()]}


def authority_for(settings: Settings, meta: sqlite3.Connection) -> TokenService | ExternalIssuer:
    """Who vouches for tokens here: the IdP of ``TALLY_JWKS_URL``, else this deployment."""
    if settings.jwks_url:
        return ExternalIssuer(settings.jwks_url, settings.issuer, settings.audience,
                              settings.jwks_refresh_seconds)
    return TokenService(meta, settings.issuer, settings.audience, settings.token_ttl_seconds)
