"""Funnel, retention and LTV as :class:`~tally.insights.series.Plan`s: allowed and confined by
the policy module, validated, fingerprinted for ETags, run on demand (the routes cache and
revalidate them exactly like timeseries and slice). Each asks the policy module first
(:func:`~tally.security.policy.allow_analysis`: the ``metrics`` claim names the analyses a
client may run), so a client that may not run one learns nothing from validating its body."""

from __future__ import annotations

from typing import Any

from tally.cohorts import funnel as funnel_
from tally.cohorts import retention as retention_
from tally.cohorts.request import (
    PLAYER_FILTER_KEYS,
    check_cohort_cells,
    parse_cohort,
    parse_days_range,
)
from tally.errors import InvalidFilter, InvalidParameter
from tally.insights import request as rq
from tally.insights.series import Context, Plan, Table, currency_of
from tally.security import policy
from tally.security.clients import ANALYSIS_METRICS
from tally.security.tokens import Principal

LTV_METRICS = ANALYSIS_METRICS["ltv"]


def _confine(ctx: Context, filters: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    return rq.confine(filters, ctx.principal, ctx.settings.served_regions)


def funnel(ctx: Context, body: Any) -> Plan:
    policy.allow_analysis(ctx.principal, "funnel")
    f = funnel_.parse(body)
    f = funnel_.Funnel(f.steps, f.exclusions, f.window_sec, f.start, f.end,
                       _confine(ctx, f.filters), f.correlate_by)
    fp = rq.fingerprint("funnel", f)
    fp = rq.fingerprint(fp, ctx.principal.min_group_size)
    return Plan(fp, f.filters.get("brand_id"), funnel_.reads(f, f.start, f.end),
                lambda: _private_funnel(funnel_.answer(ctx.backend, f, days=ctx.parts,
                                                         version=ctx.data_version),
                                         ctx.principal),
                Table("steps", ("name", "count", "rate", "median_sec", *_flag(ctx)), ("funnel",),
                      {"count": "int", "rate": "float", "median_sec": "float",
                       policy.SUPPRESSED: "bool"}))


def retention(ctx: Context, body: Any) -> Plan:
    policy.allow_analysis(ctx.principal, "retention")
    r = retention_.parse_retention(body)
    r = retention_.Retention(r.cohort, r.first, r.last, r.return_event, r.days,
                             _confine(ctx, r.filters), r.zone, r.mode)
    fp = rq.fingerprint("retention", r, ctx.principal.min_group_size)
    brands = r.filters.get("brand_id")
    shares = tuple(f"d{n}" for n in r.days)
    return Plan(fp, brands, None, lambda: _private_retention(
        retention_.answer_retention(ctx.backend, r, ctx.watermark(brands)), ctx.principal),
        Table("rows", ("cohort_date", "size", *shares, *_flag(ctx)), ("retention", r.cohort),
              {"cohort_date": "date", "size": "int", policy.SUPPRESSED: "bool",
               **dict.fromkeys(shares, "float")}))


def ltv(ctx: Context, q: dict[str, str | None]) -> Plan:
    policy.allow_analysis(ctx.principal, "ltv")  # and its metric, below (CONTRACT §6)
    name = q.get("metric") or "ggr"
    if name not in LTV_METRICS:
        raise InvalidParameter(f"metric must be one of {', '.join(LTV_METRICS)} for LTV",
                         field="metric")
    metric = rq.parse_metric(name, ctx.principal)
    cohort = parse_cohort(q.get("cohort") or "first_deposit")
    first, last = parse_days_range(q.get("start_date"), q.get("end_date"))
    filters = rq.parse_filters(q.get("filters"), metric)
    for key in filters:
        if key not in PLAYER_FILTER_KEYS:
            raise InvalidFilter(f"unknown filter key {key!r} here (one of "
                             f"{', '.join(PLAYER_FILTER_KEYS)})", key=key)
    horizon = retention_.parse_horizon(q.get("horizon"))
    check_cohort_cells(first, last, horizon)
    query = retention_.Ltv(cohort, metric, first, last, horizon,
                           _confine(ctx, filters), currency_of(q.get("currency"), ctx.settings))
    fp = rq.fingerprint("ltv", query.cohort, query.metric.name, query.first, query.last,
                        query.horizon, sorted(query.filters.items()), query.currency,
                        ctx.principal.min_group_size)
    brands = query.filters.get("brand_id")
    days = tuple(f"ltv_minor_d{k}" for k in range(query.horizon))
    return Plan(fp, brands, None, lambda: _private_ltv(
        retention_.answer_ltv(ctx.backend, ctx.fx, query, ctx.watermark(brands)),
        ctx.principal),
        Table("cohorts", ("date", "size", *days, *_flag(ctx)),
              ("ltv", query.metric.name, query.currency),
              {"date": "date", "size": "int", policy.SUPPRESSED: "bool",
               **dict.fromkeys(days, "int")}, _ltv_row))


def _flag(ctx: Context) -> tuple[str, ...]:
    """The ``suppressed`` column of an analysis, for a caller whose counts can be withheld."""
    return (policy.SUPPRESSED,) if ctx.principal.min_group_size is not None else ()


def _ltv_row(cohort: dict[str, Any]) -> dict[str, Any]:
    """An LTV cohort as a table row: its per-day values as one column a day."""
    values = cohort.get("ltv_minor") or []
    return {**{k: v for k, v in cohort.items() if k != "ltv_minor"},
            **{f"ltv_minor_d{k}": v for k, v in enumerate(values)}}


# the caller's minimum group size (docs/security.md#privacy): a count of units below it is
# withheld, with every number derived from it (rates, medians, shares, per-member values)


def _private_funnel(answer: dict[str, Any], principal: Principal) -> dict[str, Any]:
    if principal.min_group_size is None:
        return answer
    steps = []
    for step in answer["steps"]:
        if policy.below_min_group(step["count"], principal):
            step = {**step, "count": None, "rate": None, "median_sec": None,
                    policy.SUPPRESSED: True}
        steps.append(step)
    total = None if policy.below_min_group(answer["total"], principal) else answer["total"]
    return {**answer, "total": total, "steps": steps}


def _private_retention(answer: dict[str, Any], principal: Principal) -> dict[str, Any]:
    if principal.min_group_size is None:
        return answer
    rows = []
    for row in answer["rows"]:
        size = row["size"]
        if policy.below_min_group(size, principal):
            row = {key: (value if key == "cohort_date" else None) for key, value in row.items()}
            row[policy.SUPPRESSED] = True
        else:
            for key, share in list(row.items()):
                if key.startswith("d") and key[1:].isdigit() and share is not None and \
                        policy.below_min_group(round(share * size), principal):
                    row[key] = None
                    row[policy.SUPPRESSED] = True
        rows.append(row)
    return {**answer, "rows": rows}


def _private_ltv(answer: dict[str, Any], principal: Principal) -> dict[str, Any]:
    if principal.min_group_size is None:
        return answer
    cohorts = [{**c, "size": None, "ltv_minor": None, policy.SUPPRESSED: True}
               if policy.below_min_group(c["size"], principal) else c
               for c in answer["cohorts"]]
    return {**answer, "cohorts": cohorts}

