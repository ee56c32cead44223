"""``timeseries`` and ``slice`` (CONTRACT §4): validate → query → shape."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

from tally.config import Settings
from tally.errors import InvalidParameter, QueryTooLarge
from tally.events.currencies import ISO_4217
from tally.insights import request as rq
from tally.insights.cache import DataVersion, PartCache
from tally.insights.evaluate import (
    DAY,
    Part,
    answer_field,
    empty_value,
    finish,
    parts,
    present_groups,
    values,
)
from tally.security import policy
from tally.security.tokens import Principal
from tally.semantic.catalog import Kind, Metric, Unit
from tally.semantic.compiler import Scope
from tally.semantic.fx import FxRates
from tally.storage.base import Backend


@dataclass(frozen=True)
class Context:
    backend: Backend
    fx: FxRates
    settings: Settings
    principal: Principal
    # the instant before which every acknowledged event of these brands (None: all) is in the
    # store (DataVersions.complete_before)
    latest: Callable[[tuple[str, ...] | None], datetime | None] = lambda brands: None
    # partial results kept across queries, and the data version they are kept under
    # (DataVersions.version: some brands', on the days of a range); None: nothing kept
    parts: PartCache | None = None
    data_version: DataVersion | None = None

    def watermark(self, brands: tuple[str, ...] | None) -> datetime | None:
        """All events before it are in (CONTRACT §4): latest less the allowed lateness."""
        latest = self.latest(brands)
        return None if latest is None else \
            latest - timedelta(seconds=self.settings.allowed_lateness)


@dataclass(frozen=True)
class Plan:
    """A validated request: what it reads (for versions and the watermark) and how to answer.
    Nothing is computed until :attr:`run` is called."""

    fingerprint: str  # the request's meaning, page included
    brands: tuple[str, ...] | None  # the brands the answer is confined to (None: all)
    reads: tuple[datetime, datetime] | None  # the days whose changes can change it (None: any)
    run: Callable[[], dict[str, Any]]
    # an answer that is a table (CSV, api/representations.py): the member holding its rows,
    # their columns, and the parts of its file name
    table: Table | None = None


@dataclass(frozen=True)
class Table:
    """An answer that is a table (CSV, api/representations.py; exports, exports/runner.py):
    the member holding its rows, their columns, the parts of its file name, each column's
    kind where it is not text (``timestamp``, ``date``, ``int``, ``float``, ``bool``), and how
    an answer row becomes a table row (default: as it is)."""

    rows: str
    columns: tuple[str, ...]
    name: tuple[str, ...]
    kinds: dict[str, str] = field(default_factory=dict)
    reshape: Callable[[dict[str, Any]], dict[str, Any]] | None = None

    def table_rows(self, answer: dict[str, Any]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = answer[self.rows]
        return rows if self.reshape is None else [self.reshape(row) for row in rows]


def _table(rows: str, metric: Metric, principal: Principal, keys: tuple[str, ...],
           name: tuple[str, ...]) -> Table:
    """A table's columns: ``keys``, the value, and ``suppressed`` when values can be withheld."""
    flag = (policy.SUPPRESSED,) if policy.may_suppress(metric, principal) else ()
    field_ = answer_field(metric)
    return Table(rows, (*keys, field_, *flag), name,
                 {"ts": "timestamp", policy.SUPPRESSED: "bool",
                  field_: "int" if metric.unit in (Unit.MONEY, Unit.COUNT) else "float"})


def _reads(metric: Metric, scope: Scope) -> tuple[datetime, datetime] | None:
    """Additive and ratio metrics read only their range; percentiles and active players also
    read events outside it (the placement of a bet, the end of a session, trailing windows),
    and so does any query naming a player attribute (a registration at any time)."""
    if metric.kind in (Kind.ADDITIVE, Kind.RATIO) and not scope.player_attributes:
        return scope.start, scope.end
    return None


