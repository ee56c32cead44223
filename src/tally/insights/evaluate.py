"""Metric values per (bucket, groups…), from the semantic layer's queries.

Additive and ratio metrics come back as *parts* (one signed sum, or numerator and denominator),
with money converted per (bucket, source currency) as CONTRACT §5 says; parts of several buckets
add up (slice sums days), and :func:`finish` turns parts into the answer value.
"""

from __future__ import annotations

import math
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

from tally.rollups.activity import compile_active_from_rollup
from tally.rollups.spec import compile_from_rollup
from tally.semantic.catalog import Kind, Metric, Unit
from tally.semantic.compiler import (
    Compiled,
    Scope,
    compile_active,
    compile_measures,
    compile_settle_lag,
    compile_webhook_lag,
)
from tally.semantic.fx import FxRates
from tally.storage.base import Backend

Key = tuple[Any, ...]  # (bucket epoch seconds, *group values)
DAY = 86_400


def run(backend: Backend, compiled: Compiled) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = backend.execute(compiled.tree, compiled.params).to_pylist()
    return rows


def _key(row: dict[str, Any], scope: Scope) -> Key:
    return (int(row["bucket"]), *(row[g] for g in scope.group_by))


def parts(backend: Backend, fx: FxRates, metric: Metric, scope: Scope,
          currency: str) -> dict[Key, list[float]]:
    """ADDITIVE: [signed sum]; RATIO: [numerator, denominator]. Money is converted."""
    money = any(m.money for m in metric.measures)
    compiled = (compile_from_rollup(metric, scope, by_currency=money)
                or compile_measures(metric, scope, by_currency=money))
    rows = run(backend, compiled)
    if metric.kind is Kind.ADDITIVE:
        components = [[(sign, name) for sign, name in metric.terms]]
    else:
        components = [[term] for term in metric.terms]
    result: dict[Key, list[float]] = defaultdict(lambda: [0] * len(components))
    for row in rows:
        key = _key(row, scope)
        day = datetime.fromtimestamp(key[0], UTC).date()
        for i, terms in enumerate(components):
            amount = sum(sign * int(row[name]) for sign, name in terms)
            if money:
                amount = fx.convert([(day, row["source_currency"], amount)], currency)
            result[key][i] += amount
    return dict(result)


def finish(metric: Metric, value_parts: list[float]) -> float | int | None:
    if metric.kind is Kind.ADDITIVE:
        return int(value_parts[0])
    numerator, denominator = value_parts
    return None if denominator == 0 else numerator / denominator


def nearest_rank(values: list[float], q: float = 0.95) -> float:
    """The smallest value with at least ``q`` of the values ≤ it (values need not be sorted)."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def percentiles(backend: Backend, metric: Metric, scope: Scope) -> dict[Key, float]:
    compiled = (compile_settle_lag(scope) if metric.name == "settle_lag_p95"
                else compile_webhook_lag(scope))
    values: dict[Key, list[float]] = defaultdict(list)
    for row in run(backend, compiled):
        values[_key(row, scope)].append(float(row["value"]))
    return {key: nearest_rank(vals) for key, vals in values.items()}


def distinct_active(backend: Backend, metric: Metric, scope: Scope,
                    min_session_seconds: int) -> dict[Key, int]:
    """dau per bucket; wau/mau per day over the trailing window of ``window_days`` days."""
    if metric.window_days == 1:
        compiled = (compile_active_from_rollup(scope, min_session_seconds, distinct=True)
                    or compile_active(scope, min_session_seconds, distinct=True))
        return {_key(row, scope): int(row["value"]) for row in run(backend, compiled)}
    window = timedelta(days=metric.window_days - 1)
    wide = Scope(scope.start - window, scope.end, DAY, scope.filters, scope.group_by)
    daily: dict[Key, set[Any]] = defaultdict(set)
    compiled = (compile_active_from_rollup(wide, min_session_seconds, distinct=False)
                or compile_active(wide, min_session_seconds, distinct=False))
    for row in run(backend, compiled):
        daily[_key(row, wide)].add(row["value"])
    groups = {key[1:] for key in daily}
    first = int(scope.start.replace(tzinfo=UTC).timestamp())
    last = int(scope.end.replace(tzinfo=UTC).timestamp())
    result: dict[Key, int] = {}
    for group in groups:
        for day in range(first, last, DAY):
            players: set[Any] = set()
            for back in range(metric.window_days):
                players |= daily.get((day - back * DAY, *group), set())
            if players:
                result[(day, *group)] = len(players)
    return result


def values(backend: Backend, fx: FxRates, metric: Metric, scope: Scope, currency: str,
           min_session_seconds: int) -> dict[Key, float | int | None]:
    """The answer value per (bucket, groups) that has data."""
    if metric.kind is Kind.PERCENTILE:
        return dict(percentiles(backend, metric, scope))
    if metric.kind is Kind.DISTINCT:
        return dict(distinct_active(backend, metric, scope, min_session_seconds))
    return {key: finish(metric, p) for key, p in parts(backend, fx, metric, scope,
                                                        currency).items()}


def answer_field(metric: Metric) -> str:
    return "value_minor" if metric.unit is Unit.MONEY else "value"


def empty_value(metric: Metric) -> int | None:
    """What a bucket without data answers: 0 for additive metrics, null for the rest."""
    return 0 if metric.kind in (Kind.ADDITIVE, Kind.DISTINCT) else None
