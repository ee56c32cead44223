"""Each route's request and the shape of its answer, once for both clients.

A builder turns typed arguments into a :class:`Send` — the wire names of CONTRACT §3–§6 and
docs/api.md, and only parameters the route defines (Tally refuses unknown ones) — and pairs
it with the parser of the answer. Values are checked here where the wire cannot carry them
(a naive ``datetime``, a filter value holding the ``,`` that separates filters), so such a
mistake is a ``ValueError`` before anything is sent, never a silently different query.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Generic, TypeVar, cast
from urllib.parse import parse_qsl

import httpx
import msgspec

from tally_client._exchange import Send, answer_decoder, decoder
from tally_client.models import (
    AuditPage,
    AuditVerification,
    Embed,
    ExportJob,
    ExportJobs,
    Funnel,
    FxRate,
    FxRates,
    FxRatesAdded,
    Ltv,
    MetricsCatalog,
    NotModified,
    QuarantinePage,
    Receipt,
    Retention,
    SchemaRegistry,
    Slice,
    Timeseries,
    WebhookSecret,
)
from tally_client.problems import problem_from

T = TypeVar("T")
Instant = datetime | date | str
Day = date | str
Filters = Mapping[str, str | Sequence[str]]
JSON = {"Content-Type": "application/json"}
POINT_FIELDS = ("ts", "value_minor", "value", "suppressed")
DAY_KEY = re.compile(r"d(\d+)")


@dataclass(frozen=True)
class Call(Generic[T]):
    send: Send
    parse: Callable[[httpx.Response], T]


def fresh(route: Call[T | NotModified]) -> Call[T]:
    """A conditional route asked without ``if_none_match``: it never answers NotModified."""
    return cast("Call[T]", route)


def instant(value: Instant, name: str) -> str:
    """RFC 3339 (a ``datetime``, which must carry its offset) or ``YYYY-MM-DD`` (a ``date``,
    meaning 00:00 UTC); a string is sent as given."""
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"{name}: a naive datetime is ambiguous; give it a timezone")
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


def day(value: Day, name: str) -> str:
    if isinstance(value, datetime):
        raise ValueError(f"{name} is a calendar day: give a date, not a datetime")
    return value.isoformat() if isinstance(value, date) else str(value)


def filter_text(filters: Filters) -> str:
    """``key:value,key:value`` (a key repeats for each of its values, which are OR-ed)."""
    parts = []
    for key, values in filters.items():
        for value in [values] if isinstance(values, str) else values:
            if "," in value or "," in key or ":" in key:
                raise ValueError(f"filter {key}:{value} cannot be sent: ',' separates "
                                 "filters and ':' a key from its value")
            parts.append(f"{key}:{value}")
    return ",".join(parts)


def _params(**values: str | int | None) -> tuple[tuple[str, str], ...]:
    """Query parameters by wire name (``from_`` is sent as ``from``); ``None`` is left out."""
    return tuple((name.rstrip("_"), str(value)) for name, value in values.items()
                 if value is not None)


def _keys(value: str | Sequence[str] | None) -> str | None:
    return value if value is None or isinstance(value, str) else ",".join(value)


def _answer(send: Send, cls: type[T], reshape: Callable[[Any], Any] | None,
            if_none_match: str | None) -> Call[T | NotModified]:
    if if_none_match is not None:
        send = Send(send.method, send.path, send.params, send.content,
                    {**send.headers, "If-None-Match": if_none_match})
    return Call(send, answer_decoder(cls, reshape, if_none_match))


def _points(body: Any) -> Any:
    """Timeseries points: the group keys (named by ``group_by``) gathered in ``group``."""
    body["series"] = [{**{k: p[k] for k in POINT_FIELDS if k in p},
                       "group": {k: v for k, v in p.items() if k not in POINT_FIELDS}}
                      for p in body["series"]]
    return body


def _items(body: Any) -> Any:
    """Slice items: the value of the dimension (named by ``dim``) as ``key``."""
    dim = body["dim"]
    body["items"] = [{**{k: v for k, v in item.items() if k != dim}, "key": item.get(dim)}
                     for item in body["items"]]
    return body


def _rows(body: Any) -> Any:
    """Retention rows: ``dN`` members gathered in ``days`` keyed by N."""
    rows = []
    for row in body["rows"]:
        days = {int(m.group(1)): v for k, v in row.items() if (m := DAY_KEY.fullmatch(k))}
        rows.append({**{k: v for k, v in row.items() if not DAY_KEY.fullmatch(k)},
                     "days": days})
    body["rows"] = rows
    return body


def _entries(body: Any) -> Any:
    body["items"] = [{**entry, "raw": entry} for entry in body["items"]]
    return body


def timeseries(metric: str, granularity: str, from_: Instant, to: Instant,
               filters: Filters | None, group_by: str | Sequence[str] | None,
               currency: str | None, limit: int | None, cursor: str | None,
               if_none_match: str | None) -> Call[Timeseries | NotModified]:
    params = _params(metric=metric, granularity=granularity, from_=instant(from_, "from_"),
                     to=instant(to, "to"), filters=filter_text(filters) if filters else None,
                     group_by=_keys(group_by), currency=currency, limit=limit, cursor=cursor)
    return _answer(Send("GET", "/v1/analytics/timeseries", params), Timeseries, _points,
                   if_none_match)


def slice_(metric: str, dim: str, from_: Instant, to: Instant, filters: Filters | None,
           currency: str | None, order: str | None, limit: int | None, cursor: str | None,
           if_none_match: str | None) -> Call[Slice | NotModified]:
    params = _params(metric=metric, dim=dim, from_=instant(from_, "from_"),
                     to=instant(to, "to"), filters=filter_text(filters) if filters else None,
                     currency=currency, order=order, limit=limit, cursor=cursor)
    return _answer(Send("GET", "/v1/analytics/slice", params), Slice, _items, if_none_match)


def _step(step: str | Mapping[str, Any]) -> Mapping[str, Any]:
    return {"event": step} if isinstance(step, str) else step


def _body(**members: Any) -> bytes:
    return msgspec.json.encode({k.rstrip("_"): v for k, v in members.items() if v is not None})


def funnel(steps: Sequence[str | Mapping[str, Any]], window_sec: int, from_: Instant,
           to: Instant, filters: Filters | None, correlate_by: str | None,
           exclusions: Sequence[Mapping[str, Any]] | None,
           if_none_match: str | None) -> Call[Funnel | NotModified]:
    body = _body(steps=[_step(s) for s in steps], window_sec=window_sec,
                 from_=instant(from_, "from_"), to=instant(to, "to"), filters=filters,
                 correlate_by=correlate_by, exclusions=exclusions)
    return _answer(Send("POST", "/v1/analytics/funnel", content=body, headers=JSON), Funnel,
                   None, if_none_match)


def retention(cohort: str, start_date: Day, end_date: Day,
              return_event: str | Mapping[str, Any] | None, days: Sequence[int] | None,
              filters: Filters | None, timezone: str | None, mode: str | None,
              if_none_match: str | None) -> Call[Retention | NotModified]:
    body = _body(cohort=cohort, start_date=day(start_date, "start_date"),
                 end_date=day(end_date, "end_date"), return_event=return_event,
                 days=list(days) if days is not None else None, filters=filters,
                 timezone=timezone, mode=mode)
    return _answer(Send("POST", "/v1/analytics/retention", content=body, headers=JSON),
                   Retention, _rows, if_none_match)


def ltv(start_date: Day, end_date: Day, cohort: str | None, metric: str | None,
        horizon: int | str | None, filters: Filters | None, currency: str | None,
        if_none_match: str | None) -> Call[Ltv | NotModified]:
    params = _params(cohort=cohort, metric=metric,
                     horizon=f"{horizon}d" if isinstance(horizon, int) else horizon,
                     start_date=day(start_date, "start_date"),
                     end_date=day(end_date, "end_date"),
                     filters=filter_text(filters) if filters else None, currency=currency)
    return _answer(Send("GET", "/v1/analytics/ltv", params), Ltv, None, if_none_match)


def metrics() -> Call[MetricsCatalog]:
    return Call(Send("GET", "/v1/metrics"), decoder(MetricsCatalog))


def schemas() -> Call[SchemaRegistry]:
    return Call(Send("GET", "/v1/schemas"), decoder(SchemaRegistry))


def batch(content: bytes, idempotency_key: str) -> Call[Receipt]:
    headers = {**JSON, "X-Idempotency-Key": idempotency_key}
    return Call(Send("POST", "/v1/events:batch", content=content, headers=headers),
                decoder(Receipt, status=202))


def quarantine(brand_id: str | Sequence[str] | None, region: str | Sequence[str] | None,
               limit: int | None, cursor: str | None) -> Call[QuarantinePage]:
    params = [*_params(limit=limit, cursor=cursor)]
    for name, values in (("brand_id", brand_id), ("region", region)):  # repeatable
        params += [(name, v) for v in ([values] if isinstance(values, str) else values or ())]
    return Call(Send("GET", "/v1/admin/quarantine", tuple(params)), decoder(QuarantinePage))


def add_fx_rates(rates: Sequence[FxRate]) -> Call[FxRatesAdded]:
    body = msgspec.json.encode([{"date": r.date.isoformat(), "currency": r.currency,
                                 "rate": str(r.rate)} for r in rates])
    return Call(Send("POST", "/v1/admin/fx-rates", content=body, headers=JSON),
                decoder(FxRatesAdded))


def fx_rates() -> Call[FxRates]:
    return Call(Send("GET", "/v1/admin/fx-rates"), decoder(FxRates))


def audit(after: int | None, limit: int | None, cursor: str | None) -> Call[AuditPage]:
    return Call(Send("GET", "/v1/admin/audit", _params(after=after, limit=limit,
                                                       cursor=cursor)),
                decoder(AuditPage, _entries))


def verify_audit() -> Call[AuditVerification]:
    return Call(Send("GET", "/v1/admin/audit/verify"), decoder(AuditVerification))


def _query(kind: str, query: Mapping[str, Any]) -> dict[str, Any]:
    """A stored query (exports, embeds): ``kind`` and that route's parameters or body, as
    the route takes them (wire names: ``from``, not ``from_``)."""
    return {"kind": kind, **{k.rstrip("_"): v for k, v in query.items() if v is not None}}


def create_export(kind: str, query: Mapping[str, Any], format_: str,
                  webhook_url: str | None) -> Call[ExportJob]:
    body = _body(query=_query(kind, query), format_=format_, webhook_url=webhook_url)
    return Call(Send("POST", "/v1/exports", content=body, headers=JSON),
                decoder(ExportJob, status=202))


def export_job(job_id: str) -> Call[ExportJob]:
    return Call(Send("GET", f"/v1/exports/{job_id}"), decoder(ExportJob))


def exports(limit: int | None, cursor: str | None) -> Call[ExportJobs]:
    return Call(Send("GET", "/v1/exports", _params(limit=limit, cursor=cursor)),
                decoder(ExportJobs))


def download(url: str) -> Call[bytes]:
    """An export's file by its signed ``download_url`` (``path?expires=…&signature=…``)."""
    path, _, query = url.partition("?")

    def parse(response: httpx.Response) -> bytes:
        if response.status_code != 200:
            raise problem_from(response)
        return response.content

    return Call(Send("GET", path, tuple(parse_qsl(query))), parse)


def webhook_secret(rotate: bool) -> Call[WebhookSecret]:
    return Call(Send("POST" if rotate else "GET", "/v1/webhook-secret"),
                decoder(WebhookSecret))


def create_embed(kind: str, query: Mapping[str, Any], chart: str, title: str | None,
                 ttl_seconds: int | None, refresh_seconds: int | None) -> Call[Embed]:
    body = _body(query=_query(kind, query), chart=chart, title=title, ttl_seconds=ttl_seconds,
                 refresh_seconds=refresh_seconds)
    return Call(Send("POST", "/v1/embeds", content=body, headers=JSON),
                decoder(Embed, status=201))
