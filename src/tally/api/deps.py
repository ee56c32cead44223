"""Dependencies shared by routes: the runtime, the caller's verified identity, scopes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from tally.errors import Forbidden, Unauthorized
from tally.runtime import Runtime
from tally.security.admission import admit_client
from tally.security.mtls import require_certificate
from tally.security.tokens import Principal

_bearer = HTTPBearer(auto_error=False)


# pure dependencies are ``async def``: FastAPI runs a plain ``def`` dependency in its thread
# pool, a thread hop per dependency per request on the event loop's critical path


async def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def authenticated(
    request: Request,
    runtime: RuntimeDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized("a bearer token is required (POST /oauth/token)")
    principal = runtime.tokens.verify(credentials.credentials)
    require_certificate(principal, request.scope)  # RFC 8705: a cnf-bound token's own cert
    request.state.principal = principal  # who asked, for the audit log
    admit_client(principal.client_id)  # the client's rate limit (429 when spent)
    return principal


def require(scope: str) -> Callable[..., Awaitable[Principal]]:
    async def check(principal: Annotated[Principal, Depends(authenticated)]) -> Principal:
        if scope not in principal.scopes:
            raise Forbidden(f"this route needs the {scope!r} scope", missing_scope=scope)
        return principal

    return check


AnyToken = Annotated[Principal, Depends(authenticated)]
EventsWriter = Annotated[Principal, Depends(require("events:write"))]
Admin = Annotated[Principal, Depends(require("admin"))]
AnalyticsReader = Annotated[Principal, Depends(require("analytics:read"))]
