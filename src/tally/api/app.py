"""``create_app()``: the ASGI application."""

from __future__ import annotations

import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response

from tally import __version__
from tally.api import problems
from tally.api.routes import admin, auth, ingest, meta
from tally.config import Settings, get_settings
from tally.runtime import Runtime

TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")


def trace_id_for(request: Request) -> str:
    """The W3C trace id of ``traceparent`` when a valid one is sent, else a new one."""
    match = TRACEPARENT.match(request.headers.get("traceparent", ""))
    if match and match[1] != "0" * 32:
        return match[1]
    return secrets.token_hex(16)


def create_app(settings: Settings | None = None, runtime: Runtime | None = None) -> FastAPI:
    """The app; with ``runtime`` it serves an already opened store (``tally serve`` opens it
    first so an unusable data dir fails before the port is bound)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal runtime
        runtime = runtime or Runtime.open(settings)
        runtime.start()
        app.state.runtime = runtime
        try:
            yield
        finally:
            runtime.close()
            runtime = None

    app = FastAPI(title="Tally", version=__version__, lifespan=lifespan,
                  description="Analytics API for online gaming operators.")

    @app.middleware("http")
    async def trace(request: Request,
                    call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        request.state.trace_id = trace_id_for(request)
        response = await call_next(request)
        response.headers["X-Trace-Id"] = request.state.trace_id
        return response

    problems.install(app)
    for module in (auth, ingest, admin, meta):
        app.include_router(module.router)
    return app
