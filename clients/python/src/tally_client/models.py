"""Typed answers of every Tally route (msgspec Structs, immutable).

Rules kept by every type here: money is an ``int`` of minor units (``value_minor``,
``ltv_minor``; a JSON float there is refused, never rounded); instants are timezone-aware
``datetime`` in UTC; calendar days are ``date``; ratios are ``float | None`` (``None`` where
the contract says null: no stake, a day the watermark has not passed); FX rates are
``Decimal``. Members the server adds in a later version are ignored, so an older client keeps
decoding a newer server's answers. Where an answer has keys named by the request (the group
keys of a timeseries point, the dimension of a slice item, the ``dN`` of a retention row),
they are gathered into a typed field (``group``, ``key``, ``days``).
"""

from __future__ import annotations

from datetime import date as Date
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any

import msgspec

UtcDatetime = Annotated[datetime, msgspec.Meta(tz=True)]


class _Model(msgspec.Struct, frozen=True, kw_only=True):
    pass


class Token(_Model, frozen=True, kw_only=True):
    access_token: str
    token_type: str
    expires_in: int
    scope: str


class RejectedEvent(_Model, frozen=True, kw_only=True):
    """An event the server refused, with ``index`` its position in the batch (for
    :meth:`~tally_client.TallyClient.ingest`: in the list given to it)."""

    index: int
    detail: str
    event_id: str | None = None


class Receipt(_Model, frozen=True, kw_only=True):
    """The ``202`` answer to one batch."""

    accepted: int
    duplicates: int
    rejected: int
    errors: list[RejectedEvent] = []
    trace_id: str | None = None


class IngestResult(_Model, frozen=True, kw_only=True):
    """The receipts of every batch an event list was split into, and their totals."""

    accepted: int
    duplicates: int
    rejected: int
    errors: list[RejectedEvent]
    receipts: list[Receipt]


class _Answer(_Model, frozen=True, kw_only=True):
    """An analytics answer: ``etag`` revalidates it (``if_none_match``), ``watermark`` is
    the instant before which every event is included (``X-Data-Watermark``)."""

    etag: str | None = None
    watermark: UtcDatetime | None = None


class NotModified(_Model, frozen=True, kw_only=True):
    """The answer for ``if_none_match`` has not changed (``304``): keep the one you have."""

    etag: str
    watermark: UtcDatetime | None = None


class Point(_Model, frozen=True, kw_only=True):
    """One bucket of one group: ``value_minor`` for money metrics, ``value`` for the others
    (``None`` for an empty ratio or percentile bucket, or a withheld cell: ``suppressed``)."""

    ts: UtcDatetime
    group: dict[str, str | None] = {}
    value_minor: int | None = None
    value: int | float | None = None
    suppressed: bool = False


class Timeseries(_Answer, frozen=True, kw_only=True):
    metric: str
    granularity: str
    series: list[Point]
    next_cursor: str | None = None
    currency: str | None = None


class SliceItem(_Model, frozen=True, kw_only=True):
    key: str | None
    value_minor: int | None = None
    value: int | float | None = None
    suppressed: bool = False


class Slice(_Answer, frozen=True, kw_only=True):
    metric: str
    dim: str
    items: list[SliceItem]
    next_cursor: str | None = None
    currency: str | None = None


class FunnelStep(_Model, frozen=True, kw_only=True):
    name: str
    count: int
    rate: float | None = None
    median_sec: float | None = None


class Funnel(_Answer, frozen=True, kw_only=True):
    total: int
    steps: list[FunnelStep]
    window_sec: int | None = None
    correlate_by: str | None = None


class RetentionRow(_Model, frozen=True, kw_only=True):
    """``days[N]``: the share of the cohort that came back on day c+N (``dN`` on the wire)."""

    cohort_date: Date
    size: int
    days: dict[int, float | None] = {}


class Retention(_Answer, frozen=True, kw_only=True):
    cohort: str
    rows: list[RetentionRow]
    timezone: str | None = None
    mode: str | None = None


class LtvCohort(_Model, frozen=True, kw_only=True):
    date: Date
    size: int
    ltv_minor: list[int]


class Ltv(_Answer, frozen=True, kw_only=True):
    cohorts: list[LtvCohort]
    metric: str | None = None
    currency: str | None = None
    horizon: int | None = None
    cohort: str | None = None


class MetricInfo(_Model, frozen=True, kw_only=True):
    name: str
    unit: str
    kind: str
    definition: str
    answer_field: str
    dimensions: list[str]
    granularities: list[str]
    percentile_method: str | None = None
    window_days: int | None = None


