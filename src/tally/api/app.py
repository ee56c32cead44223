"""``create_app()``: the ASGI application."""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime

from fastapi import Depends, FastAPI
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tally import __version__
from tally.api import docs, hygiene, openapi, problems
from tally.api.bodies import BodyMiddleware, body_rules
from tally.api.embed_page import EMBED_ASSETS
from tally.api.limiting import LimitsMiddleware
from tally.api.routes import (
    admin,
    alerts,
    analytics,
    audit,
    auth,
    embeds,
    exports,
    ingest,
    meta,
    metrics,
    status,
    webhooks,
)
from tally.api.status_page import STATUS_ASSETS
from tally.api.strict import strict_input, strict_operations
from tally.audit.middleware import AuditMiddleware
from tally.config import Settings, get_settings
from tally.observability.metrics import Metrics
from tally.observability.scans import RowsScanned
from tally.observability.slo import FRESHNESS_SAMPLE_SECONDS, SloWindow
from tally.runtime import Runtime

access_log = logging.getLogger("tally.access")
# W3C Trace Context §3.2: version 00's exact form (lowercase hex); a later version may append
# fields after the flags. Version ff and all-zero ids are invalid.
TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}(-.*)?",
                         re.ASCII)


def trace_id_for(traceparent: str) -> str:
    """The W3C trace id of ``traceparent`` when a valid one is sent, else a new one: a
    malformed header is ignored (§3.2.1), never an error."""
    match = TRACEPARENT.fullmatch(traceparent)
    if (match and match[1] != "ff" and not (match[1] == "00" and match[4])
            and match[2] != "0" * 32 and match[3] != "0" * 16):
        return match[2]
    return secrets.token_hex(16)


def route_template(scope: Scope) -> str:
    """The template of the route that answered (``/v1/exports/{job_id}``), ``unmatched`` if
    none did. FastAPI's routes name themselves in the scope; Starlette's plain ones (FastAPI's
    own ``/openapi.json``) leave only their endpoint, found among the app's routes."""
    route = scope.get("route")
    endpoint = scope.get("endpoint")
    if route is None and endpoint is not None:
        route = next((r for r in getattr(scope.get("app"), "routes", ())
                      if getattr(r, "endpoint", None) is endpoint), None)
    return str(getattr(route, "path", "unmatched"))


class TraceMiddleware:
    """Gives every request a trace id (``request.state.trace_id``) and answers it in
    ``X-Trace-Id``. Pure ASGI: BaseHTTPMiddleware costs a task and a stream per request."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        trace_id = trace_id_for(Headers(scope=scope).get("traceparent", ""))
        scope.setdefault("state", {})["trace_id"] = trace_id
        status = 500

        async def send_with_trace(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                MutableHeaders(scope=message)["X-Trace-Id"] = trace_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_trace)
        finally:
            route = route_template(scope)
            seconds = time.perf_counter() - started
            self.metrics.observe(route, scope["method"], status, seconds)
            # the route template, never the query string: filters may carry ids
            access_log.info("request", extra={
                "trace_id": trace_id, "method": scope["method"], "route": route,
                "status": status, "ms": round(seconds * 1000, 2)})


async def sample_freshness(window: SloWindow, runtime: Runtime) -> None:
    """The freshness objective's samples (``/status``): the worst rollup's lag, every
    :data:`FRESHNESS_SAMPLE_SECONDS` (all rollups are kept in one transaction: one lag)."""
    while True:
        window.sample_freshness(runtime.ingest.applier.lag_seconds())
        await asyncio.sleep(FRESHNESS_SAMPLE_SECONDS)


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
        strict_operations(app)  # built before the first request (api/strict.py)
        app_metrics.watch(runtime.gauges)
        app_metrics.registry.register(RowsScanned(runtime.backend))
        app.state.started_at = datetime.now(UTC)
        sampler = asyncio.create_task(sample_freshness(app_metrics.slo, runtime))
        try:
            yield
        finally:
            sampler.cancel()
            with suppress(asyncio.CancelledError):
                await sampler
            runtime.close()
            runtime = None

    app = FastAPI(title="Tally", version=__version__, lifespan=lifespan,
                  description=openapi.DESCRIPTION,
                  docs_url=None, redoc_url=None,  # served without a CDN by api/docs.py
                  dependencies=[Depends(strict_input)])  # CONTRACT §4 strict input
    app.state.metrics = app_metrics = Metrics()

    app.add_middleware(BodyMiddleware, rules=body_rules(settings),  # innermost: body rules
                       timeout=settings.body_timeout_seconds, min_rate=settings.body_min_rate)
    app.add_middleware(LimitsMiddleware)  # rate limits and row quotas
    app.add_middleware(AuditMiddleware)  # added first: inside the trace middleware
    app.add_middleware(TraceMiddleware, metrics=app_metrics)
    hygiene.install(app, settings.cors_origins, settings.deprecations)
    problems.install(app)
    EMBED_ASSETS.install(app)  # before /embed/{token}/data: /embed/assets/* is an asset
    STATUS_ASSETS.install(app)
    for module in (auth, ingest, admin, audit, meta, status, metrics, analytics, exports,
                   webhooks, embeds, alerts):
        app.include_router(module.router)
    openapi.install(app)
    docs.install(app)
    return app
