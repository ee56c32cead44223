"""What a widget draws, from its query's answer: the x axis and the series of a chart, and
the rows of its table (the accessible fallback every chart carries). Shaped here, once, so the
page's script only draws (``api/static/embed.js``) and what it draws is tested in Python.

- timeseries: x the bucket start (time), a series per group (``group_by`` values) of the
  metric's value;
- slice: x the dimension's keys (categories), one series;
- funnel: x the steps, one series of players;
- retention: x the cohort days, a series per ``dN`` share;
- ltv: x the day since the cohort's start, a series per cohort.

At most :data:`MAX_SERIES` series are drawn (the first ones; ``omitted`` counts the rest —
the table has every row). Money stays in integer minor units with its currency: the page
formats it (``Intl.NumberFormat`` knows each currency's decimals).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from tally.insights.series import Table

MAX_SERIES = 10
MONEY_SUFFIX = "_minor"


def _epoch(text: str) -> int:
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).replace(
        tzinfo=UTC).timestamp())


def _value_column(table: Table) -> str:
    return next(c for c in table.columns if c in ("value_minor", "value"))


def _capped(series: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    return series[:MAX_SERIES], max(0, len(series) - MAX_SERIES)


def _timeseries(table: Table, rows: list[dict[str, Any]]) -> dict[str, Any]:
    value = _value_column(table)
    groups = table.columns[1:table.columns.index(value)]
    xs = sorted({r["ts"] for r in rows})
    at = {ts: i for i, ts in enumerate(xs)}
    by_group: dict[tuple[str, ...], list[Any]] = {}
    for row in rows:
        key = tuple(str(row[g]) for g in groups)
        by_group.setdefault(key, [None] * len(xs))[at[row["ts"]]] = row.get(value)
    series = [{"name": " / ".join(key) if key else table.name[0], "values": values}
              for key, values in by_group.items()]
    shown, omitted = _capped(series)
    return {"x": {"name": "ts", "kind": "time", "values": [_epoch(t) for t in xs]},
            "series": shown, "omitted": omitted,
            "unit": "money" if value.endswith(MONEY_SUFFIX) else "number"}


def _slice(table: Table, rows: list[dict[str, Any]]) -> dict[str, Any]:
    value, dim = _value_column(table), table.columns[0]
    return {"x": {"name": dim, "kind": "category", "values": [str(r[dim]) for r in rows]},
            "series": [{"name": table.name[0], "values": [r.get(value) for r in rows]}],
            "omitted": 0, "unit": "money" if value.endswith(MONEY_SUFFIX) else "number"}


def _funnel(table: Table, rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"x": {"name": "step", "kind": "category", "values": [r["name"] for r in rows]},
            "series": [{"name": "players", "values": [r.get("count") for r in rows]}],
            "omitted": 0, "unit": "count"}


def _retention(table: Table, rows: list[dict[str, Any]]) -> dict[str, Any]:
    shares = [c for c in table.columns if c.startswith("d") and c[1:].isdigit()]
    return {"x": {"name": "cohort_date", "kind": "category",
                  "values": [r["cohort_date"] for r in rows]},
            "series": [{"name": c, "values": [r.get(c) for r in rows]} for c in shares],
            "omitted": 0, "unit": "share"}


def _ltv(table: Table, rows: list[dict[str, Any]]) -> dict[str, Any]:
    days = [c for c in table.columns if c.startswith("ltv_minor_d")]
    series = [{"name": r["date"], "values": [r.get(c) for c in days]} for r in rows]
    shown, omitted = _capped(series)
    return {"x": {"name": "day", "kind": "number", "values": list(range(len(days)))},
            "series": shown, "omitted": omitted, "unit": "money"}


SHAPES = {"timeseries": _timeseries, "slice": _slice, "funnel": _funnel,
          "retention": _retention, "ltv": _ltv}


def shape(kind: str, table: Table, answer: dict[str, Any]) -> dict[str, Any]:
    """The chart and the table of an answer of ``kind``."""
    rows = table.table_rows(answer)
    drawn = SHAPES[kind](table, rows)
    return {**drawn, "currency": answer.get("currency"), "columns": list(table.columns),
            "rows": [[row.get(c) for c in table.columns] for row in rows]}
