"""The typed models of the HTTP contract (CONTRACT §3–4, §6): every route's query parameters
and JSON bodies are parsed with these — strictly: a parameter or field a model does not
define is ``400 unknown-parameter`` naming it (``api/strict.py``) — and every answer is
documented with them. ``/openapi.json`` is generated from this module, so the document and
the parsing cannot disagree.

The models check shape (names, types, enums, ranges); the meaning (a filter key that applies
to the metric, ``from`` before ``to``, the caller's limits) is checked by the query layers
below (``insights/``, ``cohorts/``), which answer ``400``/``403`` naming what is wrong.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    create_model,
)

from tally.api.cursors import MAX_POSITION
from tally.cohorts.request import (
    CORRELATE_FIELDS,
    EVENT_FILTER_KEYS,
    FIELD_TYPES,
    MAX_EXCLUSIONS,
    MAX_STEPS,
    MAX_WINDOW,
    PLAYER_FILTER_KEYS,
)
from tally.cohorts.retention import MAX_DAY, MODES
from tally.errors import InvalidParameter, UnknownParameter, UserError
from tally.events.registry import REGISTRY
from tally.insights.request import shown
from tally.semantic.catalog import DIMENSIONS, METRICS

_DIGITS = re.compile(r"[0-9]{1,19}", re.ASCII)


def _ascii_count(value: Any) -> Any:
    """A query string count: ASCII digits only (no sign, ``_``, ``.0`` or other scripts)."""
    if isinstance(value, str) and not _DIGITS.fullmatch(value):
        raise ValueError("must be ASCII digits")
    return value


def Count(low: int, high: int, description: str, example: int = 100) -> Any:  # noqa: N802
    """A bounded count parameter (a type factory)."""
    return Annotated[int, Field(ge=low, le=high, description=description, examples=[example]),
                     BeforeValidator(_ascii_count)]


def _enum(values: tuple[str, ...] | list[str]) -> dict[str, Any]:
    return {"enum": list(values)}


def _kv_list(keys: tuple[str, ...] | list[str]) -> str:
    """A regex of ``key:value,key:value`` on ``keys``."""
    pair = f"(?:{'|'.join(keys)}):[^,]+"
    return f"^(?:{pair}(?:,{pair})*)?$"  # empty: no filter


INSTANT = ("RFC 3339 date-time with offset (`2026-11-02T10:00:00Z`) or `YYYY-MM-DD` "
           "(00:00 UTC), 1900-01-01 to 2300-01-01")
DAY = "A calendar day, `YYYY-MM-DD`"
METRIC_NAMES = tuple(METRICS)
DIMENSION_NAMES = tuple(DIMENSIONS)

MetricName = Annotated[str, Field(description="A metric of the catalog (`GET /v1/metrics`).",
                                  json_schema_extra=_enum(METRIC_NAMES),
                                  examples=["ggr"])]
From = Annotated[str, Field(alias="from", description=f"Start, inclusive: {INSTANT}.",
                            examples=["2026-11-01"])]
To = Annotated[str, Field(alias="to", description=f"End, exclusive: {INSTANT}.",
                          examples=["2026-11-08"])]
Filters = Annotated[str | None, Field(
    description="`key:value,key:value` on the metric's dimensions; a repeated key's values "
                "are OR-ed, keys AND-ed. A value outside the token's limits is 403.",
    pattern=_kv_list(DIMENSION_NAMES), examples=["brand_id:brand-1,region:EU"])]
Cursor = Annotated[str | None, Field(
    description="`next_cursor` of the previous page of this same query.",
    pattern=r"^[A-Za-z0-9_-]+$", examples=["WzEwMDAsIjNmOWEyYjFjIl0"])]
Currency = Annotated[str | None, Field(
    description="Reporting currency (ISO 4217); default: the deployment's base currency.",
    pattern=r"^[A-Z]{3}$", examples=["EUR"])]


class QueryModel(BaseModel):
    """Query parameters: lax on types (they arrive as text), closed on names."""

    model_config = ConfigDict(extra="forbid", populate_by_name=False)


class TimeseriesQuery(QueryModel):
    metric: MetricName
    granularity: Literal["1m", "5m", "1h", "1d"] = Field(
        description="Bucket width; buckets are aligned to UTC (1d = UTC day).")
    from_: From
    to: To
    filters: Filters = None
    group_by: Annotated[str | None, Field(
        description="Comma-separated filter keys to split the series by.",
        pattern=rf"^(?:(?:{'|'.join(DIMENSION_NAMES)})(?:,(?:{'|'.join(DIMENSION_NAMES)}))*)?$",
        examples=["brand_id"])] = None
    currency: Currency = None
    cursor: Cursor = None
    limit: Count(1, 10_000, "Points per page, 1 to 10000 (default 1000).") = None  # type: ignore[valid-type]


class SliceQuery(QueryModel):
    metric: MetricName
    dim: Annotated[str, Field(description="The dimension to rank by.",
                              json_schema_extra=_enum(DIMENSION_NAMES),
                              examples=["game_id"])]
    from_: From
    to: To
    filters: Filters = None
    currency: Currency = None
    order: Literal["-value", "value"] = Field(
        "-value", description="`-value` (descending, default) or `value`; ties by key.")
    cursor: Cursor = None
    limit: Count(1, 1000, "Items per page, 1 to 1000 (default 50).") = None  # type: ignore[valid-type]


LTV_FILTER_KEYS = ("brand_id", "region", "currency", *[
    name for name, dim in DIMENSIONS.items() if dim.player_attribute])


class LtvQuery(QueryModel):
    cohort: Literal["first_deposit", "registration"] = Field(
        "first_deposit", description="Who forms a cohort day.")
    metric: Literal["ggr", "ngr"] = Field("ggr", description="The money metric accumulated.")
    horizon: Annotated[str | None, Field(
        description=f"Days per cohort, `Nd` with N from 1 to {MAX_DAY} (default 90d).",
        pattern=r"^[0-9]{1,3}d?$", examples=["30d"])] = None
    start_date: Annotated[str, Field(description=f"First cohort day. {DAY}.",
                                     examples=["2026-11-01"])]
    end_date: Annotated[str, Field(description=f"Last cohort day (inclusive). {DAY}.",
                                   examples=["2026-11-07"])]
    filters: Annotated[str | None, Field(
        description="`key:value,…` on the cohort's players and their events.",
        pattern=_kv_list(LTV_FILTER_KEYS), examples=["brand_id:brand-1"])] = None
    currency: Currency = None


class PageQuery(QueryModel):
    cursor: Cursor = None
    limit: Count(1, 1000, "Items per page, 1 to 1000 (default 100).") = None  # type: ignore[valid-type]


class QuarantineQuery(PageQuery):
    brand_id: list[str] | None = Field(
        None, description="Only entries of this brand (repeatable; OR-ed). A brand outside "
                          "the token's limits is 403.", examples=[["brand-1"]])
    region: list[str] | None = Field(
        None, description="Only entries of this region (repeatable; OR-ed). A region outside "
                          "the token's limits is 403.", examples=[["EU"]])


class AuditQuery(PageQuery):
    after: Count(0, MAX_POSITION, "Entries with `seq` greater than this.", 0) = None  # type: ignore[valid-type]


# ---- JSON bodies: closed at every depth, no coercion (a "1" is not 1, true is not 1)


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=False)


def _non_empty(values: list[Any]) -> list[Any]:
    if not values:
        raise ValueError("must not be empty")
    return values


EVENT_TYPES = tuple(sorted(REGISTRY))
EventType = Annotated[str, Field(description="An event type of the registry (`GET /v1/schemas`).",
                                 json_schema_extra=_enum(EVENT_TYPES))]
PositiveSeconds = Annotated[int, Field(ge=1, le=MAX_WINDOW)]


def _payload_conditions() -> dict[str, Any]:
    """A step's optional conditions: each queryable payload field, one value or a list."""
    fields: dict[str, Any] = {}
    for name, kind in FIELD_TYPES.items():
        fields[name] = (Annotated[kind | list[kind], AfterValidator(  # type: ignore[valid-type]
            lambda v: _non_empty(v) if isinstance(v, list) else v), Field(
            description=f"Only events whose payload `{name}` is this value (or one of these)."
        )] | None, None)
    return fields


