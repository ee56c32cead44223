"""The asynchronous client: :class:`AsyncTallyClient`, the same methods as
:class:`~tally_client.TallyClient`, awaited (iterators are ``async for``).

Every method is a thin wrapper: the request, retries, tokens and decoding are in
:mod:`tally_client._routes` and :mod:`tally_client._exchange`, shared with the sync client.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
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


class AsyncTallyClient(ClientBase):
    """An asynchronous client of one Tally server; see :class:`~tally_client._base.ClientBase`
    for the options. ``timeout``: seconds per request; ``http_client``: an
    ``httpx.AsyncClient`` of your own, which :meth:`aclose` leaves open."""

    def __init__(self, url: str, *, timeout: float = DEFAULT_TIMEOUT,
                 http_client: httpx.AsyncClient | None = None,
                 **options: Unpack[ClientOptions]) -> None:
        super().__init__(url, **options)
        self._own = http_client is None
        self._http = http_client or httpx.AsyncClient(timeout=timeout, headers=HEADERS)

    async def aclose(self) -> None:
        if self._own:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncTallyClient:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        trace: TracebackType | None) -> None:
        await self.aclose()

    async def _run(self, exchange: Exchange[T]) -> T:
        """Drive a call: make its requests, sleep its waits, return its result."""
        try:
            step = next(exchange)
            while True:
                outcome: Outcome = None
                if isinstance(step, Wait):
                    await asyncio.sleep(step.seconds)
                else:
                    outcome = await self._send(step)
                step = exchange.send(outcome)
        except StopIteration as done:
            return cast(T, done.value)

    async def _send(self, send: Send) -> httpx.Response | Exception:
        try:
            return await self._http.request(send.method, self._target(send),
                                            params=send.params, content=send.content,
                                            headers={**HEADERS, **send.headers})
        except httpx.TransportError as exc:
            return exc

    async def _do(self, route: Call[T]) -> T:
        return await self._run(call(route.send, route.parse, self._auth, self.retry))

    async def _pages(self, fetch: Callable[[str | None], Call[P]],
                     items: Callable[[P], Iterable[I]], cursor: Callable[[P], str | None]
                     ) -> AsyncIterator[I]:
        after: str | None = None
        while True:
            page = await self._do(fetch(after))
            for item in items(page):
                yield item
            if (after := cursor(page)) is None:
                return

    # --- tokens and ingestion ------------------------------------------------------------

    async def token(self) -> Token:
        """The access token in use (fetched now if none is cached or it is about to expire)."""
        return await self._run(self._credentials().current(self.retry))

    async def ingest(self, events: Iterable[Any], *, idempotency_key: str | None = None
               ) -> IngestResult:
        """Send ``events`` (dicts, or anything msgspec encodes) in as many batches as the
        limits need, each with its own idempotency key (random, or ``<idempotency_key>-<n>``),
        retried safely. Errors' ``index`` is the position in ``events``."""
        return await self._run(_ingest.ingest(events, self.max_batch_events,
                                              self.max_batch_bytes, idempotency_key,
                                              self._auth, self.retry))

    async def send_batch(self, events: Sequence[Any], *, idempotency_key: str | None = None
                   ) -> Receipt:
        """Send ``events`` as exactly one batch (not split: over the server's limits it is
        ``PayloadTooLarge``), retried with one idempotency key."""
        return await self._run(_ingest.send_one(events, idempotency_key, self._auth,
                                                self.retry))

    # --- analytics (CONTRACT §4): ETag revalidation with if_none_match ------------------

    @overload
    async def timeseries(self, metric: str, granularity: str, from_: Instant, to: Instant, *,
                   filters: Filters | None = None, group_by: Keys | None = None,
                   currency: str | None = None, limit: int | None = None,
                   cursor: str | None = None, if_none_match: None = None) -> Timeseries: ...

    @overload
    async def timeseries(self, metric: str, granularity: str, from_: Instant, to: Instant, *,
                   filters: Filters | None = None, group_by: Keys | None = None,
                   currency: str | None = None, limit: int | None = None,
                   cursor: str | None = None, if_none_match: str
                   ) -> Timeseries | NotModified: ...

    async def timeseries(self, metric: str, granularity: str, from_: Instant, to: Instant, *,
                   filters: Filters | None = None, group_by: Keys | None = None,
                   currency: str | None = None, limit: int | None = None,
                   cursor: str | None = None, if_none_match: str | None = None
                   ) -> Timeseries | NotModified:
        """One page of a metric over time (``GET /v1/analytics/timeseries``)."""
        return await self._do(_routes.timeseries(metric, granularity, from_, to, filters,
                                                 group_by, currency, limit, cursor,
                                                 if_none_match))

    def iter_timeseries(self, metric: str, granularity: str, from_: Instant, to: Instant, *,
                        filters: Filters | None = None, group_by: Keys | None = None,
                        currency: str | None = None, page_size: int | None = None
                        ) -> AsyncIterator[Point]:
        """Every point of the series, page after page (following ``next_cursor``)."""
        return self._pages(
            lambda cursor: fresh(_routes.timeseries(metric, granularity, from_, to, filters,
                                                    group_by, currency, page_size, cursor,
                                                    None)),
            lambda page: page.series, lambda page: page.next_cursor)

    @overload
    async def slice(self, metric: str, dim: str, from_: Instant, to: Instant, *,
              filters: Filters | None = None, currency: str | None = None,
              order: str | None = None, limit: int | None = None, cursor: str | None = None,
              if_none_match: None = None) -> Slice: ...

    @overload
    async def slice(self, metric: str, dim: str, from_: Instant, to: Instant, *,
              filters: Filters | None = None, currency: str | None = None,
              order: str | None = None, limit: int | None = None, cursor: str | None = None,
              if_none_match: str) -> Slice | NotModified: ...

    async def slice(self, metric: str, dim: str, from_: Instant, to: Instant, *,
              filters: Filters | None = None, currency: str | None = None,
              order: str | None = None, limit: int | None = None, cursor: str | None = None,
              if_none_match: str | None = None) -> Slice | NotModified:
        """One page of a metric by one dimension, ranked (``GET /v1/analytics/slice``)."""
        return await self._do(_routes.slice_(metric, dim, from_, to, filters, currency, order,
                                             limit, cursor, if_none_match))

    def iter_slice(self, metric: str, dim: str, from_: Instant, to: Instant, *,
                   filters: Filters | None = None, currency: str | None = None,
                   order: str | None = None, page_size: int | None = None
                   ) -> AsyncIterator[SliceItem]:
        """Every item of the ranking, page after page."""
        return self._pages(
            lambda cursor: fresh(_routes.slice_(metric, dim, from_, to, filters, currency,
                                                order, page_size, cursor, None)),
            lambda page: page.items, lambda page: page.next_cursor)

    @overload
    async def funnel(self, steps: Sequence[str | Mapping[str, Any]], *, window_sec: int,
               from_: Instant, to: Instant, filters: Filters | None = None,
               correlate_by: str | None = None,
               exclusions: Sequence[Mapping[str, Any]] | None = None,
               if_none_match: None = None) -> Funnel: ...

    @overload
    async def funnel(self, steps: Sequence[str | Mapping[str, Any]], *, window_sec: int,
               from_: Instant, to: Instant, filters: Filters | None = None,
               correlate_by: str | None = None,
               exclusions: Sequence[Mapping[str, Any]] | None = None,
               if_none_match: str) -> Funnel | NotModified: ...

    async def funnel(self, steps: Sequence[str | Mapping[str, Any]], *, window_sec: int,
               from_: Instant, to: Instant, filters: Filters | None = None,
               correlate_by: str | None = None,
               exclusions: Sequence[Mapping[str, Any]] | None = None,
               if_none_match: str | None = None) -> Funnel | NotModified:
        """Conversion through ordered steps: each an event type, or ``{"event": …,
        <payload field>: value, "name"?, "within_sec"?}`` (``POST /v1/analytics/funnel``)."""
        return await self._do(_routes.funnel(steps, window_sec, from_, to, filters,
                                             correlate_by, exclusions, if_none_match))

    @overload
    async def retention(self, cohort: str, start_date: Day, end_date: Day, *,
                  return_event: str | Mapping[str, Any] | None = None,
                  days: Sequence[int] | None = None, filters: Filters | None = None,
                  timezone: str | None = None, mode: str | None = None,
                  if_none_match: None = None) -> Retention: ...

    @overload
    async def retention(self, cohort: str, start_date: Day, end_date: Day, *,
                  return_event: str | Mapping[str, Any] | None = None,
                  days: Sequence[int] | None = None, filters: Filters | None = None,
                  timezone: str | None = None, mode: str | None = None,
                  if_none_match: str) -> Retention | NotModified: ...

    async def retention(self, cohort: str, start_date: Day, end_date: Day, *,
                  return_event: str | Mapping[str, Any] | None = None,
                  days: Sequence[int] | None = None, filters: Filters | None = None,
                  timezone: str | None = None, mode: str | None = None,
                  if_none_match: str | None = None) -> Retention | NotModified:
        """D-N retention of ``first_deposit`` or ``registration`` cohorts."""
        return await self._do(_routes.retention(cohort, start_date, end_date, return_event,
                                                days, filters, timezone, mode, if_none_match))

    @overload
    async def ltv(self, start_date: Day, end_date: Day, *, cohort: str | None = None,
            metric: str | None = None, horizon: int | str | None = None,
            filters: Filters | None = None, currency: str | None = None,
            if_none_match: None = None) -> Ltv: ...

    @overload
    async def ltv(self, start_date: Day, end_date: Day, *, cohort: str | None = None,
            metric: str | None = None, horizon: int | str | None = None,
            filters: Filters | None = None, currency: str | None = None,
            if_none_match: str) -> Ltv | NotModified: ...

    async def ltv(self, start_date: Day, end_date: Day, *, cohort: str | None = None,
            metric: str | None = None, horizon: int | str | None = None,
            filters: Filters | None = None, currency: str | None = None,
            if_none_match: str | None = None) -> Ltv | NotModified:
        """Cumulative ggr or ngr per cohort member by day (``horizon`` in days)."""
        return await self._do(_routes.ltv(start_date, end_date, cohort, metric, horizon,
                                          filters, currency, if_none_match))

    async def metrics(self) -> MetricsCatalog:
        return await self._do(_routes.metrics())

    async def schemas(self) -> SchemaRegistry:
        return await self._do(_routes.schemas())

    # --- operator routes (scope admin) ---------------------------------------------------

    async def quarantine(self, *, brand_id: Keys | None = None, region: Keys | None = None,
                   limit: int | None = None, cursor: str | None = None) -> QuarantinePage:
        return await self._do(_routes.quarantine(brand_id, region, limit, cursor))

    def iter_quarantine(self, *, brand_id: Keys | None = None, region: Keys | None = None,
                        page_size: int | None = None) -> AsyncIterator[QuarantineItem]:
        return self._pages(lambda c: _routes.quarantine(brand_id, region, page_size, c),
                           lambda page: page.items, lambda page: page.next_cursor)

    async def fx_rates(self) -> FxRates:
        return await self._do(_routes.fx_rates())

    async def add_fx_rates(self, rates: Sequence[FxRate]) -> FxRatesAdded:
        return await self._do(_routes.add_fx_rates(rates))

    async def audit(self, *, after: int | None = None, limit: int | None = None,
              cursor: str | None = None) -> AuditPage:
        return await self._do(_routes.audit(after, limit, cursor))

    def iter_audit(self, *, after: int | None = None, page_size: int | None = None
                   ) -> AsyncIterator[AuditEntry]:
        return self._pages(lambda c: _routes.audit(after, page_size, c),
                           lambda page: page.items, lambda page: page.next_cursor)

    async def verify_audit(self) -> AuditVerification:
        return await self._do(_routes.verify_audit())

    # --- data out (CONTRACT §8–9) -----------------------------------------------------------

    async def export(self, kind: str, query: Mapping[str, Any], *, format: str = "csv",
               webhook_url: str | None = None) -> ExportJob:
        """Start an export job of ``kind`` (timeseries, slice, ltv: ``query`` the route's
        parameters; funnel, retention: its body) as ``csv`` or ``parquet``."""
        return await self._do(_routes.create_export(kind, query, format, webhook_url))

    async def export_job(self, job_id: str) -> ExportJob:
        return await self._do(_routes.export_job(job_id))

    async def wait_for_export(self, job_id: str, *, timeout: float = 600,
                        poll: float = 0.5) -> ExportJob:
        """The job once it has succeeded or failed (``TimeoutError`` after ``timeout`` s)."""
        deadline = time.monotonic() + timeout
        while not (job := await self.export_job(job_id)).done:
            if time.monotonic() > deadline:
                raise TimeoutError(f"export {job_id} is still {job.status}")
            await asyncio.sleep(poll)
        return job

    def iter_exports(self, *, page_size: int | None = None) -> AsyncIterator[ExportJob]:
        return self._pages(lambda c: _routes.exports(page_size, c),
                           lambda page: page.items, lambda page: page.next_cursor)

    async def download(self, job: ExportJob) -> bytes:
        """A succeeded job's file, by its signed link."""
        if job.download_url is None:
            raise ValueError(f"export {job.id} has no file to download ({job.status})")
        return await self._do(_routes.download(job.download_url))

    async def webhook_secret(self, *, rotate: bool = False) -> WebhookSecret:
        """The secret that signs this client's webhooks; ``rotate``: a new one (the old one
        signs beside it for 24 h)."""
        return await self._do(_routes.webhook_secret(rotate))

    async def embed(self, kind: str, query: Mapping[str, Any], *, chart: str,
              title: str | None = None, ttl_seconds: int | None = None,
              refresh_seconds: int | None = None) -> Embed:
        """An embeddable widget of the query (``chart``: line, bar, table, funnel)."""
        return await self._do(_routes.create_embed(kind, query, chart, title, ttl_seconds,
                                             refresh_seconds))
