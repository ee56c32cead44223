"""The synchronous client: :class:`TallyClient` (thread-safe, like the ``httpx.Client`` under it).

Every method is a thin wrapper: the request, retries, tokens and decoding are in
:mod:`tally_client._routes` and :mod:`tally_client._exchange`, shared with the async client.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar, Unpack, cast, overload

import httpx

from tally_client import _ingest, _routes
from tally_client._base import DEFAULT_TIMEOUT, HEADERS, ClientBase, ClientOptions
from tally_client._exchange import Exchange, Outcome, Send, Wait, call
from tally_client._routes import Call, Day, Filters, Instant, fresh
from tally_client.models import (
    AuditEntry,
    AuditPage,
    AuditVerification,
    Embed,
    ExportJob,
    Funnel,
    FxRate,
    FxRates,
    FxRatesAdded,
    IngestResult,
    Ltv,
    MetricsCatalog,
    NotModified,
    Point,
    QuarantineItem,
    QuarantinePage,
    Receipt,
    Retention,
    SchemaRegistry,
    Slice,
    SliceItem,
    Timeseries,
    Token,
    WebhookSecret,
)

T = TypeVar("T")
P = TypeVar("P")
I = TypeVar("I")  # noqa: E741 - an item type
Keys = str | Sequence[str]


class TallyClient(ClientBase):
    """A synchronous client of one Tally server; see :class:`~tally_client._base.ClientBase`
    for the options. ``timeout``: seconds per request; ``http_client``: an ``httpx.Client``
    of your own (TLS client certificates, proxies), which :meth:`close` leaves open."""

    def __init__(self, url: str, *, timeout: float = DEFAULT_TIMEOUT,
                 http_client: httpx.Client | None = None,
                 **options: Unpack[ClientOptions]) -> None:
        super().__init__(url, **options)
        self._own = http_client is None
        self._http = http_client or httpx.Client(timeout=timeout, headers=HEADERS)

    def close(self) -> None:
        if self._own:
            self._http.close()

    def __enter__(self) -> TallyClient:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    def _run(self, exchange: Exchange[T]) -> T:
        """Drive a call: make its requests, sleep its waits, return its result."""
        try:
            step = next(exchange)
            while True:
                outcome: Outcome = None
                if isinstance(step, Wait):
                    time.sleep(step.seconds)
                else:
                    outcome = self._send(step)
                step = exchange.send(outcome)
        except StopIteration as done:
            return cast(T, done.value)

    def _send(self, send: Send) -> httpx.Response | Exception:
        try:
            return self._http.request(send.method, self._target(send), params=send.params,
                                      content=send.content, headers={**HEADERS, **send.headers})
        except httpx.TransportError as exc:
            return exc

    def _do(self, route: Call[T]) -> T:
        return self._run(call(route.send, route.parse, self._auth, self.retry))

    def _pages(self, fetch: Callable[[str | None], Call[P]],
               items: Callable[[P], Iterable[I]], cursor: Callable[[P], str | None]
               ) -> Iterator[I]:
        after: str | None = None
        while True:
            page = self._do(fetch(after))
            yield from items(page)
            if (after := cursor(page)) is None:
                return

    # --- tokens and ingestion ------------------------------------------------------------

    def token(self) -> Token:
        """The access token in use (fetched now if none is cached or it is about to expire)."""
        return self._run(self._credentials().current(self.retry))

    def ingest(self, events: Iterable[Any], *, idempotency_key: str | None = None
               ) -> IngestResult:
        """Send ``events`` (dicts, or anything msgspec encodes) in as many batches as the
        limits need, each with its own idempotency key (random, or ``<idempotency_key>-<n>``),
        retried safely. Errors' ``index`` is the position in ``events``."""
        return self._run(_ingest.ingest(events, self.max_batch_events, self.max_batch_bytes,
                                        idempotency_key, self._auth, self.retry))

    def send_batch(self, events: Sequence[Any], *, idempotency_key: str | None = None
                   ) -> Receipt:
        """Send ``events`` as exactly one batch (not split: over the server's limits it is
        ``PayloadTooLarge``), retried with one idempotency key."""
        return self._run(_ingest.send_one(events, idempotency_key, self._auth, self.retry))

    # --- analytics (CONTRACT §4): ETag revalidation with if_none_match ------------------

    @overload
    def timeseries(self, metric: str, granularity: str, from_: Instant, to: Instant, *,
                   filters: Filters | None = None, group_by: Keys | None = None,
                   currency: str | None = None, limit: int | None = None,
                   cursor: str | None = None, if_none_match: None = None) -> Timeseries: ...

    @overload
    def timeseries(self, metric: str, granularity: str, from_: Instant, to: Instant, *,
                   filters: Filters | None = None, group_by: Keys | None = None,
                   currency: str | None = None, limit: int | None = None,
                   cursor: str | None = None, if_none_match: str
                   ) -> Timeseries | NotModified: ...

    def timeseries(self, metric: str, granularity: str, from_: Instant, to: Instant, *,
                   filters: Filters | None = None, group_by: Keys | None = None,
                   currency: str | None = None, limit: int | None = None,
                   cursor: str | None = None, if_none_match: str | None = None
                   ) -> Timeseries | NotModified:
        """One page of a metric over time (``GET /v1/analytics/timeseries``)."""
        return self._do(_routes.timeseries(metric, granularity, from_, to, filters, group_by,
                                           currency, limit, cursor, if_none_match))

    def iter_timeseries(self, metric: str, granularity: str, from_: Instant, to: Instant, *,
                        filters: Filters | None = None, group_by: Keys | None = None,
                        currency: str | None = None, page_size: int | None = None
                        ) -> Iterator[Point]:
        """Every point of the series, page after page (following ``next_cursor``)."""
        return self._pages(
            lambda cursor: fresh(_routes.timeseries(metric, granularity, from_, to, filters,
                                                    group_by, currency, page_size, cursor,
                                                    None)),
            lambda page: page.series, lambda page: page.next_cursor)

    @overload
    def slice(self, metric: str, dim: str, from_: Instant, to: Instant, *,
              filters: Filters | None = None, currency: str | None = None,
              order: str | None = None, limit: int | None = None, cursor: str | None = None,
              if_none_match: None = None) -> Slice: ...

    @overload
    def slice(self, metric: str, dim: str, from_: Instant, to: Instant, *,
              filters: Filters | None = None, currency: str | None = None,
              order: str | None = None, limit: int | None = None, cursor: str | None = None,
              if_none_match: str) -> Slice | NotModified: ...

    def slice(self, metric: str, dim: str, from_: Instant, to: Instant, *,
              filters: Filters | None = None, currency: str | None = None,
              order: str | None = None, limit: int | None = None, cursor: str | None = None,
              if_none_match: str | None = None) -> Slice | NotModified:
        """One page of a metric by one dimension, ranked (``GET /v1/analytics/slice``)."""
        return self._do(_routes.slice_(metric, dim, from_, to, filters, currency, order, limit,
                                       cursor, if_none_match))

    def iter_slice(self, metric: str, dim: str, from_: Instant, to: Instant, *,
                   filters: Filters | None = None, currency: str | None = None,
                   order: str | None = None, page_size: int | None = None
                   ) -> Iterator[SliceItem]:
        """Every item of the ranking, page after page."""
        return self._pages(
            lambda cursor: fresh(_routes.slice_(metric, dim, from_, to, filters, currency,
                                                order, page_size, cursor, None)),
            lambda page: page.items, lambda page: page.next_cursor)

    @overload
    def funnel(self, steps: Sequence[str | Mapping[str, Any]], *, window_sec: int,
               from_: Instant, to: Instant, filters: Filters | None = None,
               correlate_by: str | None = None,
               exclusions: Sequence[Mapping[str, Any]] | None = None,
               if_none_match: None = None) -> Funnel: ...

    @overload
    def funnel(self, steps: Sequence[str | Mapping[str, Any]], *, window_sec: int,
               from_: Instant, to: Instant, filters: Filters | None = None,
               correlate_by: str | None = None,
               exclusions: Sequence[Mapping[str, Any]] | None = None,
               if_none_match: str) -> Funnel | NotModified: ...

    def funnel(self, steps: Sequence[str | Mapping[str, Any]], *, window_sec: int,
               from_: Instant, to: Instant, filters: Filters | None = None,
               correlate_by: str | None = None,
               exclusions: Sequence[Mapping[str, Any]] | None = None,
               if_none_match: str | None = None) -> Funnel | NotModified:
        """Conversion through ordered steps: each an event type, or ``{"event": …,
        <payload field>: value, "name"?, "within_sec"?}`` (``POST /v1/analytics/funnel``)."""
        return self._do(_routes.funnel(steps, window_sec, from_, to, filters, correlate_by,
                                       exclusions, if_none_match))

    @overload
    def retention(self, cohort: str, start_date: Day, end_date: Day, *,
                  return_event: str | Mapping[str, Any] | None = None,
                  days: Sequence[int] | None = None, filters: Filters | None = None,
                  timezone: str | None = None, mode: str | None = None,
                  if_none_match: None = None) -> Retention: ...

    @overload
    def retention(self, cohort: str, start_date: Day, end_date: Day, *,
                  return_event: str | Mapping[str, Any] | None = None,
                  days: Sequence[int] | None = None, filters: Filters | None = None,
                  timezone: str | None = None, mode: str | None = None,
                  if_none_match: str) -> Retention | NotModified: ...

    def retention(self, cohort: str, start_date: Day, end_date: Day, *,
                  return_event: str | Mapping[str, Any] | None = None,
                  days: Sequence[int] | None = None, filters: Filters | None = None,
                  timezone: str | None = None, mode: str | None = None,
                  if_none_match: str | None = None) -> Retention | NotModified:
        """D-N retention of ``first_deposit`` or ``registration`` cohorts."""
        return self._do(_routes.retention(cohort, start_date, end_date, return_event, days,
                                          filters, timezone, mode, if_none_match))

    @overload
    def ltv(self, start_date: Day, end_date: Day, *, cohort: str | None = None,
            metric: str | None = None, horizon: int | str | None = None,
            filters: Filters | None = None, currency: str | None = None,
            if_none_match: None = None) -> Ltv: ...

    @overload
    def ltv(self, start_date: Day, end_date: Day, *, cohort: str | None = None,
            metric: str | None = None, horizon: int | str | None = None,
            filters: Filters | None = None, currency: str | None = None,
            if_none_match: str) -> Ltv | NotModified: ...

    def ltv(self, start_date: Day, end_date: Day, *, cohort: str | None = None,
            metric: str | None = None, horizon: int | str | None = None,
            filters: Filters | None = None, currency: str | None = None,
            if_none_match: str | None = None) -> Ltv | NotModified:
        """Cumulative ggr or ngr per cohort member by day (``horizon`` in days)."""
        return self._do(_routes.ltv(start_date, end_date, cohort, metric, horizon, filters,
                                    currency, if_none_match))

    def metrics(self) -> MetricsCatalog:
        return self._do(_routes.metrics())

    def schemas(self) -> SchemaRegistry:
        return self._do(_routes.schemas())

    # --- operator routes (scope admin) ---------------------------------------------------

    def quarantine(self, *, brand_id: Keys | None = None, region: Keys | None = None,
                   limit: int | None = None, cursor: str | None = None) -> QuarantinePage:
        return self._do(_routes.quarantine(brand_id, region, limit, cursor))

    def iter_quarantine(self, *, brand_id: Keys | None = None, region: Keys | None = None,
                        page_size: int | None = None) -> Iterator[QuarantineItem]:
        return self._pages(lambda c: _routes.quarantine(brand_id, region, page_size, c),
                           lambda page: page.items, lambda page: page.next_cursor)

    def fx_rates(self) -> FxRates:
        return self._do(_routes.fx_rates())

    def add_fx_rates(self, rates: Sequence[FxRate]) -> FxRatesAdded:
        return self._do(_routes.add_fx_rates(rates))

    def audit(self, *, after: int | None = None, limit: int | None = None,
              cursor: str | None = None) -> AuditPage:
        return self._do(_routes.audit(after, limit, cursor))

    def iter_audit(self, *, after: int | None = None, page_size: int | None = None
                   ) -> Iterator[AuditEntry]:
        return self._pages(lambda c: _routes.audit(after, page_size, c),
                           lambda page: page.items, lambda page: page.next_cursor)

    def verify_audit(self) -> AuditVerification:
        return self._do(_routes.verify_audit())

    # --- data out (CONTRACT §8–9) -----------------------------------------------------------

    def export(self, kind: str, query: Mapping[str, Any], *, format: str = "csv",
               webhook_url: str | None = None) -> ExportJob:
        """Start an export job of ``kind`` (timeseries, slice, ltv: ``query`` the route's
        parameters; funnel, retention: its body) as ``csv`` or ``parquet``."""
        return self._do(_routes.create_export(kind, query, format, webhook_url))

    def export_job(self, job_id: str) -> ExportJob:
        return self._do(_routes.export_job(job_id))

    def wait_for_export(self, job_id: str, *, timeout: float = 600,
                        poll: float = 0.5) -> ExportJob:
        """The job once it has succeeded or failed (``TimeoutError`` after ``timeout`` s)."""
        deadline = time.monotonic() + timeout
        while not (job := self.export_job(job_id)).done:
            if time.monotonic() > deadline:
                raise TimeoutError(f"export {job_id} is still {job.status}")
            time.sleep(poll)
        return job

    def iter_exports(self, *, page_size: int | None = None) -> Iterator[ExportJob]:
        return self._pages(lambda c: _routes.exports(page_size, c),
                           lambda page: page.items, lambda page: page.next_cursor)

    def download(self, job: ExportJob) -> bytes:
        """A succeeded job's file, by its signed link."""
        if job.download_url is None:
            raise ValueError(f"export {job.id} has no file to download ({job.status})")
        return self._do(_routes.download(job.download_url))

    def webhook_secret(self, *, rotate: bool = False) -> WebhookSecret:
        """The secret that signs this client's webhooks; ``rotate``: a new one (the old one
        signs beside it for 24 h)."""
        return self._do(_routes.webhook_secret(rotate))

    def embed(self, kind: str, query: Mapping[str, Any], *, chart: str,
              title: str | None = None, ttl_seconds: int | None = None,
              refresh_seconds: int | None = None) -> Embed:
        """An embeddable widget of the query (``chart``: line, bar, table, funnel)."""
        return self._do(_routes.create_embed(kind, query, chart, title, ttl_seconds,
                                             refresh_seconds))
