"""Short-lived access tokens: JWTs (RFC 9068 profile), hardened per RFC 8725.

Verification is the same for the built-in issuer (:class:`TokenService`, Ed25519 keys in
``meta.sqlite3``, see :mod:`tally.security.keys`) and an external one
(:class:`tally.security.jwks.ExternalIssuer`): :func:`unverified_header` checks the header
against an algorithm allow-list before a key is chosen, :func:`decode_claims` the signature
and claims, :func:`principal_from` turns claims into the caller's limits.
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import jwt
from jwt.algorithms import OKPAlgorithm

from tally.errors import InvalidToken
from tally.security.clients import Client, ClientStates
from tally.security.keys import ALGORITHM, LEEWAY_SECONDS, KeyRing

TOKEN_TYPE = "at+jwt"  # noqa: S105 - a media type, not a secret
TOKEN_TYPES = frozenset({TOKEN_TYPE, "application/at+jwt"})  # RFC 9068 §2.1, case-insensitive
REQUIRED_CLAIMS = ("iss", "aud", "exp", "iat", "sub", "client_id", "jti")  # RFC 9068 §2.2


@dataclass(frozen=True)
class Principal:
    """Who is calling, from a verified token: the limits every request is held to."""

    client_id: str
    scopes: frozenset[str]
    brands: frozenset[str] | None
    regions: frozenset[str] | None
    metrics: frozenset[str] | None
    token_id: str
    min_group_size: int | None = None  # distinct-player cells below it are withheld
    cert_thumbprint: str | None = None  # RFC 8705 cnf.x5t#S256: usable over that cert only
    # a partner (game studio): only bets on these providers' games (security/policy.py)
    providers: frozenset[str] | None = None


def principal_record(principal: Principal) -> dict[str, Any]:
    """A principal as JSON (an export job's, an embed token's): its limits, kept as they were."""
    out = asdict(principal)
    return {k: sorted(v) if isinstance(v, frozenset) else v for k, v in out.items()}


def principal_of_record(record: dict[str, Any]) -> Principal:
    """The principal :func:`principal_record` kept."""
    def as_set(values: list[str] | None) -> frozenset[str] | None:
        return None if values is None else frozenset(values)

    return Principal(record["client_id"], frozenset(record["scopes"]),
                     as_set(record["brands"]), as_set(record["regions"]),
                     as_set(record["metrics"]), record["token_id"],
                     record.get("min_group_size"), record.get("cert_thumbprint"),
                     as_set(record.get("providers")))


def _claim_list(items: frozenset[str] | None) -> list[str] | None:
    return None if items is None else sorted(items)


def _claim_set(name: str, value: Any) -> frozenset[str] | None:
    """A limit claim: absent or null is no limit; otherwise a non-empty list of non-blank
    strings. An empty list is refused, never read as "no limit": a limit naming nothing must
    not widen to everything (nor reach a query as an empty, i.e. absent, filter)."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidToken("token has a malformed claim")
    if not value or not all(v.strip() for v in value):
        raise InvalidToken(f"token claim {name!r} is empty or holds a blank value; an empty "
                           "limit never means all (omit the claim for no limit)")
    return frozenset(value)


