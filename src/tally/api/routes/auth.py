"""OAuth2 client credentials (RFC 6749 §4.4) and the JWKS document."""

from __future__ import annotations

import base64
import binascii
from typing import Any
from urllib.parse import parse_qs, unquote

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from tally.api import answers
from tally.api.answers import COMMON, problems
from tally.api.deps import RuntimeDep
from tally.errors import InvalidClient, InvalidScope, OAuthError, UnsupportedGrantType
from tally.security.admission import admit_token_request, admit_token_source
from tally.security.clients import authenticate
from tally.security.mtls import token_binding
from tally.security.tokens import TokenService

router = APIRouter(tags=["auth"])
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
KNOWN_FIELDS = ("grant_type", "scope", "client_id", "client_secret")


def _basic_credentials(header: str | None) -> tuple[str, str] | None:
    if not header or not header.lower().startswith("basic "):
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise InvalidClient("the Basic credentials are not base64 of client_id:secret") from None
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        raise InvalidClient("the Basic credentials are not client_id:secret")
    return unquote(client_id), unquote(secret)


TOKEN_FORM = {"requestBody": {"required": True, "content": {
    "application/x-www-form-urlencoded": {"schema": {
        "type": "object", "required": ["grant_type"],
        "description": "RFC 6749 §4.4.2. Client authentication by HTTP Basic (preferred) or "
                       "client_id and client_secret here. Unrecognised parameters are ignored "
                       "(RFC 6749 §3.2); a parameter given twice is invalid_request.",
        "properties": {
            "grant_type": {"type": "string", "enum": ["client_credentials"]},
            "scope": {"type": "string", "description": "Space-separated subset of the "
                      "client's scopes (default: all of them)."},
            "client_id": {"type": "string"},
            "client_secret": {"type": "string", "format": "password"},
        }}}}}}


@router.post("/oauth/token", summary="Issue an access token (client credentials grant)",
             response_model=None, openapi_extra=TOKEN_FORM,
             responses={200: {"model": answers.Token}, **problems(*COMMON, 401, 408, 413,
                                                                   415)})
async def token(request: Request, runtime: RuntimeDep) -> JSONResponse:
    tokens = runtime.tokens
    if not isinstance(tokens, TokenService):  # TALLY_JWKS_URL: an identity provider issues
        raise UnsupportedGrantType("this deployment does not issue tokens: get one from the "
                                   f"identity provider {runtime.settings.issuer!r}")
    # the peer's address (a proxy's forwarded one only from TALLY_FORWARDED_ALLOW_IPS): every
    # token request from it, well-formed or not, spends its bucket before any other work
    source = request.client.host if request.client else "unknown"
    admit_token_source(source)
    if not request.headers.get("content-type", "").startswith(
        "application/x-www-form-urlencoded"
    ):
        raise OAuthError("body must be application/x-www-form-urlencoded")
    raw = await request.body()  # at most 8 KiB, bounded as it streams in (api/bodies.py)
    fields = parse_qs(raw.decode(errors="replace"), keep_blank_values=True)
    repeated = sorted(k for k, v in fields.items() if len(v) > 1 and k in KNOWN_FIELDS)
    if repeated:  # RFC 6749 §3.2: parameters MUST NOT be included more than once
        raise OAuthError(f"parameter {repeated[0]} is given more than once")
    form = {k: v[0] for k, v in fields.items()}
    if "grant_type" not in form:
        raise OAuthError("grant_type is required (client_credentials)")
    if form["grant_type"] != "client_credentials":
        raise UnsupportedGrantType("grant_type must be client_credentials")
    creds = _basic_credentials(request.headers.get("authorization"))
    if creds is None:
        if "client_id" not in form or "client_secret" not in form:
            raise InvalidClient("client authentication is required: HTTP Basic, or "
                                "client_id and client_secret in the form")
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
            raise InvalidScope(f"scope must be a subset of {' '.join(sorted(client.scopes))}")
        scopes = asked
    request.state.audit_params = {"scope": " ".join(sorted(scopes))}
    body: dict[str, Any] = tokens.issue(client, scopes, token_binding(client, request.scope))
    return JSONResponse(body, headers=NO_STORE)


@router.get("/.well-known/jwks.json", summary="Public keys that verify access tokens",
            response_model=None, responses={200: {"model": answers.Jwks}, **problems(*COMMON)})
async def jwks(runtime: RuntimeDep) -> JSONResponse:
    return JSONResponse(runtime.tokens.jwks(), headers={"Cache-Control": "public, max-age=300"})
