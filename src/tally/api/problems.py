"""RFC 9457 problem+json for every error, including unexpected ones (no stack traces out)."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from tally.api.models import problem_for
from tally.errors import (
    INTERNAL,
    METHOD_NOT_ALLOWED,
    NOT_FOUND,
    PROBLEM_MEDIA_TYPE,
    STORE_UNAVAILABLE,
    StoreUnavailable,
    UserError,
    problem,
)

log = logging.getLogger(__name__)
STORE_RETRY_AFTER = 5  # seconds


class ProblemResponse(JSONResponse):
    media_type = PROBLEM_MEDIA_TYPE


def _trace_id(request: Request) -> str | None:
    return getattr(request.state, "trace_id", None)


def problem_response(request: Request, body: dict[str, Any],
                     headers: dict[str, str] | None = None) -> ProblemResponse:
    trace_id = _trace_id(request)
    if trace_id:
        body.setdefault("trace_id", trace_id)
    return ProblemResponse(body, status_code=int(body["status"]), headers=headers)


def user_error_response(request: Request, exc: UserError) -> ProblemResponse:
    """The answer to a :class:`UserError`: from the exception handler, or from a middleware
    that refuses a request before the app runs (``api/bodies.py``)."""
    return problem_response(request, exc.problem(str(request.url.path)), dict(exc.headers or {}))


def allowed_methods(request: Request) -> list[str]:
    """The methods of every route matching the request's path (a path may be served by one
    route per method)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:  # the path matches (FULL: the method too; PARTIAL: not)
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


def install(app: FastAPI) -> None:
    @app.exception_handler(UserError)
    async def _user_error(request: Request, exc: UserError) -> ProblemResponse:
        return user_error_response(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> ProblemResponse:
        status = exc.status_code
        code = {404: NOT_FOUND, 405: METHOD_NOT_ALLOWED}.get(
            status, UserError.code if 400 <= status < 500 else INTERNAL)
        body = problem(status, HTTPStatus(status).phrase, str(exc.detail), code,
                       str(request.url.path))
        headers = dict(exc.headers or {})
        if status == 405:  # RFC 9110 §15.5.6: every method of the path, not only one route's
            headers["Allow"] = ", ".join(allowed_methods(request))
        return problem_response(request, body, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> ProblemResponse:
        return user_error_response(request, problem_for(exc.errors(), "query"))

    @app.exception_handler(StoreUnavailable)
    async def _store_unavailable(request: Request, exc: StoreUnavailable) -> ProblemResponse:
        log.warning("store unavailable", extra={"trace_id": _trace_id(request),
                                                "error": str(exc)})
        body = problem(503, "Service Unavailable", "the store cannot answer now; retry later",
                       STORE_UNAVAILABLE, str(request.url.path))
        return problem_response(request, body, {"Retry-After": str(STORE_RETRY_AFTER)})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> ProblemResponse:
        log.exception("unhandled error", extra={"trace_id": _trace_id(request)})
        body = problem(500, "Internal Server Error",
                       "an unexpected error occurred; quote the trace_id when reporting it",
                       INTERNAL, str(request.url.path))
        return problem_response(request, body)