def _claim_int(value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidToken("token has a malformed claim")
    return value


def unverified_header(token: str, algorithms: frozenset[str]) -> dict[str, Any]:
    """The JOSE header, checked before any key is chosen (RFC 8725 §3.1, §3.11; RFC 9068
    §4): the algorithm must be on the verifier's allow-list (never ``none``, never an HMAC
    one: an asymmetric public key is not a secret), ``typ`` must be ``at+jwt``, and a ``kid``
    must name the key. No ``jku``/``jwk``/``x5u`` header is ever followed: keys come only
    from this deployment's key ring or the configured JWKS."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.InvalidTokenError:
        raise InvalidToken("malformed bearer token") from None
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in algorithms:
        raise InvalidToken(f"token algorithm {alg!r} is not accepted "
                           f"(accepted: {', '.join(sorted(algorithms))})")
    typ = header.get("typ")
    if not isinstance(typ, str) or typ.lower() not in TOKEN_TYPES:
        raise InvalidToken(f"token type must be {TOKEN_TYPE} (RFC 9068)")
    if "crit" in header or "b64" in header:
        raise InvalidToken("token uses a critical header extension this server does not know")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise InvalidToken("token has no key id (kid)")
    return header


def decode_claims(token: str, key: Any, algorithm: str, issuer: str,
                  audience: str) -> dict[str, Any]:
    """The verified claims: signature, ``iss``, ``aud``, ``exp``/``nbf``/``iat`` with
    :data:`LEEWAY_SECONDS` of clock skew, and every RFC 9068 required claim present."""
    try:
        claims: dict[str, Any] = jwt.decode(
            token, key, algorithms=[algorithm], audience=audience, issuer=issuer,
            leeway=LEEWAY_SECONDS, options={"require": list(REQUIRED_CLAIMS)},
        )
    except jwt.ExpiredSignatureError:
        raise InvalidToken("token has expired") from None
    except jwt.ImmatureSignatureError:
        raise InvalidToken("token is not valid yet (nbf or iat in the future)") from None
    except jwt.InvalidTokenError as exc:
        raise InvalidToken(f"invalid token: {exc}") from None
    return claims


def _claim_str(claims: dict[str, Any], name: str) -> str:
    value = claims.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidToken(f"token claim {name!r} must be a non-empty string")
    return value


def _confirmation(value: Any) -> str | None:
    """RFC 8705 ``cnf.x5t#S256``; any other confirmation method cannot be honoured here, so
    the token is refused rather than accepted unbound (RFC 7800 §3)."""
    if value is None:
        return None
    thumbprint = value.get("x5t#S256") if isinstance(value, dict) else None
    if not isinstance(thumbprint, str) or not thumbprint or len(value) != 1:
        raise InvalidToken("token has a confirmation (cnf) this server cannot check")
    return thumbprint


def principal_from(claims: dict[str, Any]) -> Principal:
    """The caller's limits from verified claims (built-in and external issuers alike)."""
    scope = claims.get("scope", "")
    if not isinstance(scope, str):
        raise InvalidToken("token claim 'scope' must be a space-separated string")
    _claim_str(claims, "sub")
    return Principal(
        client_id=_claim_str(claims, "client_id"),
        scopes=frozenset(scope.split()),
        brands=_claim_set("brands", claims.get("brands")),
        regions=_claim_set("regions", claims.get("regions")),
        metrics=_claim_set("metrics", claims.get("metrics")),
        token_id=_claim_str(claims, "jti"),
        min_group_size=_claim_int(claims.get("min_group_size")),
        cert_thumbprint=_confirmation(claims.get("cnf")),
        providers=_claim_set("providers", claims.get("providers")),
    )


class Verifier(Protocol):
    """What the API needs of a token authority: :class:`TokenService` (built in) or
    :class:`tally.security.jwks.ExternalIssuer` (an IdP's tokens)."""

    def verify(self, token: str) -> Principal: ...

    def jwks(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class VerifiedToken:
    principal: Principal
    kid: str
    issued_at: float
    expires_at: float


class Verified:
    """Tokens whose signature and claims were verified, until they expire: a client sends one
    token for its whole life (15 minutes by default), and an Ed25519 verification costs far
    more than the rest of a small answer. Bounded (``size`` tokens, the oldest dropped
    first); thread-safe for the dict operations it uses."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._tokens: OrderedDict[str, VerifiedToken] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, token: str) -> VerifiedToken | None:
        with self._lock:
            found = self._tokens.get(token)
            if found is not None and found.expires_at + LEEWAY_SECONDS < time.time():
                del self._tokens[token]
                return None
            return found

    def put(self, token: str, verified: VerifiedToken) -> None:
        with self._lock:
            self._tokens[token] = verified
            while len(self._tokens) > self.size:
                self._tokens.popitem(last=False)


class TokenService:
    """The built-in authority: issues and verifies tokens with the keys of :class:`KeyRing`;
    a valid token of a revoked client is refused too (:class:`ClientStates`)."""

    algorithms = frozenset({ALGORITHM})

    def __init__(self, con: sqlite3.Connection, issuer: str, audience: str, ttl: int) -> None:
        self.issuer, self.audience, self.ttl = issuer, audience, ttl
        self.keys = KeyRing(con)
        self.clients = ClientStates(con)
        self.verified = Verified()

    def issue(self, client: Client, scopes: frozenset[str],
              cert_thumbprint: str | None = None) -> dict[str, Any]:
        """A token for ``client``; bound to its certificate (RFC 8705 ``cnf``) when
        ``cert_thumbprint`` is given."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer, "aud": self.audience, "sub": client.client_id,
            "client_id": client.client_id, "iat": now, "nbf": now, "exp": now + self.ttl,
            "jti": secrets.token_hex(12), "scope": " ".join(sorted(scopes)),
            "brands": _claim_list(client.brands), "regions": _claim_list(client.regions),
            "metrics": _claim_list(client.metrics),
            "providers": _claim_list(client.providers),
            "min_group_size": client.min_group_size,
        }
        if cert_thumbprint is not None:
            claims["cnf"] = {"x5t#S256": cert_thumbprint}
        key = self.keys.active
        token = jwt.encode(claims, key.private, algorithm=ALGORITHM,
                           headers={"kid": key.kid, "typ": TOKEN_TYPE})
        return {"access_token": token, "token_type": "Bearer", "expires_in": self.ttl,
                "scope": claims["scope"]}

    def verify(self, token: str) -> Principal:
        """The token's principal. A token verified before is taken from :class:`Verified`
        (its signature and claims do not change; it forgets a token once it expires), with
        what can change since checked again on every use: its key still verifies, its client
        is not revoked."""
        known = self.verified.get(token)
        if known is None:
            header = unverified_header(token, self.algorithms)
            key = self.keys.verifying(header["kid"])
            if key is None:
                raise InvalidToken("token signed with an unknown or retired key")
            claims = decode_claims(token, key.public, ALGORITHM, self.issuer, self.audience)
            iat, exp = claims["iat"], claims["exp"]  # required and checked by decode_claims;
            # a non-number iat counts as issued long ago (refused after a rotation)
            known = VerifiedToken(principal_from(claims), header["kid"],
                                  iat if isinstance(iat, (int, float)) else 0, float(exp))
            self.verified.put(token, known)
        elif self.keys.verifying(known.kid) is None:  # (an expired one is not remembered)
            raise InvalidToken("token signed with an unknown or retired key")
        self.clients.check(known.principal.client_id, known.issued_at)
        return known.principal

    def jwks(self) -> dict[str, Any]:
        keys = []
        for key in self.keys.published():
            jwk: dict[str, Any] = OKPAlgorithm.to_jwk(key.public, as_dict=True)
            jwk.update({"kid": key.kid, "alg": ALGORITHM, "use": "sig"})
            keys.append(jwk)
        return {"keys": keys}
