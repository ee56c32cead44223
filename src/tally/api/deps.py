"""Dependencies shared by routes: the runtime, the caller's verified identity, scopes."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.openapi.models import OAuthFlowClientCredentials, OAuthFlows
from fastapi.security import OAuth2, SecurityScopes

from tally.errors import InsufficientScope, Unauthorized
from tally.runtime import Runtime
from tally.security.admission import admit_client
from tally.security.mtls import require_certificate
from tally.security.tokens import Principal, TokenService

SCOPE_HELP = {
    "events:write": "Ingest events (POST /v1/events:batch).",
    "analytics:read": "Query metrics, funnels, retention and LTV within the token's limits.",
    "exports:write": "Start export jobs.",
    "admin": "Operator routes: FX rates, the quarantine, the audit log.",
}
# the one security scheme of the document: OAuth2 client credentials, a scope per operation
oauth2 = OAuth2(
    flows=OAuthFlows(clientCredentials=OAuthFlowClientCredentials(
        tokenUrl="/oauth/token", scopes=SCOPE_HELP)),
    scheme_name="oauth2",
    description="Client credentials (RFC 6749 §4.4) at POST /oauth/token; send the access "
                "token as `Authorization: Bearer <token>`.",
    auto_error=False,
)


# pure dependencies are ``async def``: FastAPI runs a plain ``def`` dependency in its thread
# pool, a thread hop per dependency per request on the event loop's critical path


async def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


async def authenticated(
    request: Request,
    runtime: RuntimeDep,
    authorization: Annotated[str | None, Depends(oauth2)],
) -> Principal:
    """On the event loop when nothing can block: the built-in issuer's tokens (verified once,
    then memoised: security/tokens.Verified) and in-process rate limits. An identity
    provider's keys (fetched over the network) and Redis-held limits go to a thread."""
    scheme, _, credentials = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        raise Unauthorized("a bearer token is required (POST /oauth/token)")
    tokens = runtime.tokens
    principal = tokens.verify(credentials.strip()) if isinstance(tokens, TokenService) \
        else await asyncio.to_thread(tokens.verify, credentials.strip())
    require_certificate(principal, request.scope)  # RFC 8705: a cnf-bound token's own cert
    request.state.principal = principal  # who asked, for the audit log
    if runtime.limits.in_process:
        admit_client(principal.client_id)  # the client's rate limit (429 when spent)
    else:  # a Redis round trip (0.5 s at most when Redis does not answer)
        await asyncio.to_thread(admit_client, principal.client_id)
    return principal


async def authorized(security_scopes: SecurityScopes,
                     principal: Annotated[Principal, Depends(authenticated)]) -> Principal:
    """The caller, holding every scope the operation declares (``Security(scopes=…)``, which
    is also what the OpenAPI document says the operation needs)."""
    for scope in security_scopes.scopes:
        if scope not in principal.scopes:
            raise InsufficientScope(scope)
    return principal


def operations_token_given(request: Request, runtime: Runtime, basic: bool = False) -> bool:
    """Whether the caller may read the operational routes (``/metrics``, ``/status``): yes
    when ``TALLY_METRICS_TOKEN`` is unset, else only with it as a bearer token — or, with
    ``basic``, as the password of HTTP Basic (any user name: a browser asks for it)."""
    expected = runtime.settings.metrics_token
    if expected is None:
        return True
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    secret = given.strip()
    if basic and scheme.lower() == "basic":
        try:
            secret = base64.b64decode(secret, validate=True).decode().partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return False
    elif scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(secret.encode(), expected.get_secret_value().encode())


AnyToken = Annotated[Principal, Security(authorized)]
EventsWriter = Annotated[Principal, Security(authorized, scopes=["events:write"])]
Admin = Annotated[Principal, Security(authorized, scopes=["admin"])]
AnalyticsReader = Annotated[Principal, Security(authorized, scopes=["analytics:read"])]
ExportsWriter = Annotated[Principal, Security(authorized, scopes=["exports:write"])]
