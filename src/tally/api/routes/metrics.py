"""``GET /v1/metrics``: the metric catalog, with each definition in words."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from tally.api import answers
from tally.api.answers import AUTHED, problems
from tally.api.deps import AnalyticsReader, RuntimeDep
from tally.security import policy
from tally.semantic.catalog import DIMENSIONS, PERCENTILE_METHOD, describe

router = APIRouter(tags=["analytics"])


@router.get("/v1/metrics", summary="Every metric: definition, unit, dimensions, granularities",
            response_model=None,
            responses={200: {"model": answers.Catalog}, **problems(*AUTHED)})
async def metrics(principal: AnalyticsReader, runtime: RuntimeDep) -> JSONResponse:
    body = {
        "base_currency": runtime.settings.base_currency,
        "percentile_method": PERCENTILE_METHOD,
        "time": "all buckets by UTC occurred_at; 1d = UTC day",
        "money": "integer minor units of the reporting currency (value_minor); converted with "
                 "the FX rate of each event's UTC day, rounded half-to-even per bucket and "
                 "source currency; ratios (rtp) are computed from the exact converted sums, "
                 "before any rounding",
        "metrics": describe(policy.visible_metrics(principal)),
        # the analyses this client may run (funnel, retention, ltv: CONTRACT §6)
        "analyses": list(policy.visible_analyses(principal)),
        "dimensions": [{"name": d.name, "description": d.description}
                       for d in DIMENSIONS.values()],
    }
    return JSONResponse(body, headers={"Cache-Control": "private, max-age=300"})
