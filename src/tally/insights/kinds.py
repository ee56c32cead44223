"""The analyses a stored query names (an export job's, an embed's): ``{"kind", "params"}``,
``params`` being the route's query parameters (timeseries, slice, ltv) or its JSON body
(funnel, retention), already validated by the route's request model (``api/queries.py``).
Each kind is planned by its route's planner, so a stored query answers as the route would."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tally.cohorts import plans
from tally.insights.series import Context, Plan, slice_, timeseries

PLANNERS: dict[str, Callable[[Context, Any], Plan]] = {
    "timeseries": timeseries, "slice": slice_, "funnel": plans.funnel,
    "retention": plans.retention, "ltv": plans.ltv}
PAGE = {"timeseries": 10_000, "slice": 1_000}  # the routes' largest page (the others: one)


def plan_for(query: dict[str, Any], ctx: Context, cursor: str | None = None,
             limit: int | None = None) -> Plan:
    """The route's plan of a stored query: its page at ``cursor`` (None: the first) of
    ``limit`` rows (None: the route's largest page) — for the kinds that page."""
    kind = query["kind"]
    params = dict(query["params"])
    if kind in PAGE:
        params["limit"] = str(limit or PAGE[kind])
        if cursor is not None:
            params["cursor"] = cursor
    return PLANNERS[kind](ctx, params)
