"""What an alert reads and when it breaches: one :class:`Reading` per subject.

A *subject* is what the query answers a value for: a slice's key (``{"game_id": "g1"}``), a
timeseries' group (``{"brand_id": "b1"}``, or ``{}`` without ``group_by``). Each evaluation
reads every subject's value now, by the route's own plan with the creator's principal
(``insights/kinds.py``): the same number the route answers, confined the same way.

- A **slice** is read over its whole range (a running total while ``to`` is ahead).
- A **timeseries** is read at its latest *complete* bucket: the last one, within the range,
  whose end the data watermark has passed (every event before it is in). A bucket still
  filling is never judged (a day's DAU is not low at 9 am), and a range in the future is not
  read until data reaches it.
- A **threshold** (``{"op", "value"}``) breaches when the value compares so; a null value (a
  ratio of nothing, a withheld cell) never does. A subject with no value now (a group absent
  from the latest bucket) has the route's empty value: 0 for counts and sums, null for ratios.
- **rtp_drift** is ``alerts/drift.py``'s.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from tally.errors import InvalidParameter, QueryTooLarge
from tally.insights import request as rq
from tally.insights.evaluate import answer_field, empty_value
from tally.insights.kinds import plan_for
from tally.insights.series import Context, Plan, utc_text
from tally.semantic.catalog import METRICS

MAX_SUBJECTS = 1000  # subjects an alert reads (a slice's keys, a series' groups)
OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    ">": operator.gt, "<": operator.lt, ">=": operator.ge, "<=": operator.le}


@dataclass(frozen=True)
class Reading:
    subject: dict[str, Any]
    breaching: bool
    values: dict[str, Any] = field(default_factory=dict)  # what it was judged on

    @property
    def key(self) -> str:
        return subject_key(self.subject)


def subject_key(subject: dict[str, Any]) -> str:
    return json.dumps(subject, sort_keys=True, separators=(",", ":"))


def check_kind(raw: dict[str, Any]) -> None:
    """An alert watches a timeseries or a slice (before the query is checked as its route
    checks it): ``400`` naming ``query.kind``."""
    if raw.get("kind") not in ("timeseries", "slice"):
        raise InvalidParameter("an alert watches a timeseries or a slice query: query.kind "
                               "is timeseries or slice", parameter="query.kind")


def check(query: dict[str, Any], condition: dict[str, Any]) -> None:
    """What an alert may watch, beyond its query's own checks: ``400`` naming the field."""
    if "rtp_drift" in condition:
        params = query["params"]
        if query["kind"] != "slice" or params.get("metric") != "rtp" \
                or params.get("dim") not in ("game_id", "provider_id"):
            raise InvalidParameter("rtp_drift watches a slice of metric rtp by game_id or "
                                   "provider_id", parameter="condition.rtp_drift")


def plan(query: dict[str, Any], ctx: Context) -> Plan:
    """The query's plan as its route makes it (the whole range): what it reads."""
    return plan_for(query, ctx, limit=MAX_SUBJECTS)


def read(query: dict[str, Any], condition: dict[str, Any], ctx: Context,
         whole: Plan) -> list[Reading]:
    """Every subject's reading now (``whole``: :func:`plan` of the query)."""
    if "rtp_drift" in condition:
        from tally.alerts import drift  # here: drift imports this module

        return drift.read(query, condition["rtp_drift"], ctx)
    compare = OPERATORS[condition["op"]]
    limit: float = condition["value"]
    metric = METRICS[query["params"]["metric"]]
    name, empty = answer_field(metric), empty_value(metric)
    if query["kind"] == "slice":
        answer = _run(whole)
        keys: tuple[str, ...] = (query["params"]["dim"],)
        rows: list[dict[str, Any]] = answer["items"]
        extra: dict[str, Any] = {}
    else:
        latest = latest_bucket(query, ctx.watermark(whole.brands))
        if latest is None:
            return []
        narrowed = {"kind": "timeseries", "params": {**query["params"], "from": latest[0],
                                                     "to": latest[1]}}
        rows = _run(plan_for(narrowed, ctx, limit=MAX_SUBJECTS))["series"]
        keys = tuple(k for k in (query["params"].get("group_by") or "").split(",") if k)
        extra = {"ts": latest[0]}
        if not keys and not rows:  # one series, nothing in its bucket: its empty value
            rows = [{name: empty}]
    return [Reading({k: row.get(k) for k in keys},
                    row.get(name) is not None and compare(row[name], limit),
                    {name: row.get(name), **extra}) for row in rows]


def absent(query: dict[str, Any], condition: dict[str, Any],
           subject: dict[str, Any]) -> Reading:
    """The reading of a firing subject the answer no longer lists: the route's empty value
    (rtp_drift: nothing to judge, so not breaching)."""
    if "rtp_drift" in condition:
        return Reading(subject, False, {})
    metric = METRICS[query["params"]["metric"]]
    value = empty_value(metric)
    return Reading(subject, value is not None
                   and OPERATORS[condition["op"]](value, condition["value"]),
                   {answer_field(metric): value})


def _run(plan_: Plan) -> dict[str, Any]:
    answer = plan_.run()
    if answer.get("next_cursor"):
        raise QueryTooLarge(f"the query answers more than {MAX_SUBJECTS} keys or groups: "
                            "narrow it with a filter", limit="max_subjects")
    return answer


def latest_bucket(query: dict[str, Any], watermark: datetime | None) -> tuple[str, str] | None:
    """``[from, to)`` of the timeseries' latest bucket complete by ``watermark``, if any."""
    if watermark is None:
        return None
    params = query["params"]
    step = rq.GRANULARITIES[params["granularity"]]
    start = _epoch(rq.parse_instant(params["from"], "from"))
    end = _epoch(rq.parse_instant(params["to"], "to"))
    complete = _epoch(watermark) // step * step
    last_end = min(end, complete)
    if last_end - step < start:
        return None
    return utc_text(last_end - step), utc_text(last_end)


def _epoch(moment: datetime) -> int:
    return int(moment.replace(tzinfo=UTC).timestamp())
