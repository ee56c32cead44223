"""Rate limits and row quotas, applied to one request (CONTRACT §6; docs/security.md).

A request is *admitted* step by step, as what it is charged to becomes known:

1. every authenticated request: the bucket of its client (``api/deps.py``, after the token is
   verified); ``POST /oauth/token``: first a ``token_source`` bucket per source address (every
   token request from it, whatever it asks), then, before the secret is checked, a ``token``
   bucket per (``client_id`` asked for, source address) — per address, so that wrong secrets
   sent from one address cannot lock the client out at another;
2. a query: the buckets of the brands and regions it is confined to, by its filters or its
   token (``insights/request.py``, after the 403 checks, so that nobody spends a bucket of a
   brand they may not read); a batch: the brands and regions of its accepted events
   (``ingest/service.py``);
3. each statement it runs (``storage/metering.py``): the rows-per-request estimate before, the
   client's rows of the UTC day before the first, the rows scanned after.

The :class:`Admission` of the request being served sits in a context variable (set by
``api/limiting.py``), so the code above needs no extra arguments, and work outside a request
(``tally demo``) is not limited. It remembers what it was charged to, for the
``RateLimit``/``RateLimit-Policy`` headers of draft-ietf-httpapi-ratelimit-headers-10.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tally.config import Settings
from tally.config_values import Rate, parse_rate
from tally.errors import QueryTooLarge, StoreUnavailable, TooManyRequests
from tally.observability.outcomes import Outcomes
from tally.security.limits import (
    Bucket,
    BucketState,
    LocalRateLimiter,
    RateLimiter,
    RedisRateLimiter,
)
from tally.security.quotas import (
    LocalRowsLedger,
    RedisRowsLedger,
    RowsLedger,
    seconds_to_midnight,
    utc_day,
)
from tally.storage.metering import current_meter

REDIS_TIMEOUT_SECONDS = 0.5  # a Redis that stops answering costs a check at most 2 × this
# what may refuse a request with 429: a bucket (its kind, Bucket.limit) or the daily quota
REFUSING_LIMITS = ("client", "brand", "region", "token", "token_source", "rows_per_day")


class RateLimited(TooManyRequests):
    """A rate limit per client, brand, region or address."""


class RowsQuotaExhausted(TooManyRequests):
    code = "quota-exhausted"
    doc = "The client's quota of scanned rows for this period is spent: wait `Retry-After`."


class TooManyRowsForRequest(QueryTooLarge):
    """One request would scan more rows than the per-request quota."""


@dataclass(frozen=True)
class Policy:
    """The configured limits; a ``None`` rate or a 0 quota is off."""

    client: Rate | None
    brand: Rate | None
    region: Rate | None
    token: Rate | None
    token_source: Rate | None
    max_rows_per_request: int
    rows_per_day: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        return cls(parse_rate(settings.rate_client), parse_rate(settings.rate_brand),
                   parse_rate(settings.rate_region), parse_rate(settings.rate_token),
                   parse_rate(settings.rate_token_source), settings.max_rows_per_request,
                   settings.rows_per_day)


def redis_client(url: str) -> redis.Redis:
    """Short timeouts and one immediate retry (for a pooled connection Redis closed), not
    redis-py's default of three with backoff: a limit check must never hold a request long."""
    return redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT_SECONDS,
                                socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
                                retry=Retry(NoBackoff(), 1))


