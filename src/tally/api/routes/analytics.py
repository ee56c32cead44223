"""``GET /v1/analytics/timeseries`` and ``GET /v1/analytics/slice`` (CONTRACT §4)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import msgspec
from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel

from tally.api import answers
from tally.api.answering import answering, json_answer
from tally.api.answers import AUTHED, problems
from tally.api.caching import COHORT_MAX_AGE, MAX_AGE, SLICE_MAX_AGE, respond
from tally.api.deps import AnalyticsReader, RuntimeDep
from tally.api.lean import LeanRoute
from tally.api.models import (
    FunnelBody,
    LtvQuery,
    RetentionBody,
    SliceQuery,
    TimeseriesQuery,
    validated,
)
from tally.api.representations import (
    CSV,
    CSV_MEDIA_TYPE,
    csv_headers,
    csv_rows,
    wants_csv,
)
from tally.cohorts import plans
from tally.insights.series import Context, Plan, slice_, timeseries
from tally.json_input import ANY, decode
from tally.runtime import Runtime
from tally.security.tokens import Principal

router = APIRouter(tags=["analytics"], route_class=LeanRoute)
_CACHED: dict[str, Any] = {
    "ETag": {"description": "Validator of this answer (send it back as If-None-Match).",
             "schema": {"type": "string"}, "required": True},
    "Cache-Control": {"description": "How long the answer may be reused.",
                      "schema": {"type": "string"}, "required": True},
    "X-Data-Watermark": {"description": "RFC 3339: every event with occurred_at before it "
                                        "is included.",
                         "schema": {"type": "string"}, "required": True},
}
_NOT_MODIFIED: dict[int | str, dict[str, Any]] = {
    304: {"description": "Not modified: the If-None-Match ETag is current.", "headers": _CACHED}}


_CSV: dict[str, Any] = {"text/csv": {"schema": {
    "type": "string", "description": "With Accept: text/csv: the same rows as the JSON's, RFC "
    "4180 with a header row (docs/api.md#csv); the next page in the Link header."}}}
_CSV_HEADERS: dict[str, Any] = {
    "Link": {"description": 'CSV only: <the next page>; rel="next" (RFC 8288), when there is '
                            "one (the JSON's next_cursor).", "schema": {"type": "string"}},
    "Content-Disposition": {"description": "CSV only: a file name of the query's metric.",
                            "schema": {"type": "string"}},
}


def _documented(model: type[Any], *extra: int,
                csv: bool = False) -> dict[int | str, dict[str, Any]]:
    ok: dict[str, Any] = {"model": model, "headers": _CACHED}
    if csv:
        ok = {**ok, "content": _CSV, "headers": {**_CACHED, **_CSV_HEADERS}}
    return {200: ok, **_NOT_MODIFIED, **problems(*AUTHED, *extra)}


async def _body(request: Request, model: type[BaseModel]) -> Any:
    """A query's JSON body (funnel, retention), closed by ``model`` at every depth: these
    POSTs are safe queries, answered and revalidated (ETag, If-None-Match → 304) exactly like
    the GETs."""
    # declared JSON and bounded as it streams in (api/bodies.py)
    return validated(model, decode(await request.body(), "the body", ANY))


def _body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """The ``requestBody`` of a route that reads its body with :func:`_body`."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


async def _answer(request: Request, runtime: Runtime, principal: Principal,
                  planner: Callable[[Context, Any], Plan], q: Any, max_age: int,
                  csv: bool = False) -> Response:
    """The plan's answer, JSON — or CSV (``csv``: a route documenting it) when preferred."""
    plan = planner(runtime.context_for(principal), q)
    table = plan.table if csv and plan.table is not None and wants_csv(request) else None
    state = await answering(request, runtime, plan, None if table is None else CSV)
    if state.fresh:
        return respond(state.tag, None, max_age, state.watermark)
    content = await json_answer(request, runtime, state, max_age)  # a CSV is made from it
    if table is None:
        return respond(state.etag, content, max_age, state.watermark)
    answer = msgspec.json.decode(content)
    return respond(state.tag, csv_rows(table.table_rows(answer), table.columns), max_age,
                   state.watermark, CSV_MEDIA_TYPE, csv_headers(request, answer, table.name))


@router.get("/v1/analytics/timeseries", summary="A metric over time, bucketed in UTC",
            response_model=None, responses=_documented(answers.Timeseries, 422, csv=True))
async def get_timeseries(request: Request, principal: AnalyticsReader, runtime: RuntimeDep,
                         q: Annotated[TimeseriesQuery, Query()]) -> Response:
    return await _answer(request, runtime, principal, timeseries, q.model_dump(by_alias=True),
                         MAX_AGE.get(q.granularity, 60), csv=True)


@router.get("/v1/analytics/slice", summary="A metric by one dimension, ranked (top-N)",
            response_model=None, responses=_documented(answers.Slice, 422, csv=True))
async def get_slice(request: Request, principal: AnalyticsReader, runtime: RuntimeDep,
                    q: Annotated[SliceQuery, Query()]) -> Response:
    return await _answer(request, runtime, principal, slice_, q.model_dump(by_alias=True),
                         SLICE_MAX_AGE, csv=True)


@router.post("/v1/analytics/funnel", summary="Conversion through ordered steps (docs/cohorts.md)",
             response_model=None, responses=_documented(answers.Funnel, 413, 415),
             openapi_extra=_body_doc(FunnelBody))
async def post_funnel(request: Request, principal: AnalyticsReader,
                      runtime: RuntimeDep) -> Response:
    return await _answer(request, runtime, principal, plans.funnel,
                         await _body(request, FunnelBody), COHORT_MAX_AGE)


@router.post("/v1/analytics/retention",
             summary="D-N retention of first-deposit or registration cohorts",
             response_model=None, responses=_documented(answers.Retention, 413, 415, 422),
             openapi_extra=_body_doc(RetentionBody))
async def post_retention(request: Request, principal: AnalyticsReader,
                         runtime: RuntimeDep) -> Response:
    return await _answer(request, runtime, principal, plans.retention,
                         await _body(request, RetentionBody), COHORT_MAX_AGE)


@router.get("/v1/analytics/ltv", summary="Cumulative ggr or ngr per cohort member by day",
            response_model=None, responses=_documented(answers.Ltv, 422))
async def get_ltv(request: Request, principal: AnalyticsReader, runtime: RuntimeDep,
                  q: Annotated[LtvQuery, Query()]) -> Response:
    return await _answer(request, runtime, principal, plans.ltv, q.model_dump(by_alias=True),
                         COHORT_MAX_AGE)
