"""The hot read routes without FastAPI's per-request dependency solving (issue 14: small
answers in milliseconds).

FastAPI resolves a route's dependencies anew for every request: it walks the dependency tree,
checks each callable's kind, builds the query model through its generic extractor — about a
quarter of a fresh 5-minute day's Python time (py-spy, ``--gil``). A :class:`LeanRoute` whose
endpoint has the read routes' one shape — ``(request, <authorized principal>, <runtime>,
q: Annotated[SomeQuery, Query()])`` under the app-wide ``strict_input`` — calls the same
dependency functions itself, in FastAPI's order: strict input (app-wide: every route's, so
called whether or not the dependant being built holds it yet — FastAPI adds the app's
dependencies when it includes the router), the runtime, the bearer header, authentication, the
operation's scopes, then the query model. A route of any other
shape gets FastAPI's handler. The OpenAPI document is FastAPI's, from the same signature.

A query the model refuses is refused by FastAPI's own extractor (``request_params_to_args``),
so every error is word for word the one FastAPI gives; ``tests/test_lean.py`` asks every
lean route the same valid and invalid requests with and without this path.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from fastapi import Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.dependencies.utils import request_params_to_args
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.security import SecurityScopes
from pydantic import BaseModel, ValidationError

from tally.api.deps import authenticated, authorized, get_runtime, oauth2
from tally.api.strict import strict_input

ENABLED = True  # tests build an app without it, to compare the two paths


@dataclass(frozen=True)
class _Shape:
    principal: str  # the endpoint's parameter names
    runtime: str
    query: str
    request: str
    scopes: SecurityScopes
    model: type[BaseModel]


def _calls(d: Dependant) -> set[Any]:
    return {d.call, *(c for sub in d.dependencies for c in _calls(sub))}


def shape(dependant: Dependant) -> _Shape | None:
    """The read routes' shape, or None for a route of any other."""
    deps = {sub.call: sub for sub in dependant.dependencies}
    principal, runtime = deps.get(authorized), deps.get(get_runtime)
    if (principal is None or runtime is None
            or not set(deps) <= {strict_input, authorized, get_runtime}
            or len(dependant.dependencies) != len(deps)
            or _calls(principal) != {authorized, authenticated, get_runtime, oauth2}
            or dependant.path_params or dependant.header_params or dependant.cookie_params
            or dependant.body_params or len(dependant.query_params) != 1
            or dependant.request_param_name is None or dependant.call is None):
        return None
    query = dependant.query_params[0]
    model = query.field_info.annotation
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return None
    assert principal.name and runtime.name
    return _Shape(principal.name, runtime.name, query.name, dependant.request_param_name,
                  SecurityScopes(scopes=list(principal.own_oauth_scopes or [])), model)


class LeanRoute(APIRoute):
    """An APIRoute answering requests of the read routes' shape with :func:`handler`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        found = shape(self.dependant) if ENABLED else None
        if found is None:
            return super().get_route_handler()
        return handler(self.dependant, found)


def handler(dependant: Dependant,
            s: _Shape) -> Callable[[Request], Coroutine[Any, Any, Response]]:
    endpoint = dependant.call
    assert endpoint is not None

    async def lean(request: Request) -> Response:
        await strict_input(request)
        runtime = await get_runtime(request)
        principal = await authorized(s.scopes, await authenticated(
            request, runtime, await oauth2(request)))
        params = request.query_params
        try:
            q = s.model.model_validate(dict(params)) if params else None
        except ValidationError:
            q = None
        if q is None:  # FastAPI's own extractor says what is wrong, in its words
            values, errors = request_params_to_args(dependant.query_params, params)
            if errors:
                raise RequestValidationError(errors)
            q = values[s.query]
        response: Response = await endpoint(**{s.request: request, s.principal: principal,
                                               s.runtime: runtime, s.query: q})
        return response

    return lean