class Limits:
    """The process's buckets and ledger under one policy (``Runtime.limits``)."""

    def __init__(self, policy: Policy, limiter: RateLimiter, ledger: RowsLedger,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.policy, self.limiter, self.ledger = policy, limiter, ledger
        self.wall_clock = wall_clock
        # requests refused with 429, by the limit that refused them (tally_rate_limit_refusals)
        self.refusals = Outcomes(*REFUSING_LIMITS)
        # no call of these can block (no Redis): they may run on the event loop
        self.in_process = isinstance(limiter, LocalRateLimiter)

    @classmethod
    def open(cls, settings: Settings) -> Limits:
        """In-process, or in Redis when ``TALLY_REDIS_URL`` is set (which must answer now)."""
        policy = Policy.from_settings(settings)
        if not settings.redis_url:
            return cls(policy, LocalRateLimiter(), LocalRowsLedger())
        client = redis_client(settings.redis_url)
        try:
            client.ping()
        except redis.RedisError as exc:
            kwargs = client.connection_pool.connection_kwargs  # never the password
            where = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"
            client.close()
            raise StoreUnavailable(f"cannot reach Redis at {where} (TALLY_REDIS_URL): "
                                   f"{exc}") from None
        limiter = RedisRateLimiter(client, settings.redis_prefix)
        return cls(policy, limiter, RedisRowsLedger(client, settings.redis_prefix,
                                                    limiter.warn))

    def admission(self) -> Admission:
        return Admission(self)

    def close(self) -> None:
        self.ledger.close()
        self.limiter.close()


class Admission:
    """What one request was charged to, and the scan meter of its statements."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.client_id: str | None = None
        self.states: dict[str, BucketState] = {}  # per limit: its most constrained bucket
        self.retry_after: int | None = None
        self.scanned = 0
        self._charged: set[str] = set()
        self._day_checked = False
        self._lock = threading.Lock()

    # -- buckets ------------------------------------------------------------------------------
    def admit_client(self, client_id: str) -> None:
        self.client_id = client_id
        self._acquire([("client", client_id, self.limits.policy.client)])

    def admit_token_source(self, source: str) -> None:
        self._acquire([("token_source", source, self.limits.policy.token_source)])

    def admit_token_request(self, client_id: str, source: str) -> None:
        self._acquire([("token", f"{client_id}@{source}", self.limits.policy.token)])

    def admit_scope(self, brands: Iterable[str], regions: Iterable[str]) -> None:
        policy = self.limits.policy
        self._acquire([("brand", b, policy.brand) for b in sorted(set(brands))]
                      + [("region", r, policy.region) for r in sorted(set(regions))])

    def _acquire(self, wanted: list[tuple[str, str, Rate | None]]) -> None:
        buckets = [Bucket(limit, key, rate) for limit, key, rate in wanted
                   if rate is not None and f"{limit}:{key}" not in self._charged]
        if not buckets:
            return
        decision = self.limits.limiter.acquire(buckets)
        for state in decision.states:
            known = self.states.get(state.bucket.limit)
            if known is None or state.tokens <= known.tokens:
                self.states[state.bucket.limit] = state
        denied = decision.denied_by
        if denied is None:
            self._charged.update(b.name for b in buckets)
            return
        self.retry_after = denied.retry_after
        bucket, rate = denied.bucket, denied.bucket.rate
        self.limits.refusals.add(bucket.limit)
        who = _describe(bucket)
        raise RateLimited(
            f"rate limit of {who} reached ({rate.burst} requests at once, then {rate}); "
            f"retry in {denied.retry_after} s",
            limit=bucket.limit, retry_after=denied.retry_after,
            **({bucket.limit: bucket.key} if bucket.limit in ("brand", "region") else {}))

    # -- rows (the ScanMeter of storage/metering.py) -----------------------------------------
    def before_scan(self, estimate: Callable[[], int]) -> None:
        policy = self.limits.policy
        if policy.rows_per_day and self.client_id is not None and not self._day_checked:
            self._day_checked = True
            now = self.limits.wall_clock()
            used = self.limits.ledger.used(self.client_id, utc_day(now))
            if used >= policy.rows_per_day:
                self.retry_after = seconds_to_midnight(now)
                self.limits.refusals.add("rows_per_day")
                raise RowsQuotaExhausted(
                    f"client {self.client_id!r} has scanned {used} rows today (UTC), the "
                    f"daily quota is {policy.rows_per_day}; it resets at 00:00 UTC, in "
                    f"{self.retry_after} s", limit="rows_per_day", quota=policy.rows_per_day,
                    used=used, retry_after=self.retry_after)
        if policy.max_rows_per_request:
            expected = self.scanned + estimate()
            if expected > policy.max_rows_per_request:
                raise TooManyRowsForRequest(
                    f"this request would scan about {expected} rows (DuckDB's estimate); "
                    f"the limit is {policy.max_rows_per_request} per request: narrow the time "
                    "range or the filters", limit="rows_per_request",
                    estimated_rows=expected, max_rows=policy.max_rows_per_request)

    def after_scan(self, rows: int) -> None:
        with self._lock:
            self.scanned += rows
        if self.limits.policy.rows_per_day and self.client_id is not None:
            self.limits.ledger.add(self.client_id, utc_day(self.limits.wall_clock()), rows)

    # -- the answer ---------------------------------------------------------------------------
    def headers(self, status: int) -> list[tuple[str, str]]:
        """``RateLimit-Policy`` and ``RateLimit`` for every limit charged; ``Retry-After`` on a
        429 of ours."""
        out: list[tuple[str, str]] = []
        if self.states:
            out.append(("RateLimit-Policy", ", ".join(
                f'"{name}";q={s.bucket.rate.burst};w={s.bucket.rate.window}'
                for name, s in self.states.items())))
            out.append(("RateLimit", ", ".join(
                f'"{name}";r={s.remaining};t={s.reset}{_partition(s.bucket)}'
                for name, s in self.states.items())))
        if status == 429 and self.retry_after is not None:
            out.append(("Retry-After", str(self.retry_after)))
        return out


def _describe(bucket: Bucket) -> str:
    if bucket.limit == "token":
        client_id, _, source = bucket.key.rpartition("@")  # an address holds no "@"
        return f"token requests for client {client_id!r} from {source}"
    if bucket.limit == "token_source":
        return f"token requests from {bucket.key}"
    return f"{bucket.limit} {bucket.key!r}"


def _partition(bucket: Bucket) -> str:
    """``pk``: which brand or region the numbers are about (the most constrained one)."""
    if bucket.limit not in ("brand", "region"):
        return ""
    return f";pk=:{base64.b64encode(bucket.key.encode()).decode()}:"


# -- the request being served ---------------------------------------------------------------
_current: ContextVar[Admission | None] = ContextVar("tally_admission", default=None)


@contextmanager
def admitting(admission: Admission) -> Iterator[Admission]:
    """Make ``admission`` the current request's (and its statements' scan meter)."""
    token, meter_token = _current.set(admission), current_meter.set(admission)
    try:
        yield admission
    finally:
        current_meter.reset(meter_token)
        _current.reset(token)


def admit_client(client_id: str) -> None:
    admission = _current.get()
    if admission is not None:
        admission.admit_client(client_id)


def admit_token_source(source: str) -> None:
    """Charge a token request from the peer address ``source``, whatever it asks for."""
    admission = _current.get()
    if admission is not None:
        admission.admit_token_source(source)


def admit_token_request(client_id: str, source: str) -> None:
    """Charge a token request for ``client_id`` from the peer address ``source``."""
    admission = _current.get()
    if admission is not None:
        admission.admit_token_request(client_id, source)


def admit_scope(brands: Iterable[str] | None, regions: Iterable[str] | None) -> None:
    """Charge the brands and regions a query is confined to (None: not confined)."""
    admission = _current.get()
    if admission is not None:
        admission.admit_scope(brands or (), regions or ())


def admit_batch(events: pa.Table) -> None:
    """Charge the brands and regions of a batch's accepted events."""
    admission = _current.get()
    if admission is not None and events.num_rows:
        admission.admit_scope(pc.unique(events["tenant_id"]).to_pylist(),
                              pc.unique(events["region"]).to_pylist())
