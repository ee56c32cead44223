"""Health, readiness, the Prometheus metrics and the schema registry.

Unauthenticated callers (probes, scrapers) see no tenant data: ``/healthz`` and ``/readyz``
say only whether the process and its store answer (no counts), and ``/metrics`` carries
operational series only — behind a bearer token when ``TALLY_METRICS_TOKEN`` is set.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from tally import __version__
from tally.api import answers
from tally.api.answers import AUTHED, COMMON, problems
from tally.api.deps import AnyToken, RuntimeDep, operations_token_given
from tally.errors import Unauthorized
from tally.events.registry import describe_registry
from tally.observability.status import store_probe

router = APIRouter()


@router.get("/healthz", tags=["operations"], summary="Liveness: the process answers",
            response_model=None,
            responses={200: {"model": answers.Status}, **problems(*COMMON)})
async def healthz() -> JSONResponse:
    return JSONResponse({"status": "ok", "version": __version__})


@router.get("/readyz", tags=["operations"], summary="Readiness: the store answers",
            response_model=None,
            responses={200: {"model": answers.Status},
                       503: {"model": answers.Status,
                             "description": "Not ready: `reasons` says why."},
                       **problems(400, 406, 429, 500)})
async def readyz(runtime: RuntimeDep) -> JSONResponse:
    try:  # the store and the metadata database answer (no count: not disclosed)
        unreachable = store_probe(runtime)
        reasons = [unreachable] if unreachable else runtime.unready()
    except Exception as exc:  # readiness reports any failure as not ready
        reasons = [f"store does not answer: {type(exc).__name__}"]
    if reasons:
        return JSONResponse({"status": "unavailable", "reasons": reasons}, status_code=503,
                            headers={"Retry-After": "5"})
    return JSONResponse({"status": "ready"})


@router.get("/metrics", tags=["operations"], summary="Prometheus metrics (text format)",
            response_model=None, response_class=PlainTextResponse,
            openapi_extra={"security": [{}, {"metricsToken": []}]},
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                             "description": "Prometheus text exposition format 0.0.4."},
                **problems(*COMMON, 401)})
async def metrics(request: Request, runtime: RuntimeDep) -> Response:
    if not operations_token_given(request, runtime):
        raise Unauthorized("GET /metrics needs the scrape token (TALLY_METRICS_TOKEN) as "
                           "a bearer token")
    return Response(request.app.state.metrics.exposition(),
                    media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/v1/schemas", tags=["events"], summary="The event schema registry",
            response_model=None,
            responses={200: {"model": answers.Open}, **problems(*AUTHED)})
async def schemas(_: AnyToken) -> JSONResponse:
    return JSONResponse(describe_registry(), headers={"Cache-Control": "private, max-age=300"})
