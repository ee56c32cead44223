"""OAuth2 client credentials (RFC 6749 §4.4) and the JWKS document."""

from __future__ import annotations

import base64
import binascii
from typing import Any
from urllib.parse import parse_qs, unquote

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from tally.api.deps import RuntimeDep
from tally.errors import BadRequest, Unauthorized
from tally.security.admission import admit_token_request, admit_token_source
from tally.security.clients import authenticate
from tally.security.mtls import token_binding
from tally.security.tokens import TokenService

router = APIRouter(tags=["auth"])
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


class OAuthError(BadRequest):
    def __init__(self, error: str, detail: str) -> None:
        super().__init__(detail, error=error)


class InvalidClient(Unauthorized):
    def __init__(self) -> None:
        super().__init__("unknown client or wrong secret", error="invalid_client")


def _basic_credentials(header: str | None) -> tuple[str, str] | None:
    if not header or not header.lower().startswith("basic "):
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise InvalidClient() from None
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        raise InvalidClient()
    return unquote(client_id), unquote(secret)


@router.post("/oauth/token", summary="Issue an access token (client credentials grant)")
async def token(request: Request, runtime: RuntimeDep) -> JSONResponse:
    tokens = runtime.tokens
    if not isinstance(tokens, TokenService):  # TALLY_JWKS_URL: an identity provider issues
        raise OAuthError("unsupported_grant_type", "this deployment does not issue tokens: "
                         f"get one from the identity provider {runtime.settings.issuer!r}")
    # the peer's address (a proxy's forwarded one only from TALLY_FORWARDED_ALLOW_IPS): every
    # token request from it, well-formed or not, spends its bucket before any other work
    source = request.client.host if request.client else "unknown"
    admit_token_source(source)
    if not request.headers.get("content-type", "").startswith(
        "application/x-www-form-urlencoded"
    ):
        raise OAuthError("invalid_request", "body must be application/x-www-form-urlencoded")
    raw = await request.body()  # at most 8 KiB, bounded as it streams in (api/bodies.py)
    form = {k: v[0] for k, v in parse_qs(raw.decode(errors="replace")).items()}
    if form.get("grant_type") != "client_credentials":
        raise OAuthError("unsupported_grant_type", "grant_type must be client_credentials")
    creds = _basic_credentials(request.headers.get("authorization"))
    if creds is None:
        if "client_id" not in form or "client_secret" not in form:
            raise InvalidClient()
        creds = (form["client_id"], form["client_secret"])
    request.state.audit_client_id = creds[0]  # the audit log keeps the id, never the secret
    # per (client_id, address), before the secret is checked: an address that guesses is
    # slowed, and the client's own address is not
    admit_token_request(creds[0], source)
    client = authenticate(runtime.meta, *creds)
    if client is None:
        raise InvalidClient()
    scopes = client.scopes
    if "scope" in form:
        asked = frozenset(form["scope"].split())
        if not asked or not asked <= client.scopes:
            raise OAuthError("invalid_scope",
                             f"scope must be a subset of {' '.join(sorted(client.scopes))}")
        scopes = asked
    request.state.audit_params = {"scope": " ".join(sorted(scopes))}
    body: dict[str, Any] = tokens.issue(client, scopes, token_binding(client, request.scope))
    return JSONResponse(body, headers=NO_STORE)


@router.get("/.well-known/jwks.json", summary="Public keys that verify access tokens")
async def jwks(runtime: RuntimeDep) -> JSONResponse:
    return JSONResponse(runtime.tokens.jwks(), headers={"Cache-Control": "public, max-age=300"})