class MetricsCatalog(_Model, frozen=True, kw_only=True):
    base_currency: str
    metrics: list[MetricInfo]
    percentile_method: str | None = None
    time: str | None = None
    money: str | None = None


class SchemaVersion(_Model, frozen=True, kw_only=True):
    version: str
    added_optional_fields: list[str] = []
    note: str | None = None


class EventTypeSchema(_Model, frozen=True, kw_only=True):
    event_type: str
    current_version: str
    accepted_majors: list[int]
    versions: list[SchemaVersion]
    payload_schema: dict[str, Any]
    player_id_required: bool = True


class SchemaRegistry(_Model, frozen=True, kw_only=True):
    event_types: list[EventTypeSchema]
    compatibility: str | None = None


class QuarantineItem(_Model, frozen=True, kw_only=True):
    """A rejected event: ``event`` exactly as the producer sent it (its player id aside)."""

    received_at: UtcDatetime
    reason: str
    event: Any
    event_id: str | None = None
    batch_index: int | None = None
    client_id: str | None = None


class QuarantinePage(_Model, frozen=True, kw_only=True):
    items: list[QuarantineItem]
    next_cursor: str | None = None


class FxRate(_Model, frozen=True, kw_only=True):
    """1 ``currency`` = ``rate`` base-currency units on ``date``."""

    date: Date
    currency: str
    rate: Decimal


class FxRates(_Model, frozen=True, kw_only=True):
    base_currency: str
    rates: list[FxRate]


class FxRatesAdded(_Model, frozen=True, kw_only=True):
    inserted: int
    unchanged: int


class AuditEntry(_Model, frozen=True, kw_only=True):
    """One audit log entry. ``raw`` is the entry exactly as the server returned it (all its
    members, ``hash`` included), from which the chain can be recomputed."""

    seq: int
    raw: dict[str, Any]
    time: UtcDatetime | None = None
    kind: str | None = None
    method: str | None = None
    route: str | None = None
    actor: dict[str, Any] | None = None  # None: a call with no client (a signed link)
    params: dict[str, Any] = {}
    filters: dict[str, Any] = {}
    withheld: list[Any] = []
    rows: int | None = None
    status: int | None = None
    outcome: str | None = None
    trace_id: str | None = None
    prev: str | None = None
    hash: str | None = None


class AuditPage(_Model, frozen=True, kw_only=True):
    items: list[AuditEntry]
    next_cursor: str | None = None


class BadEntry(_Model, frozen=True, kw_only=True):
    seq: int
    reason: str


class AuditKey(_Model, frozen=True, kw_only=True):
    kid: str
    alg: str
    public_key: str
    created_at: UtcDatetime | None = None


class AuditVerification(_Model, frozen=True, kw_only=True):
    intact: bool
    entries: int
    checkpoints: int
    first_bad: BadEntry | None = None
    head_hash: str | None = None
    latest_checkpoint: dict[str, Any] | None = None
    keys: list[AuditKey] = []


class WebhookDelivery(_Model, frozen=True, kw_only=True):
    """One attempt to deliver an export's webhook: the receiver's status (``None``: no answer)."""

    message_id: str
    at: UtcDatetime
    status: int | None = None
    error: str | None = None
    ms: float | None = None


class ExportJob(_Model, frozen=True, kw_only=True):
    """An export job (CONTRACT §8). ``download_url`` (a path, signed and expiring: no token
    needed) once it ``succeeded``, until its file expires."""

    id: str
    status: str
    format: str | None = None
    query: dict[str, Any] | None = None
    created_at: UtcDatetime | None = None
    finished_at: UtcDatetime | None = None
    rows: int | None = None
    bytes: int | None = None
    sha256: str | None = None
    watermark: UtcDatetime | None = None
    expires_at: UtcDatetime | None = None
    download_url: str | None = None
    error: str | None = None
    webhook_url: str | None = None
    deliveries: list[WebhookDelivery] = []

    @property
    def done(self) -> bool:
        return self.status in ("succeeded", "failed")


class ExportJobs(_Model, frozen=True, kw_only=True):
    items: list[ExportJob]
    next_cursor: str | None = None


class WebhookSecret(_Model, frozen=True, kw_only=True):
    """The secret that signs the webhooks sent to this client (Standard Webhooks)."""

    secret: str


class Embed(_Model, frozen=True, kw_only=True):
    """An embeddable widget (CONTRACT §9): ``url`` (a path) for an ``<iframe>``."""

    id: str
    url: str
    expires_at: UtcDatetime