@lru_cache(maxsize=1 << 16)
def utc_text(epoch: int) -> str:
    """Epoch seconds as RFC 3339 UTC, to the second (remembered: dashboards ask for the
    same buckets)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def currency_of(value: str | None, settings: Settings) -> str:
    """The reporting currency: ``value`` or the base currency; 400 unless ISO 4217."""
    currency = value or settings.base_currency
    if currency not in ISO_4217:
        raise InvalidParameter(f"currency {currency!r} is not an ISO 4217 code")
    return currency


def _aligned(moment: datetime, step: int, name: str, granularity: str) -> None:
    if int(moment.replace(tzinfo=UTC).timestamp()) % step:
        raise InvalidParameter(f"{name} must be aligned to the {granularity} granularity (UTC)")


def _sort_key(values: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple((v is None, "" if v is None else str(v)) for v in values)


def timeseries(ctx: Context, q: dict[str, str | None]) -> Plan:
    metric = rq.parse_metric(q.get("metric"), ctx.principal)
    granularity = q.get("granularity") or ""
    step = rq.GRANULARITIES.get(granularity)
    if step is None:
        raise InvalidParameter(f"unknown granularity {granularity!r} (1m, 5m, 1h or 1d)")
    if granularity not in metric.granularities:
        raise InvalidParameter(f"metric {metric.name!r} is only defined for granularity "
                         f"{', '.join(metric.granularities)}")
    start, end = rq.parse_range(q.get("from"), q.get("to"))
    _aligned(start, step, "from", granularity)
    _aligned(end, step, "to", granularity)
    if rq.bucket_count(start, end, step) > rq.MAX_BUCKETS:
        raise InvalidParameter(f"at most {rq.MAX_BUCKETS} buckets per series; use a coarser "
                         "granularity or a shorter range", limit="max_buckets",
                         max_buckets=rq.MAX_BUCKETS)
    filters = rq.confine(rq.parse_filters(q.get("filters"), metric), ctx.principal,
                         ctx.settings.served_regions)
    group_by = rq.parse_group_by(q.get("group_by"), metric)
    currency = currency_of(q.get("currency"), ctx.settings)
    limit = _limit(q.get("limit"), 1000, 10_000)
    scope = Scope(start, end, step, filters, group_by)
    fp = rq.fingerprint("ts", metric.name, granularity, start, end, sorted(filters.items()),
                        group_by, currency, ctx.principal.min_group_size)
    at = rq.cursor_offset(q.get("cursor"), fp)

    def run() -> dict[str, Any]:
        # one series without group_by: present when its page has data (one statement), else
        # asked (a range without data has no series)
        groups = _present_groups(ctx, metric, scope) if group_by else [()]
        window, seen = _series_page(ctx, metric, scope, currency, groups, at, limit)
        if not group_by and not seen and not _present_groups(ctx, metric, scope):
            groups, window = [], []
        total = rq.bucket_count(start, end, step) * len(groups)
        return {"metric": metric.name, "granularity": granularity, "currency": currency,
                "series": policy.suppress_small_groups(metric, window, answer_field(metric),
                                                       ctx.principal),
                "next_cursor": rq.next_cursor(at + limit, fp) if at + limit < total else None}

    return Plan(f"{fp}:{at}:{limit}", filters.get("brand_id"), _reads(metric, scope), run,
                _table("series", metric, ctx.principal, ("ts", *group_by),
                       (metric.name, granularity, currency)))


def _series_page(ctx: Context, metric: Metric, scope: Scope, currency: str,
                 groups: list[tuple[Any, ...]], at: int,
                 limit: int) -> tuple[list[dict[str, Any]], bool]:
    """Points ``at … at+limit−1`` of the series in (ts, groups) order, every group in every
    bucket, and whether any of their buckets has data. They lie in buckets ``at // G …
    (at+limit−1) // G`` (G groups), so only those are queried: each bucket's value depends
    on its own bucket (and, for wau/mau, the window before it, which the query reads on its
    own), never on the rest of the range."""
    total = rq.bucket_count(scope.start, scope.end, scope.step_seconds) * len(groups)
    if at >= total:
        return [], False
    step = scope.step_seconds
    first, last = at // len(groups), (min(at + limit, total) - 1) // len(groups)
    page = replace(scope, start=scope.start + timedelta(seconds=first * step),
                   end=scope.start + timedelta(seconds=(last + 1) * step))
    found = values(ctx.backend, ctx.fx, metric, page, currency,
                   ctx.settings.active_session_min * 60)
    begin = int(page.start.replace(tzinfo=UTC).timestamp())
    field, empty = answer_field(metric), empty_value(metric)
    # each group's labels and each bucket's timestamp made once, not once per point
    labels = [(group, dict(zip(scope.group_by, group, strict=True))) for group in groups]
    points: list[dict[str, Any]] = []
    for ts in range(begin, begin + (last - first + 1) * step, step):
        stamp = utc_text(ts)
        points.extend({"ts": stamp, **label, field: found.get((ts, *group), empty)}
                      for group, label in labels)
    skip = at - first * len(groups)
    return points[skip:skip + limit], bool(found)


def _present_groups(ctx: Context, metric: Metric, scope: Scope) -> list[tuple[Any, ...]]:
    """The groups with data in ``scope``, in answer order; ``422`` past ``MAX_GROUPS``."""
    found = present_groups(ctx.backend, metric, scope, ctx.settings.active_session_min * 60,
                           rq.MAX_GROUPS)
    if found is None:
        keys = ", ".join(scope.group_by)
        raise QueryTooLarge(f"more than {rq.MAX_GROUPS} values of {keys} have data in this "
                            f"range (at most {rq.MAX_GROUPS} groups per query); narrow it "
                            "with a filter or a shorter range", limit="max_groups",
                            max_groups=rq.MAX_GROUPS)
    return sorted(found, key=_sort_key)


def slice_(ctx: Context, q: dict[str, str | None]) -> Plan:
    metric = rq.parse_metric(q.get("metric"), ctx.principal)
    if metric.window_days > 1:
        raise InvalidParameter(f"metric {metric.name!r} is a trailing window: use timeseries, 1d")
    dim = q.get("dim") or ""
    rq.check_dimension(dim, metric, "dim")
    start, end = rq.parse_range(q.get("from"), q.get("to"))
    filters = rq.confine(rq.parse_filters(q.get("filters"), metric), ctx.principal,
                         ctx.settings.served_regions)
    currency = currency_of(q.get("currency"), ctx.settings)
    order = q.get("order") or "-value"
    if order not in ("-value", "value"):
        raise InvalidParameter("order must be -value or value")
    limit = _limit(q.get("limit"), 50, 1000)
    fp = rq.fingerprint("slice", metric.name, dim, start, end, sorted(filters.items()),
                        currency, order, ctx.principal.min_group_size)
    at = rq.cursor_offset(q.get("cursor"), fp)

    def run() -> dict[str, Any]:
        scope = _slice_scope(metric, Scope(start, end, 0, filters, (dim,)))
        _present_groups(ctx, metric, scope)  # the ranking needs every key: at most MAX_GROUPS
        found = _slice_values(ctx, metric, scope, currency)
        # ties by key, a null key (a player attribute of no registration) after the others
        present = sorted(found.items(), key=lambda kv: _sort_key((kv[0],)))
        ranked = sorted(present, key=lambda kv: (kv[1] is None,
                                                 0 if kv[1] is None else
                                                 (-kv[1] if order == "-value" else kv[1])))
        field = answer_field(metric)
        items = [{dim: key, field: value} for key, value in ranked]
        items = policy.suppress_small_groups(metric, items, field, ctx.principal, ranked_by=dim)
        window, cursor = _page(items, at, limit, fp)
        return {"metric": metric.name, "dim": dim, "currency": currency, "items": window,
                "next_cursor": cursor}

    return Plan(f"{fp}:{at}:{limit}", filters.get("brand_id"),
                _reads(metric, Scope(start, end, 0, filters, (dim,))), run,
                _table("items", metric, ctx.principal, (dim,), (metric.name, dim, currency)))


def _slice_scope(metric: Metric, scope: Scope) -> Scope:
    """Additive and ratio metrics are summed per UTC day (money converts per day), then over
    the range; the others are computed over the range as one bucket."""
    if metric.kind in (Kind.ADDITIVE, Kind.RATIO):
        return replace(scope, step_seconds=DAY)
    return scope


def _slice_values(ctx: Context, metric: Metric, scope: Scope,
                  currency: str) -> dict[Any, float | int | None]:
    """One value per dimension key over the whole range; money per UTC day, then added."""
    if metric.kind in (Kind.ADDITIVE, Kind.RATIO):
        totals: dict[Any, list[Part]] = {}
        for key, value_parts in parts(ctx.backend, ctx.fx, metric, scope, currency).items():
            acc = totals.setdefault(key[1], [0] * len(value_parts))
            for i, part in enumerate(value_parts):
                acc[i] += part
        return {key: finish(metric, p) for key, p in totals.items()}
    found = values(ctx.backend, ctx.fx, metric, scope, currency,
                   ctx.settings.active_session_min * 60)
    return {key[1]: value for key, value in found.items()}


def _limit(text: str | None, default: int, maximum: int) -> int:
    return rq.parse_bounded_int(text, "limit", 1, maximum, default=default)


def _page(rows: list[dict[str, Any]], at: int, limit: int,
          fp: str) -> tuple[list[dict[str, Any]], str | None]:
    window = rows[at:at + limit]
    more = at + limit < len(rows)
    return window, rq.next_cursor(at + limit, fp) if more else None
