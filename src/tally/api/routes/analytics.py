"""``GET /v1/analytics/timeseries`` and ``GET /v1/analytics/slice`` (CONTRACT §4)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import msgspec
from fastapi import APIRouter, Request, Response

from tally.api.caching import (
    MAX_AGE,
    SLICE_MAX_AGE,
    etag_for,
    format_watermark,
    not_modified,
    respond,
)
from tally.api.deps import AnalyticsReader, RuntimeDep
from tally.insights.series import Context, Plan, slice_, timeseries
from tally.runtime import Runtime
from tally.security.tokens import Principal

router = APIRouter(tags=["analytics"])
READ_YOUR_WRITES_WAIT = 2.0  # seconds at most; normally the applier is milliseconds behind
TIMESERIES_PARAMS = ("metric", "granularity", "from", "to", "filters", "group_by", "cursor",
                     "limit", "currency")
SLICE_PARAMS = ("metric", "dim", "from", "to", "filters", "limit", "order", "cursor",
                "currency")


async def _answer(request: Request, runtime: Runtime, principal: Principal,
                  planner: Callable[[Context, dict[str, str | None]], Plan],
                  names: tuple[str, ...], max_age: int) -> Response:
    q = {name: request.query_params.get(name) for name in names}
    plan = planner(Context(runtime.backend, runtime.fx, runtime.settings, principal), q)
    # read-your-writes: an answer includes every event acknowledged before the request
    await asyncio.to_thread(runtime.ingest.flush, READ_YOUR_WRITES_WAIT)
    versions = runtime.ingest.versions
    etag = etag_for(plan.fingerprint, versions.version(plan.brands, plan.reads),
                    runtime.fx.version)
    mark = format_watermark(versions.latest(plan.brands), runtime.settings.allowed_lateness)
    if not_modified(request, etag):
        return respond(etag, None, max_age, mark)
    content = runtime.answers.get(etag)
    if content is None:
        content = msgspec.json.encode(await asyncio.to_thread(plan.run))
        runtime.answers.put(etag, content, max_age)
    return respond(etag, content, max_age, mark)


@router.get("/v1/analytics/timeseries", summary="A metric over time, bucketed in UTC")
async def get_timeseries(request: Request, principal: AnalyticsReader,
                         runtime: RuntimeDep) -> Response:
    max_age = MAX_AGE.get(request.query_params.get("granularity", ""), 60)
    return await _answer(request, runtime, principal, timeseries, TIMESERIES_PARAMS, max_age)


@router.get("/v1/analytics/slice", summary="A metric by one dimension, ranked (top-N)")
async def get_slice(request: Request, principal: AnalyticsReader,
                    runtime: RuntimeDep) -> Response:
    return await _answer(request, runtime, principal, slice_, SLICE_PARAMS, SLICE_MAX_AGE)
