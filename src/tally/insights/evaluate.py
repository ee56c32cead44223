"""Metric values per (bucket, groups…), from the semantic layer's queries.

Additive and ratio metrics come back as *parts* (one signed sum, or numerator and denominator),
with money converted per (bucket, source currency) as CONTRACT §5 says; parts of several buckets
add up (slice sums days), and :func:`finish` turns parts into the answer value. A money answer's
part is the sum of each (bucket, source currency) converted and rounded half-to-even; a ratio's
parts are the exact converted sums (``Fraction``), rounded only as the final float, so a
brand that bets in one currency has exactly that currency's ratio whatever the rates.
"""

from __future__ import annotations

import math
from collections import defaultdict
from datetime import UTC, date, timedelta
from fractions import Fraction
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlglot import exp

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
Part = int | Fraction  # a sum of one bucket: minor units (rounded) or exact (ratios)
DAY = 86_400
EPOCH_DAY = date(1970, 1, 1)


def run(backend: Backend, compiled: Compiled) -> list[dict[str, Any]]:
    return backend.rows(compiled.tree, compiled.params)


def _key(row: dict[str, Any], scope: Scope) -> Key:
    return (int(row["bucket"]), *(row[g] for g in scope.group_by))


def statement(metric: Metric, scope: Scope, min_session_seconds: int) -> Compiled:
    """The one statement :func:`values` runs for ``metric`` over ``scope``: its rows are
    keyed (bucket, groups…) — for wau/mau, daily over the scope widened by the window."""
    if metric.kind is Kind.PERCENTILE:
        return (compile_settle_lag(scope) if metric.name == "settle_lag_p95"
                else compile_webhook_lag(scope))
    if metric.kind is Kind.DISTINCT:
        distinct = metric.window_days == 1
        scope = scope if distinct else widened(scope, metric.window_days)
        return (compile_active_from_rollup(scope, min_session_seconds, distinct=distinct)
                or compile_active(scope, min_session_seconds, distinct=distinct))
    money = any(m.money for m in metric.measures)
    return (compile_from_rollup(metric, scope, by_currency=money)
            or compile_measures(metric, scope, by_currency=money))


def widened(scope: Scope, window_days: int) -> Scope:
    """Daily buckets from ``window_days − 1`` days before the scope: a trailing window's."""
    return Scope(scope.start - timedelta(days=window_days - 1), scope.end, DAY, scope.filters,
                 scope.group_by)


def present_groups(backend: Backend, metric: Metric, scope: Scope, min_session_seconds: int,
           at_most: int) -> list[tuple[Any, ...]] | None:
    """The group values :func:`values` finds data for over ``scope`` (``[()]`` without
    groups, ``[]`` without data), or None when there are more than ``at_most``: one
    ``SELECT DISTINCT`` of the group columns with the statement's own source and conditions
    (no aggregate, no per-bucket rows), so paging can ask for a few buckets only; without
    groups, ``LIMIT 1`` (it stops at the first row)."""
    compiled = statement(metric, scope, min_session_seconds)
    by_alias = {e.alias_or_name: e for e in compiled.tree.expressions}
    tree = compiled.tree.copy()
    tree.set("group", None)
    if scope.group_by:
        # the statement names each group column after its group_by key (semantic/compiler)
        tree.set("expressions", [by_alias[g].copy() for g in scope.group_by])
        tree.set("distinct", exp.Distinct())
        tree = tree.limit(at_most + 1)
    else:
        tree.set("expressions", [exp.alias_(exp.Literal.number(1), "present")])
        tree.set("distinct", None)
        tree = tree.limit(1)
    rows = backend.rows(tree, compiled.params)
    if len(rows) > at_most:
        return None
    return [tuple(row[g] for g in scope.group_by) for row in rows]


def parts(backend: Backend, fx: FxRates, metric: Metric, scope: Scope,
          currency: str) -> dict[Key, list[Part]]:
    """ADDITIVE: [signed sum]; RATIO: [numerator, denominator]. Money is converted: rounded
    per (bucket, source currency) for a money answer, exactly for a ratio's parts.

    (The loop is a small answer's largest Python cost — a 5-minute day has ~300 rows — so it
    looks each day up once and calls the converter only for a row in another currency than
    the answer's: converting a sum to its own currency is the sum, by either rule.)"""
    money = any(m.money for m in metric.measures)
    rows = run(backend, statement(metric, scope, 0))
    if metric.kind is Kind.ADDITIVE:
        components = [[(sign, name) for sign, name in metric.terms]]
    else:
        components = [[term] for term in metric.terms]
    convert = fx.convert if metric.kind is Kind.ADDITIVE else fx.exact
    width = len(components)
    result: dict[Key, list[Part]] = {}
    days: dict[int, date] = {}
    for row in rows:
        key = _key(row, scope)
        bucket = key[0]
        slot = result.get(key)
        if slot is None:
            slot = result[key] = [0] * width
        source = row["source_currency"] if money else currency
        day = None
        if source != currency:
            day = days.get(bucket // DAY)
            if day is None:
                day = days[bucket // DAY] = EPOCH_DAY + timedelta(days=bucket // DAY)
        for i, terms in enumerate(components):
            amount: Part = 0
            for sign, name in terms:
                amount += sign * int(row[name])
            if day is not None:
                amount = convert(((day, source, int(amount)),), currency)
            slot[i] += amount
    return result


def finish(metric: Metric, value_parts: list[Part]) -> float | int | None:
    if metric.kind is Kind.ADDITIVE:
        return int(value_parts[0])
    numerator, denominator = value_parts
    # the one rounding of a ratio: the exact quotient to the nearest float
    return None if denominator == 0 else float(Fraction(numerator) / denominator)


def nearest_rank(values: list[float] | npt.NDArray[Any], q: float = 0.95) -> float:
    """The smallest value with at least ``q`` of the values ≤ it (values need not be sorted;
    a NumPy array is partitioned, not sorted: a funnel's gaps are a value per unit)."""
    rank = max(1, math.ceil(q * len(values))) - 1
    if isinstance(values, np.ndarray):
        value: float = np.partition(values, rank)[rank].item()
        return value
    return sorted(values)[rank]


def percentiles(backend: Backend, metric: Metric, scope: Scope) -> dict[Key, float]:
    values: dict[Key, list[float]] = defaultdict(list)
    for row in run(backend, statement(metric, scope, 0)):
        values[_key(row, scope)].append(float(row["value"]))
    return {key: nearest_rank(vals) for key, vals in values.items()}


def distinct_active(backend: Backend, metric: Metric, scope: Scope,
                    min_session_seconds: int) -> dict[Key, int]:
    """dau per bucket; wau/mau per day over the trailing window of ``window_days`` days."""
    compiled = statement(metric, scope, min_session_seconds)
    if metric.window_days == 1:
        return {_key(row, scope): int(row["value"]) for row in run(backend, compiled)}
    daily: dict[Key, set[Any]] = defaultdict(set)
    for row in run(backend, compiled):
        daily[_key(row, scope)].add(row["value"])
    present = {key[1:] for key in daily}
    first = int(scope.start.replace(tzinfo=UTC).timestamp())
    last = int(scope.end.replace(tzinfo=UTC).timestamp())
    result: dict[Key, int] = {}
    for group in present:
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
