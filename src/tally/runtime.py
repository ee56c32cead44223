"""The long-lived objects of a running Tally process, opened and closed together."""

from __future__ import annotations

import gc
import logging
import sqlite3
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING

from tally import metadata
from tally.alerts.service import AlertService
from tally.alerts.store import Alert
from tally.audit.log import AuditLog
from tally.config import Settings
from tally.errors import TallyError
from tally.exports.runner import ExportWorker
from tally.ingest.batch import warm_up
from tally.ingest.service import IngestService
from tally.insights.cache import AnswerCache, PartCache
from tally.insights.series import Context
from tally.rollups import activity
from tally.rollups.spec import GRAINS, derived_tables
from tally.security.admission import Limits
from tally.security.jwks import ExternalIssuer, authority_for
from tally.security.pseudonym import pseudonymiser_for
from tally.security.tokens import Principal, TokenService
from tally.semantic.fx import FxRates
from tally.storage.base import Backend
from tally.storage.factory import SPILL_DIR, check_store, open_backend
from tally.storage.limits import QueryLimits

if TYPE_CHECKING:  # imported only when a topic is consumed (confluent-kafka)
    from tally.stream.kafka import KafkaSource

log = logging.getLogger(__name__)

__all__ = ["SPILL_DIR", "Runtime", "open_ingest", "open_source", "open_store", "tune_gc"]


# A server answers many statements at once: on one thread each, every query costs less CPU
# and the p95s at three clients on two cores are lower, ingestion included (docs/benchmarks.md
# "One thread a statement"); a lone large statement is slower. TALLY_QUERY_THREADS=0: one a core.
SERVING_QUERY_THREADS = 1


def serving(settings: Settings) -> Settings:
    """The settings ``tally serve`` runs with: ``query_threads`` unset is
    :data:`SERVING_QUERY_THREADS` on the DuckDB store (where it was measured); a ClickHouse
    store keeps ClickHouse's own default (one a core) until it is measured there."""
    if settings.query_threads is not None or check_store(settings.store) != "duckdb":
        return settings
    return settings.model_copy(update={"query_threads": SERVING_QUERY_THREADS})


def tune_gc() -> None:
    """For a process that ingests: a batch decodes into thousands of short-lived objects, and
    the default gen-0 threshold (700) ran collections several times per batch (measured: ~20%
    of prepare time). The writer thread hands the GIL back and forth with the request thread
    around every DuckDB call; at the default 5 ms switch interval each hand-back waited up to
    5 ms (a convoy: dedup lookups took 10x their single-thread time under load)."""
    gc.set_threshold(50_000, 20, 100)
    sys.setswitchinterval(0.0005)


def open_store(settings: Settings) -> Backend:
    """The event store ``TALLY_STORE`` names, with its rollups: the one way to open it for
    writing, so every appended batch maintains them (``tally serve`` and ``tally demo``
    alike). An unsupported ``TALLY_STORE`` raises ``StoreUnavailable`` (one line)."""
    check_store(settings.store)
    metadata.ensure_data_dir(settings.data_dir)
    return open_backend(
        settings.store, settings.data_dir,
        derived=derived_tables, retired=activity.RETIRED,
        idempotency_ttl=timedelta(seconds=settings.idempotency_ttl_seconds),
        limits=QueryLimits(settings.query_timeout_seconds, settings.query_memory_bytes,
                           settings.query_spill_bytes, settings.query_threads or None),
    )


def open_ingest(settings: Settings, backend: Backend) -> IngestService:
    """The ingestion service over an open store, as the settings configure it: the one way
    to build it (``tally serve``, ``tally demo``, ``tally consume``)."""
    return IngestService(backend, settings.data_dir / "journal", settings.max_batch_events,
                         pseudonymiser_for(settings.pseudonymise_key,
                                           settings.pseudonymise_scope),
                         max_backlog_rows=settings.max_backlog_rows,
                         max_backlog_seconds=settings.max_backlog_seconds,
                         apply_linger_seconds=settings.apply_linger_ms / 1000,
                         dedup_memory_mb=settings.dedup_memory_mb,
                         dedup_index=settings.dedup_index)


