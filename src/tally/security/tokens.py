"""Short-lived access tokens: JWTs (RFC 9068 profile) signed with a persisted Ed25519 key."""

from __future__ import annotations

import secrets
import sqlite3
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from jwt.algorithms import OKPAlgorithm

from tally.errors import Unauthorized
from tally.security.clients import Client

ALGORITHM = "EdDSA"
TOKEN_TYPE = "at+jwt"  # noqa: S105 - a media type, not a secret
LEEWAY_SECONDS = 30


@dataclass(frozen=True)
class Principal:
    """Who is calling, from a verified token: the limits every request is held to."""

    client_id: str
    scopes: frozenset[str]
    brands: frozenset[str] | None
    regions: frozenset[str] | None
    metrics: frozenset[str] | None
    token_id: str


def _claim_list(items: frozenset[str] | None) -> list[str] | None:
    return None if items is None else sorted(items)


def _claim_set(value: Any) -> frozenset[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise Unauthorized("token has a malformed claim")
    return frozenset(value)


class TokenService:
    def __init__(self, con: sqlite3.Connection, issuer: str, audience: str, ttl: int) -> None:
        self.issuer, self.audience, self.ttl = issuer, audience, ttl
        self._keys: dict[str, Ed25519PrivateKey] = {}
        self._active_kid = self._load_or_create(con)

    def _load_or_create(self, con: sqlite3.Connection) -> str:
        rows = con.execute(
            "SELECT kid, private_pem, active FROM signing_keys ORDER BY created_at"
        ).fetchall()
        if not rows:
            key = Ed25519PrivateKey.generate()
            kid = secrets.token_hex(8)
            pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
            # INSERT OR IGNORE + re-read: two processes starting at once agree on one key.
            con.execute("INSERT OR IGNORE INTO signing_keys VALUES (?, ?, ?, ?, 1)",
                        (kid, ALGORITHM, pem, datetime.now(UTC).isoformat()))
            rows = con.execute(
                "SELECT kid, private_pem, active FROM signing_keys ORDER BY created_at"
            ).fetchall()
        active = rows[0][0]
        for kid, pem, is_active in rows:
            loaded = serialization.load_pem_private_key(pem, password=None)
            assert isinstance(loaded, Ed25519PrivateKey)
            self._keys[kid] = loaded
            if is_active:
                active = kid
        return str(active)

    def issue(self, client: Client, scopes: frozenset[str]) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer, "aud": self.audience, "sub": client.client_id,
            "client_id": client.client_id, "iat": now, "nbf": now, "exp": now + self.ttl,
            "jti": secrets.token_hex(12), "scope": " ".join(sorted(scopes)),
            "brands": _claim_list(client.brands), "regions": _claim_list(client.regions),
            "metrics": _claim_list(client.metrics),
        }
        token = jwt.encode(claims, self._keys[self._active_kid], algorithm=ALGORITHM,
                           headers={"kid": self._active_kid, "typ": TOKEN_TYPE})
        return {"access_token": token, "token_type": "Bearer", "expires_in": self.ttl,
                "scope": claims["scope"]}

    def verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise Unauthorized("malformed bearer token") from None
        if header.get("typ") != TOKEN_TYPE:
            raise Unauthorized(f"token type must be {TOKEN_TYPE}")
        key = self._keys.get(str(header.get("kid")))
        if key is None:
            raise Unauthorized("token signed with an unknown key")
        try:
            claims = jwt.decode(
                token, key.public_key(), algorithms=[ALGORITHM], audience=self.audience,
                issuer=self.issuer, leeway=LEEWAY_SECONDS,
                options={"require": ["exp", "iat", "iss", "aud", "sub", "jti", "client_id"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("token has expired") from None
        except jwt.InvalidTokenError as exc:
            raise Unauthorized(f"invalid token: {exc}") from None
        return Principal(
            client_id=str(claims["client_id"]),
            scopes=frozenset(str(claims.get("scope", "")).split()),
            brands=_claim_set(claims.get("brands")),
            regions=_claim_set(claims.get("regions")),
            metrics=_claim_set(claims.get("metrics")),
            token_id=str(claims["jti"]),
        )

    def jwks(self) -> dict[str, Any]:
        keys = []
        for kid, key in self._keys.items():
            public: Ed25519PublicKey = key.public_key()
            jwk: dict[str, Any] = OKPAlgorithm.to_jwk(public, as_dict=True)
            jwk.update({"kid": kid, "alg": ALGORITHM, "use": "sig"})
            keys.append(jwk)
        return {"keys": keys}
