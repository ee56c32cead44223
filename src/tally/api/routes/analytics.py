"""``GET /v1/analytics/timeseries`` and ``GET /v1/analytics/slice`` (CONTRACT §4)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import msgspec
from fastapi import APIRouter, Request, Response

from tally.api.caching import (
    COHORT_MAX_AGE,
    MAX_AGE,
    SLICE_MAX_AGE,
    etag_for,
    format_watermark,
    not_modified,
    respond,
)
from tally.api.deps import AnalyticsReader, RuntimeDep
from tally.audit.record import count_rows
from tally.cohorts import plans
from tally.insights.series import Context, Plan, slice_, timeseries
from tally.json_input import ANY, decode
from tally.runtime import Runtime
from tally.security.tokens import Principal

router = APIRouter(tags=["analytics"])
TIMESERIES_PARAMS = ("metric", "granularity", "from", "to", "filters", "group_by", "cursor",
                     "limit", "currency")
SLICE_PARAMS = ("metric", "dim", "from", "to", "filters", "limit", "order", "cursor",
                "currency")
LTV_PARAMS = ("cohort", "metric", "horizon", "start_date", "end_date", "filters", "currency")


def _params(request: Request, names: tuple[str, ...]) -> dict[str, str | None]:
    return {name: request.query_params.get(name) for name in names}


async def _body(request: Request) -> Any:
    """A query's JSON body (funnel, retention): these POSTs are safe queries, answered and
    revalidated (ETag, If-None-Match → 304) exactly like the GETs."""
    # declared JSON and bounded as it streams in (api/bodies.py)
    return decode(await request.body(), "the body", ANY)


async def _answer(request: Request, runtime: Runtime, principal: Principal,
                  planner: Callable[[Context, Any], Plan], q: Any, max_age: int) -> Response:
    versions = runtime.ingest.versions
    plan = planner(Context(runtime.backend, runtime.fx, runtime.settings, principal,
                           versions.complete_before), q)
    # read-your-writes, bounded: an answer includes the events acknowledged before the request
    # if the applier gets them in within TALLY_READ_YOUR_WRITES_MS; else it answers now, and
    # its watermark says which events it holds
    if not runtime.ingest.caught_up():
        await asyncio.to_thread(runtime.ingest.read_your_writes,
                                runtime.settings.read_your_writes_ms / 1000)
    etag = etag_for(plan.fingerprint, versions.version(plan.brands, plan.reads),
                    runtime.fx.version)
    mark = format_watermark(versions.complete_before(plan.brands),
                            runtime.settings.allowed_lateness)
    if not_modified(request, etag):
        return respond(etag, None, max_age, mark)
    content = runtime.answers.get(etag)
    if content is None:
        content = msgspec.json.encode(await asyncio.to_thread(plan.run))
        runtime.answers.put(etag, content, max_age)
    request.state.audit_rows = count_rows(content)
    return respond(etag, content, max_age, mark)


@router.get("/v1/analytics/timeseries", summary="A metric over time, bucketed in UTC")
async def get_timeseries(request: Request, principal: AnalyticsReader,
                         runtime: RuntimeDep) -> Response:
    max_age = MAX_AGE.get(request.query_params.get("granularity", ""), 60)
    return await _answer(request, runtime, principal, timeseries,
                         _params(request, TIMESERIES_PARAMS), max_age)


@router.get("/v1/analytics/slice", summary="A metric by one dimension, ranked (top-N)")
async def get_slice(request: Request, principal: AnalyticsReader,
                    runtime: RuntimeDep) -> Response:
    return await _answer(request, runtime, principal, slice_, _params(request, SLICE_PARAMS),
                         SLICE_MAX_AGE)


@router.post("/v1/analytics/funnel", summary="Conversion through ordered steps (docs/cohorts.md)")
async def post_funnel(request: Request, principal: AnalyticsReader,
                      runtime: RuntimeDep) -> Response:
    return await _answer(request, runtime, principal, plans.funnel, await _body(request),
                         COHORT_MAX_AGE)


@router.post("/v1/analytics/retention",
             summary="D-N retention of first-deposit or registration cohorts")
async def post_retention(request: Request, principal: AnalyticsReader,
                         runtime: RuntimeDep) -> Response:
    return await _answer(request, runtime, principal, plans.retention, await _body(request),
                         COHORT_MAX_AGE)


@router.get("/v1/analytics/ltv", summary="Cumulative ggr or ngr per cohort member by day")
async def get_ltv(request: Request, principal: AnalyticsReader,
                  runtime: RuntimeDep) -> Response:
    return await _answer(request, runtime, principal, plans.ltv,
                         _params(request, LTV_PARAMS), COHORT_MAX_AGE)
