"""Funnel, retention and LTV as :class:`~tally.insights.series.Plan`s: validated, confined by
the policy module, fingerprinted for ETags, run on demand (the routes cache and revalidate them
exactly like timeseries and slice)."""

from __future__ import annotations

from typing import Any

from tally.cohorts import funnel as funnel_
from tally.cohorts import retention as retention_
from tally.cohorts.request import PLAYER_FILTER_KEYS, parse_cohort, parse_days_range
from tally.errors import BadRequest
from tally.insights import request as rq
from tally.insights.series import Context, Plan, currency_of

LTV_METRICS = ("ggr", "ngr")


def _confine(ctx: Context, filters: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    return rq.confine(filters, ctx.principal, ctx.settings.served_regions)


def funnel(ctx: Context, body: Any) -> Plan:
    f = funnel_.parse(body)
    f = funnel_.Funnel(f.steps, f.exclusions, f.window_sec, f.start, f.end,
                       _confine(ctx, f.filters), f.correlate_by)
    fp = rq.fingerprint("funnel", f)
    return Plan(fp, f.filters.get("brand_id"), None,
                lambda: funnel_.answer(ctx.backend, f))


def retention(ctx: Context, body: Any) -> Plan:
    r = retention_.parse_retention(body)
    r = retention_.Retention(r.cohort, r.first, r.last, r.return_event, r.days,
                             _confine(ctx, r.filters), r.zone, r.mode)
    fp = rq.fingerprint("retention", r)
    brands = r.filters.get("brand_id")
    return Plan(fp, brands, None,
                lambda: retention_.answer_retention(ctx.backend, r, ctx.watermark(brands)))


def ltv(ctx: Context, q: dict[str, str | None]) -> Plan:
    name = q.get("metric") or "ggr"
    if name not in LTV_METRICS:
        raise BadRequest(f"metric must be one of {', '.join(LTV_METRICS)} for LTV",
                         field="metric")
    metric = rq.parse_metric(name, ctx.principal)
    cohort = parse_cohort(q.get("cohort") or "first_deposit")
    first, last = parse_days_range(q.get("start_date"), q.get("end_date"))
    filters = rq.parse_filters(q.get("filters"), metric)
    for key in filters:
        if key not in PLAYER_FILTER_KEYS:
            raise BadRequest(f"unknown filter key {key!r} here (one of "
                             f"{', '.join(PLAYER_FILTER_KEYS)})", key=key)
    query = retention_.Ltv(cohort, metric, first, last,
                           retention_.parse_horizon(q.get("horizon")),
                           _confine(ctx, filters), currency_of(q.get("currency"), ctx.settings))
    fp = rq.fingerprint("ltv", query.cohort, query.metric.name, query.first, query.last,
                        query.horizon, sorted(query.filters.items()), query.currency)
    brands = query.filters.get("brand_id")
    return Plan(fp, brands, None,
                lambda: retention_.answer_ltv(ctx.backend, ctx.fx, query, ctx.watermark(brands)))