_STEP_FIELDS: dict[str, Any] = {
    "event": (EventType, ...),
    "name": (Annotated[str, Field(min_length=1, description="Shown name (default: event).")]
             | None, None),
    **_payload_conditions(),
}
StepObject = create_model("StepObject", __base__=Body, **_STEP_FIELDS)
FunnelStepObject = create_model(
    "FunnelStepObject", __base__=Body, **_STEP_FIELDS,
    within_sec=(PositiveSeconds | None, Field(
        None, description="At most this long after the previous step (not on step 1).")))
ExclusionObject = create_model(
    "ExclusionObject", __base__=Body, **_STEP_FIELDS,
    between=(Annotated[list[int], Field(min_length=2, max_length=2)] | None, Field(
        None, description="`[i, j]`: a unit with this event between steps i and j (1-based) "
                          "drops out there (default: the whole funnel).")))



def _filter_fields(keys: tuple[str, ...]) -> dict[str, Any]:
    return {key: (str | list[str] | None, Field(None, description=f"Only `{key}` (any of "
                                                                  "a list)."))
            for key in keys}


FunnelFilters = create_model("FunnelFilters", __base__=Body, **_filter_fields(EVENT_FILTER_KEYS))
PlayerFilters = create_model("PlayerFilters", __base__=Body, **_filter_fields(PLAYER_FILTER_KEYS))


