"""The documented answers of every route (response schemas in ``/openapi.json``), and the
problem answers each route may give (``responses(...)``). Schemathesis checks every answer
against these in ``make test`` (tests/test_schemathesis.py), so they cannot drift."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tally.errors import PROBLEM_BASE, PROBLEM_MEDIA_TYPE, PROBLEM_TYPES


class Open(BaseModel):
    """An answer object: the members listed, and possibly more (clients must ignore those)."""

    model_config = ConfigDict(extra="allow")


class Problem(Open):
    """RFC 9457 problem details. ``type`` is one stable URI per error class
    (docs/api.md#problem-types); extension members (``parameter``, ``parameters``, ``errors``,
    ``missing_scope``, ``retry_after``, ``limit``, OAuth's ``error``/``error_description``)
    add specifics."""

    type: str = Field(description="Stable URI of the error class.",
                      examples=[PROBLEM_BASE + "unknown-parameter"])
    title: str
    status: int
    detail: str = Field(description="Human-readable explanation (prose; do not parse).")
    instance: str | None = None
    trace_id: str | None = Field(None, description="Quote it when reporting a problem.")


# ---- analytics


class Valued(Open):
    """``value_minor`` (money, an integer) or ``value`` (counts, ratios: ``null`` when there
    is nothing to divide); ``suppressed`` when withheld below the client's minimum group."""

    value_minor: int | None = None
    value: float | int | None = None
    suppressed: bool | None = None


class SeriesPoint(Valued):
    """One bucket of one group: ``ts``, the ``group_by`` keys and the value."""

    ts: str = Field(description="Bucket start, RFC 3339 UTC.")


class Timeseries(Open):
    metric: str
    granularity: str
    currency: str
    series: list[SeriesPoint]
    next_cursor: str | None


class SliceItem(Valued):
    """``{<dim>: key, "value_minor" | "value"}``."""


class Slice(Open):
    metric: str
    dim: str
    currency: str
    items: list[SliceItem]
    next_cursor: str | None


class FunnelStep(Open):
    name: str
    count: int | None
    rate: float | None
    median_sec: float | None = None
    suppressed: bool | None = None


class Funnel(Open):
    total: int | None
    steps: list[FunnelStep]
    window_sec: int
    correlate_by: str


class RetentionRow(Open):
    """``cohort_date``, ``size`` and one ``dN`` share per day asked (``null`` until the
    watermark has passed day c+N)."""

    cohort_date: str
    size: int | None


class Retention(Open):
    cohort: str
    timezone: str
    mode: str
    rows: list[RetentionRow]


class LtvCohort(Open):
    date: str
    size: int | None
    ltv_minor: list[int] | None


class Ltv(Open):
    metric: str
    currency: str
    horizon: int
    cohort: str
    cohorts: list[LtvCohort]


class ExportJob(Open):
    """An export job (CONTRACT §8); ``download_url`` (signed, expiring, no token needed) once
    it succeeded, until its file expires (``expires_at``)."""

    id: str
    status: str = Field(description="queued, running, succeeded or failed.")
    links: dict[str, str] | None = None
    created_at: str | None = None
    rows: int | None = None
    bytes: int | None = None
    sha256: str | None = None
    watermark: str | None = None
    expires_at: str | None = None
    download_url: str | None = None
    error: str | None = None


class ExportJobs(Open):
    items: list[ExportJob]
    next_cursor: str | None


class Alert(Open):
    """An alert rule (CONTRACT §11) and its last evaluation: ``breaching`` subjects then,
    ``error`` why it could not be evaluated (null: it was)."""

    id: str
    name: str
    query: dict[str, Any]
    condition: dict[str, Any]
    webhook_url: str
    every_seconds: int
    created_at: str
    evaluated_at: str | None
    breaching: int
    error: str | None
    links: dict[str, str]


class Alerts(Open):
    items: list[Alert]
    next_cursor: str | None


class AlertEvent(Open):
    """A firing or a resolution (``type``), what its webhook says (``data``) and how its
    delivery goes (``delivery.status``: pending, delivered, failed or cancelled)."""

    id: str
    type: str = Field(description="alert.firing or alert.resolved.")
    at: str
    data: dict[str, Any]
    delivery: dict[str, Any]


class AlertEvents(Open):
    items: list[AlertEvent]
    next_cursor: str | None


class WebhookSecret(Open):
    """The secret that signs this client's webhooks (Standard Webhooks): verify
    ``webhook-signature`` with it. After a rotation the old secret signs alongside for 24 h
    (a message then carries both signatures)."""

    secret: str = Field(description="whsec_ and 32 bytes, base64.",
                        examples=["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"])


class MetricInfo(Open):
    name: str


class Catalog(Open):
    base_currency: str
    metrics: list[MetricInfo]
    analyses: list[str]
    dimensions: list[dict[str, Any]]


# ---- ingestion and operations


class Rejection(Open):
    index: int
    event_id: str | None = None
    detail: str


class Receipt(Open):
    accepted: int
    duplicates: int
    rejected: int
    errors: list[Rejection]
    trace_id: str


class Token(Open):
    access_token: str
    token_type: str = Field(examples=["Bearer"])
    expires_in: int
    scope: str


class Jwks(Open):
    keys: list[dict[str, Any]]


class FxInserted(Open):
    inserted: int
    unchanged: int


class FxListing(Open):
    base_currency: str
    rates: list[dict[str, str]]


class QuarantineItem(Open):
    received_at: str
    reason: str
    event: Any = Field(description="The event as sent (any JSON).")
    event_id: str | None = None
    batch_index: int | None = None
    client_id: str | None = None


class Quarantine(Open):
    items: list[QuarantineItem]
    next_cursor: str | None


class AuditPage(Open):
    items: list[dict[str, Any]]
    next_cursor: str | None


class Status(Open):
    status: str


def problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` of the problem statuses a route may answer, each listing the problem
    types of that status."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in sorted(set(statuses)):
        types = [t for t in PROBLEM_TYPES.values() if t.status == status]
        listed = "; ".join(f"`{t.code}`: {t.description}" for t in types)
        out[status] = {
            "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
            "description": listed or "A problem (RFC 9457).",
        }
    return out


# every route: bad input, rate limits and an unavailable store, body and head limits
COMMON = (400, 406, 429, 500, 503)
AUTHED = (*COMMON, 401, 403)


class EmbedCreated(Open):
    """A widget (CONTRACT §9): ``url`` is ``/embed/<signed token>``, for an ``<iframe>``."""

    id: str
    url: str
    expires_at: str


class EmbedSeries(Open):
    name: str
    values: list[float | int | None]


class EmbedAxis(Open):
    name: str
    kind: str = Field(description="time (epoch seconds), category or number.")
    values: list[int | str]


class EmbedData(Open):
    """What a widget's page draws: its chart (x axis and series, money in minor units of
    ``currency``) and its table (``columns`` and ``rows``: the route's rows)."""

    id: str
    kind: str
    chart: str
    title: str | None
    refresh_seconds: int | None
    expires_at: str
    watermark: str
    x: EmbedAxis
    series: list[EmbedSeries]
    omitted: int = Field(description="Series not drawn (over 10): the table has them all.")
    unit: str = Field(description="money, count, share or number.")
    currency: str | None
    columns: list[str]
    rows: list[list[Any]]
    more: bool = Field(description="The route has more rows than the widget shows.")