def open_source(settings: Settings, ingest: IngestService, url: str,
                group: str) -> KafkaSource:
    """The Kafka source connector over an ingestion service (``tally consume``, and
    ``tally serve`` with ``TALLY_CONSUME_FROM``)."""
    from tally.config_values import parse_kafka_url
    from tally.stream.kafka import KafkaSource

    return KafkaSource(ingest, parse_kafka_url(url), group,
                       served_regions=settings.served_regions,
                       max_events=settings.max_batch_events,
                       max_bytes=settings.max_batch_bytes)


@dataclass
class Runtime:
    settings: Settings
    meta: sqlite3.Connection
    tokens: TokenService | ExternalIssuer  # external: TALLY_JWKS_URL
    backend: Backend
    ingest: IngestService
    fx: FxRates
    answers: AnswerCache
    audit: AuditLog
    limits: Limits  # rate limits and row quotas (security/admission.py)
    source: KafkaSource | None = None  # TALLY_CONSUME_FROM: an operator's topic, consumed here
    parts: PartCache = field(default_factory=PartCache)  # funnels' days (cohorts/funnel.py)
    _source_stop: threading.Event = field(default_factory=threading.Event)
    _source_thread: threading.Thread | None = None
    source_failure: str | None = None
    exports: ExportWorker = field(init=False)  # export jobs, run off the request path
    alerts: AlertService = field(init=False)  # alert rules, evaluated as data is applied

    def context_for(self, principal: Principal) -> Context:
        """What a query of ``principal`` is planned with (a route's, an export's, a
        widget's): the store, FX rates, settings, the caller's limits and the watermark."""
        return Context(self.backend, self.fx, self.settings, principal,
                       self.ingest.versions.complete_before, self.parts,
                       self.ingest.versions.version)

    def refusal(self, alert: Alert) -> str | None:
        """Why an alert's creator may no longer be served (revoked, or its tokens of the
        alert's time refused): its alerts then stop. None: it may."""
        if not isinstance(self.tokens, TokenService):  # an identity provider's clients
            return None
        try:
            self.tokens.clients.check(alert.client_id, alert.created_epoch)
        except TallyError as exc:
            return f"the alert's creator no longer has access: {exc}"
        return None

    @classmethod
    def open(cls, settings: Settings) -> Runtime:
        check_store(settings.store)  # before anything is created in the data dir
        limits = Limits.open(settings)  # first: an unreachable Redis fails before the store
        meta = metadata.connect(settings.data_dir)
        tokens = authority_for(settings, meta)
        backend = open_store(settings)
        try:  # after the store: its lock makes this process the log's only writer
            audit = AuditLog(settings.data_dir, settings.audit_checkpoint_entries,
                             settings.audit_checkpoint_seconds)
        except BaseException:
            backend.close()
            raise
        backend.expire_idempotency()
        try:
            ingest = open_ingest(settings, backend)
        except BaseException:
            audit.close()
            backend.close()
            raise
        runtime = cls(settings, meta, tokens, backend, ingest,
                      FxRates(backend, settings.base_currency), AnswerCache(), audit, limits)
        runtime.exports = ExportWorker(settings, meta, runtime.context_for,
                                       ingest.read_your_writes, audit.append)
        runtime.alerts = AlertService(meta, runtime.context_for, ingest.versions,
                                      runtime.refusal, audit.append,
                                      settings.webhook_allow_loopback)
        ingest.applier.after_apply.append(runtime.alerts.wake)
        if settings.consume_from:
            runtime.source = open_source(settings, ingest, settings.consume_from,
                                         settings.consume_group)
        return runtime

    def start(self) -> None:
        warm_up()  # lazy imports of the ingestion path, before the first request
        self.ingest.start()
        self.exports.start()
        self.alerts.start()
        if self.source is not None:
            self._source_thread = threading.Thread(target=self._consume, name="tally-kafka",
                                                   daemon=True)
            self._source_thread.start()

    def _consume(self) -> None:
        assert self.source is not None
        try:
            self.source.run(self._source_stop)
        except Exception as exc:  # a fatal Kafka error: the API goes on, /readyz says so
            self.source_failure = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            log.exception("kafka source stopped", extra={"detail": self.source_failure})

    def source_running(self) -> bool:
        """Whether the Kafka source (``TALLY_CONSUME_FROM``) is consuming now."""
        thread = self._source_thread
        return thread is not None and thread.is_alive() and self.source_failure is None

    def unready(self) -> list[str]:
        """Why this process should get no traffic now (empty: ready): the journal or the store
        cannot be written, or the ingestion backlog is past its bound (``/readyz``)."""
        reasons = []
        if not self.ingest.journal.writable():
            reasons.append(f"journal cannot be written: {self.ingest.journal.failure}")
        failure = self.ingest.applier.store_failure
        if failure is not None:
            reasons.append(f"store cannot be written: {failure}")
        if self.source_failure is not None:
            reasons.append(f"kafka source stopped: {self.source_failure}")
        applier = self.ingest.applier
        if applier.lag_rows() > applier.max_backlog_rows \
                or applier.lag_seconds() > applier.max_backlog_seconds:
            reasons.append(f"ingestion backlog: {applier.lag_rows()} rows, "
                           f"{applier.lag_seconds():.0f} s")
        return reasons

    def gauges(self) -> Iterator[tuple[str, str, dict[str, str], float]]:
        """Values read at each Prometheus scrape."""
        lag = self.ingest.applier.lag_seconds()
        for grain in GRAINS:  # all rollups are kept in the apply transaction: one lag
            yield ("tally_rollup_freshness_lag_seconds",
                   "Age of the oldest acknowledged events not yet in this rollup.",
                   {"rollup": grain}, lag)
        yield ("tally_applier_pending_rows", "Acknowledged rows waiting for the store.", {},
               float(self.ingest.applier.lag_rows()))
        yield ("tally_applier_applied_rows_total", "Rows applied to the store since start.",
               {}, float(self.ingest.applier.applied_rows))
        yield ("tally_applier_set_aside_rows_total",
               "Acknowledged rows the store refused, quarantined or parked since start.", {},
               float(self.ingest.applier.set_aside_rows))
        yield ("tally_store_writable", "1 if the applier can write the store, else 0.", {},
               0.0 if self.ingest.applier.store_failure else 1.0)
        yield ("tally_dedup_index_keys", "Keys in the dedup index.", {},
               float(len(self.ingest.index)))
        for result, count in (("hit", self.answers.hits), ("miss", self.answers.misses)):
            yield ("tally_answer_cache_lookups_total", "Answer cache lookups by result.",
                   {"result": result}, float(count))
        for result, count in (("hit", self.parts.hits), ("miss", self.parts.misses)):
            yield ("tally_funnel_parts_lookups_total",
                   "Lookups of a funnel's kept whole days by result.", {"result": result},
                   float(count))
        yield ("tally_funnel_parts_bytes", "Bytes of funnels' whole days kept in memory.", {},
               float(self.parts.size_bytes))
        for limit, count in self.limits.refusals.counts().items():
            yield ("tally_rate_limit_refusals_total",
                   "Requests refused with 429 by a rate limit or the daily row quota, by limit.",
                   {"limit": limit}, float(count))
        for status, count in self.exports.finished.counts().items():
            yield ("tally_export_jobs_total", "Export jobs finished since start, by outcome.",
                   {"outcome": status}, float(count))
        for outcome, count in self.exports.deliveries.counts().items():
            yield ("tally_webhook_deliveries_total",
                   "Webhook deliveries since start (each after its retries), by outcome.",
                   {"kind": "export", "outcome": outcome}, float(count))
        if self.source is not None:
            yield from self.source.gauges()
        yield ("tally_audit_entries", "Entries in the audit log.", {}, float(self.audit.size))
        yield ("tally_audit_checkpointed_entries",
               "Audit entries covered by the latest signed checkpoint.", {},
               float(self.audit.checkpointed))

    def close(self) -> None:
        if self._source_thread is not None:  # the group in flight is finished and committed
            self._source_stop.set()
            self._source_thread.join()
        if self.source is not None:
            self.source.close()
        self.exports.stop()  # the job running is cut off: queued again at the next start
        self.alerts.stop()  # after the evaluation and the delivery attempt in flight
        self.audit.close()  # signs a last checkpoint
        self.ingest.stop(self.settings.shutdown_seconds)
        self.backend.close()
        self.meta.close()
        self.limits.close()