class FunnelBody(Body):
    """``POST /v1/analytics/funnel`` (docs/cohorts.md#funnels)."""

    steps: list[EventType | FunnelStepObject] = Field(
        min_length=1, max_length=MAX_STEPS,
        description="Ordered steps: an event type, or an object with conditions.")
    window_sec: PositiveSeconds = Field(description="All steps within this of entering.")
    from_: From
    to: To
    filters: FunnelFilters | None = None
    correlate_by: Literal[CORRELATE_FIELDS] = Field(  # type: ignore[valid-type]
        "player_id", description="The unit counted: distinct values of this field.")
    exclusions: list[EventType | ExclusionObject] = Field(
        [], max_length=MAX_EXCLUSIONS, description="Events that drop a unit out.")


class RetentionBody(Body):
    """``POST /v1/analytics/retention`` (docs/cohorts.md#retention)."""

    cohort: Literal["first_deposit", "registration"]
    start_date: Annotated[str, Field(description=f"First cohort day. {DAY}.",
                                     examples=["2026-11-01"])]
    end_date: Annotated[str, Field(description=f"Last cohort day (inclusive). {DAY}.",
                                   examples=["2026-11-07"])]
    return_event: EventType | StepObject = Field(
        "bet.placed", description="What counts as a return.")
    days: list[Annotated[int, Field(ge=0, le=MAX_DAY)]] = Field(
        [1, 7, 14, 30], min_length=1, max_length=64, description="Distinct day offsets N.")
    filters: PlayerFilters | None = None
    timezone: str = Field("UTC", description="IANA time zone of the cohort days.",
                          examples=["Europe/London"])
    mode: Literal[MODES] = Field("on", description="`on` day c+N, or `on_or_after` it.")  # type: ignore[valid-type]


class FxRate(Body):
    date: Annotated[str, Field(description=f"{DAY}, from 1900-01-01 to 2299-12-31.",
                               examples=["2026-11-02"])]
    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$", examples=["GBP"])]
    rate: Annotated[str, Field(description="Base-currency units per unit of `currency`, a "
                                           "decimal string.", examples=["1.1534"])]


def validated(model: type[BaseModel], value: Any, where: str = "body") -> Any:
    """``value`` checked against ``model`` (its dump by alias, ``None`` left out), or the
    one problem naming every field at fault (:func:`problem_for`)."""
    try:
        return model.model_validate(value).model_dump(by_alias=True, exclude_unset=True)
    except ValidationError as exc:
        raise problem_for(exc.errors(), where) from None


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not out:
            out = str(part)
        # a union's branch name (``str``, ``FunnelStepObject``) is not a field
        elif not part[:1].isupper() and part not in ("str", "int", "bool", "list[str]",
                                                        "list[int]", "list[bool]"):
            out += f".{part}"
    return out


def problem_for(errors: Any, where: str) -> UserError:
    """A pydantic error list as the one ``400``: ``unknown-parameter`` when any field is not
    defined (naming all such), else ``invalid-parameter``."""
    unknown: list[str] = []
    found: list[dict[str, str]] = []
    for err in errors:
        loc = tuple(err.get("loc", ()))
        if loc and loc[0] in ("query", "body", "header"):
            where, loc = str(loc[0]), loc[1:]
        name = _path(loc) or where
        if err.get("type") == "extra_forbidden":
            unknown.append(name)
        msg = str(err.get("msg", ""))
        given = err.get("input")
        if err.get("type") != "missing" and isinstance(given, (str, int, float)):
            msg = f"{shown(str(given))} given; {msg[:1].lower()}{msg[1:]}"
        found.append({"parameter": name, "msg": msg})
    if unknown:
        names = ", ".join(repr(u) for u in dict.fromkeys(unknown))
        return UnknownParameter(f"unknown {where} field(s) {names}: this route does not "
                                "define them (see /openapi.json)", parameters=unknown)
    # one message per field (a union reports each branch: keep the first)
    first: dict[str, str] = {}
    for item in found:
        first.setdefault(item["parameter"], item["msg"])
    detail = "; ".join(f"{name}: {msg}" for name, msg in first.items()) or "invalid request"
    return InvalidParameter(detail,
                            errors=[{"parameter": k, "msg": v} for k, v in first.items()])


class ExportBody(BaseModel):
    """``POST /v1/exports`` (CONTRACT §8): the query, as its route takes it, and the format."""

    model_config = ConfigDict(extra="forbid")
    query: dict[str, Any] = Field(
        description=('{"kind": "timeseries"|"slice"|"ltv", ...that route\'s query '
                     'parameters} or {"kind": "funnel"|"retention", ...that route\'s body}'),
        examples=[{"kind": "timeseries", "metric": "ggr", "granularity": "1h",
                   "from": "2025-10-23T00:00:00Z", "to": "2025-10-24T00:00:00Z"}])
    format: Literal["csv", "parquet"]
    webhook_url: str | None = Field(None, max_length=2048, description=(
        "https URL told of the outcome (docs/api.md#webhooks)."))


class ThresholdCondition(BaseModel):
    """Fires while the value compares so with ``value`` (a null value never does)."""

    model_config = ConfigDict(extra="forbid")
    op: Literal[">", "<", ">=", "<="]
    value: float = Field(strict=True, allow_inf_nan=False, description=(
        "In the answer's unit: minor units for money, a fraction for ratios."))


class RtpDrift(BaseModel):
    model_config = ConfigDict(extra="forbid")
    theoretical: float = Field(gt=0, le=10, allow_inf_nan=False,
                               description="The game's theoretical RTP, e.g. 0.96.")
    confidence: float = Field(ge=0.5, le=0.999999, allow_inf_nan=False, description=(
        "Of the interval around the theoretical RTP: 0.999 fires for 1 game in 1,000 that "
        "plays true."))
    min_bets: int = Field(1000, ge=30, le=1_000_000_000, description=(
        "A key is judged once it has this many bets (the interval is a normal "
        "approximation)."))


class DriftCondition(BaseModel):
    """Fires when a key's observed RTP lies outside the confidence interval of its
    theoretical RTP given its bets (docs/alerts.md#rtp-drift)."""

    model_config = ConfigDict(extra="forbid")
    rtp_drift: RtpDrift


def _condition_kind(value: Any) -> str:
    """The condition's branch, of a body's object or of a model (when dumped)."""
    drift = isinstance(value, DriftCondition) or (isinstance(value, dict)
                                                  and "rtp_drift" in value)
    return "RtpDrift" if drift else "Threshold"


class AlertBody(BaseModel):
    """``POST /v1/alerts`` (CONTRACT §11): a rule on a timeseries or slice query."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    query: dict[str, Any] = Field(
        description=('{"kind": "timeseries"|"slice", ...that route\'s query parameters} '
                     "(no limit or cursor): a timeseries is judged at its latest complete "
                     "bucket, a slice over its range (docs/alerts.md)."),
        examples=[{"kind": "timeseries", "metric": "dau", "granularity": "1d",
                   "from": "2026-01-01", "to": "2027-01-01", "group_by": "brand_id"}])
    condition: Annotated[
        Annotated[ThresholdCondition, Tag("Threshold")] | Annotated[DriftCondition,
                                                                    Tag("RtpDrift")],
        Discriminator(_condition_kind)]
    webhook_url: str = Field(max_length=2048, description=(
        "https URL told of each firing and resolution (docs/alerts.md#webhooks)."))
    every_seconds: int = Field(60, ge=1, le=86_400, description=(
        "The least time between two evaluations of the rule."))


class EmbedBody(BaseModel):
    """``POST /v1/embeds`` (CONTRACT §9): a query, as in an export, and how to draw it."""

    model_config = ConfigDict(extra="forbid")
    query: dict[str, Any] = Field(
        description="As in POST /v1/exports: {\"kind\": ..., ...that route's parameters or "
                    "body}; a slice's limit is kept (its top N), a cursor is not.",
        examples=[{"kind": "timeseries", "metric": "rtp", "granularity": "1h",
                   "from": "2025-10-23T00:00:00Z", "to": "2025-10-24T00:00:00Z"}])
    chart: Literal["line", "bar", "table", "funnel"] = Field(description=(
        "line: timeseries, retention, ltv; bar: timeseries, slice, funnel, retention; "
        "table: any; funnel: funnel."))
    title: str | None = Field(None, min_length=1, max_length=200)
    ttl_seconds: int = Field(3600, ge=60, le=86_400, description="How long the URL works.")
    refresh_seconds: int | None = Field(None, ge=10, le=86_400, description=(
        "The page fetches its data again this often (unset: once)."))
