"""Settings from the environment (``TALLY_*``); one cached instance per process."""

from __future__ import annotations

import ipaddress
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tally.config_values import (
    MIN_KEY_LENGTH,
    DeprecationRule,
    ServedRegions,
    check_cors_origins,
    check_deprecations,
    parse_endpoints,
    parse_kafka_url,
    parse_rate,
)
from tally.events.currencies import ISO_4217

MIN_QUERY_MEMORY = 16 * 2**20  # DuckDB needs some to run anything
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(%|B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def machine_memory() -> int:
    """Bytes of memory this process may use: the machine's, or its cgroup's limit if lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total


def parse_size(text: str) -> int:
    """``"50%"`` (of :func:`machine_memory`), ``"4GB"``, ``"512MiB"``, ``"0"`` → bytes."""
    if text.strip() == "0":
        return 0
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a size (50%, 4GB, 512MB, 0)")
    number, unit = float(match[1]), match[2].lower()
    if unit == "%":
        if not 0 < number <= 100:
            raise ValueError(f"{text!r}: a share of memory is from 0 to 100%")
        return int(machine_memory() * number / 100)
    return int(number * _UNITS[unit])
MIN_METRICS_TOKEN = 16  # a scrape secret, not a password: long enough not to guess


class Settings(BaseSettings):
    """Every knob of a Tally deployment. Each field is documented in the README."""

    model_config = SettingsConfigDict(env_prefix="TALLY_", extra="ignore")

    data_dir: Path = Path("./data")
    store: str = "duckdb"  # TALLY_STORE (CONTRACT §10): storage/factory.py says what runs
    regions: str = "EU,UK,LATAM,NA,APAC"
    base_currency: str = "EUR"
    active_session_min: int = Field(default=1, ge=0, le=24 * 60)
    allowed_lateness: int = Field(default=0, ge=0)
    max_batch_events: int = Field(default=10_000, ge=1)
    max_batch_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    # ingestion push-back (ingest/applier.py): 503 + Retry-After while more acknowledged rows
    # than this, or older than this, wait for the store
    max_backlog_rows: int = Field(default=1_000_000, ge=1000)
    max_backlog_seconds: float = Field(default=60.0, gt=0, le=3600)
    # how long acknowledged rows may wait to be merged into a larger store write (a reader
    # that waits for them cuts it short): fewer writes, less CPU a row (docs/ingestion.md)
    apply_linger_ms: int = Field(default=250, ge=0, le=10_000)
    # the dedup index: "memory" (fastest; ~13 bytes of RAM per stored event) or "disk"
    # (partitioned runs under the data dir, resident memory bounded by dedup_memory_mb)
    dedup_index: Literal["memory", "disk"] = "memory"
    dedup_memory_mb: int = Field(default=256, ge=8)  # resident dedup index on disk
    read_your_writes_ms: int = Field(default=500, ge=0, le=60_000)  # a query waits this long
    shutdown_seconds: float = Field(default=20.0, ge=0, le=3600)  # applying at shutdown, at most
    token_ttl_seconds: int = Field(default=900, ge=30, le=900)
    issuer: str = "tally"
    audience: str = "tally-api"
    region_endpoints: str = ""  # "UK=https://uk.example.com,NA=…": see security/residency.py
    jwks_url: str | None = None  # an external IdP's JWKS: it issues the tokens, not us
    jwks_refresh_seconds: int = Field(default=30, ge=1, le=3600)
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_client_ca: Path | None = None
    idempotency_ttl_seconds: int = Field(default=24 * 3600, ge=60)
    audit_checkpoint_entries: int = Field(default=1000, ge=1)
    audit_checkpoint_seconds: float = Field(default=60.0, gt=0, le=3600)
    log_level: str = "INFO"
    cors_origins: str = ""  # explicit allow-list; empty: no CORS (see api/hygiene.py)
    deprecations: dict[str, DeprecationRule] = {}  # JSON: route → Deprecation/Sunset/Link
    pseudonymise_key: SecretStr | None = None  # HMAC player_id at ingest (security/pseudonym)
    pseudonymise_scope: Literal["brand", "deployment"] = "brand"  # one key per brand, or one
    # rate limits and row quotas (security/admission.py): "20/s burst 40", "600/m" or "off"
    redis_url: str | None = None  # shared limits across replicas; unset: in-process
    redis_prefix: str = "tally:"
    rate_client: str = "100/s burst 1000"
    rate_brand: str = "200/s burst 2000"
    rate_region: str = "1000/s burst 10000"
    rate_token: str = "1/s burst 20"  # noqa: S105 - a rate, not a secret
    rate_token_source: str = "10/s burst 100"  # noqa: S105 - a rate, not a secret
    max_rows_per_request: int = Field(default=0, ge=0)  # 0: no limit
    rows_per_day: int = Field(default=0, ge=0)  # per client and UTC day; 0: no quota
    # bounds on every query statement (storage/limits.py): a stopped statement is a 503
    query_timeout_seconds: float = Field(default=30.0, gt=0, le=3600)
    query_memory_limit: str = "50%"  # of the machine's memory, or a size: 4GB, 512MB
    query_spill_limit: str = ""  # disk a query may spill to; empty: the memory limit's size
    # the engine's threads per statement; 0: one a core; unset: runtime.SERVING_QUERY_THREADS
    # for `tally serve` on DuckDB (runtime.serving), else one a core
    query_threads: int | None = Field(default=None, ge=0, le=1024)
    # the HTTP edge (api/bodies.py, api/connections.py): time and room a client may take
    header_timeout_seconds: float = Field(default=10.0, gt=0, le=600)
    body_timeout_seconds: float = Field(default=30.0, gt=0, le=3600)
    body_min_rate: int = Field(default=1024, ge=0)  # bytes/s on average; 0: off
    keepalive_timeout_seconds: int = Field(default=5, ge=1, le=3600)
    max_connections: int | None = Field(default=None, ge=1)  # None: from the fd limit
    forwarded_allow_ips: str = ""  # proxies whose X-Forwarded-For is believed; "": none
    metrics_token: SecretStr | None = None  # set: GET /metrics needs it as a bearer token
    # an operator's Kafka topic consumed by `tally serve` itself (stream/kafka.py), as
    # `tally consume --from URL --group G` would: kafka://host:9092/topic
    consume_from: str | None = None
    consume_group: str = Field(default="tally", min_length=1, max_length=255)
    # webhooks may be delivered over http to loopback addresses (tests, a local relay);
    # otherwise https only, and never to private or link-local addresses (webhooks/delivery.py)
    webhook_allow_loopback: bool = False
    # export jobs (CONTRACT §8): a job over either limit fails with the reason; a download link
    # is good this long
    export_max_rows: int = Field(default=5_000_000, ge=1)
    export_max_bytes: int = Field(default=1 << 30, ge=1)
    export_link_ttl_seconds: int = Field(default=3600, ge=1, le=7 * 86400)
    # metric alerts (CONTRACT §11): rules a client may hold at once (docs/alerts.md)
    alerts_max_per_client: int = Field(default=100, ge=1, le=10_000)
    # the origins whose pages may frame an embedded widget (CONTRACT §9; CSP frame-ancestors);
    # empty: only Tally's own pages
    embed_origins: str = ""

    @field_validator("regions")
    @classmethod
    def _regions_not_empty(cls, value: str) -> str:
        if not [r for r in value.split(",") if r.strip()]:
            raise ValueError("TALLY_REGIONS must name at least one region")
        return value

    @field_validator("region_endpoints")
    @classmethod
    def _endpoints(cls, value: str) -> str:
        parse_endpoints(value)
        return value

    @field_validator("jwks_url")
    @classmethod
    def _jwks_https(cls, value: str | None) -> str | None:
        url = urlsplit(value or "https://")
        if url.scheme != "https" and not (
            url.scheme == "http" and url.hostname in ("127.0.0.1", "localhost", "::1")
        ):
            raise ValueError("TALLY_JWKS_URL must be https:// (plain http only on loopback)")
        return value

    @field_validator("cors_origins")
    @classmethod
    def _cors(cls, value: str) -> str:
        check_cors_origins(value)
        return value

    @field_validator("embed_origins")
    @classmethod
    def _embed_origins(cls, value: str) -> str:
        check_cors_origins(value, "TALLY_EMBED_ORIGINS")
        return value

    @field_validator("deprecations")
    @classmethod
    def _deprecations(cls, value: dict[str, DeprecationRule]) -> dict[str, DeprecationRule]:
        check_deprecations(value)
        return value

    @field_validator("consume_from")
    @classmethod
    def _consume_from(cls, value: str | None) -> str | None:
        if value:
            parse_kafka_url(value)
        return value or None

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value and urlsplit(value).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("TALLY_REDIS_URL must be redis://, rediss:// or unix://")
        return value

    @field_validator("forwarded_allow_ips")
    @classmethod
    def _proxies(cls, value: str) -> str:
        """Addresses or networks (``10.0.0.0/8``), or ``*``; uvicorn would take a typo for a
        host name and silently trust nobody."""
        for entry in (e.strip() for e in value.split(",") if e.strip()):
            if entry == "*":
                continue
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"TALLY_FORWARDED_ALLOW_IPS entry {entry!r} is not an IP "
                                 "address or network (or *)") from None
        return value

    @field_validator("metrics_token")
    @classmethod
    def _metrics_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_METRICS_TOKEN:
            raise ValueError(f"TALLY_METRICS_TOKEN needs at least {MIN_METRICS_TOKEN} "
                             "characters")
        return value

    @field_validator("rate_client", "rate_brand", "rate_region", "rate_token",
                     "rate_token_source")
    @classmethod
    def _rate(cls, value: str) -> str:
        parse_rate(value)
        return value

    @field_validator("pseudonymise_key")
    @classmethod
    def _key_length(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value().encode()) < MIN_KEY_LENGTH:
            raise ValueError(f"TALLY_PSEUDONYMISE_KEY needs at least {MIN_KEY_LENGTH} bytes")
        return value

    @field_validator("base_currency")
    @classmethod
    def _iso_currency(cls, value: str) -> str:
        if value not in ISO_4217:
            raise ValueError(f"TALLY_BASE_CURRENCY {value!r} is not an ISO 4217 code")
        return value

    @field_validator("query_memory_limit")
    @classmethod
    def _memory(cls, value: str) -> str:
        if parse_size(value) < MIN_QUERY_MEMORY:
            raise ValueError(f"TALLY_QUERY_MEMORY_LIMIT {value!r} is below 16 MiB")
        return value

    @field_validator("query_spill_limit")
    @classmethod
    def _spill(cls, value: str) -> str:
        if value:
            parse_size(value)
        return value

    @property
    def query_memory_bytes(self) -> int:
        return parse_size(self.query_memory_limit)

    @property
    def query_spill_bytes(self) -> int:
        return parse_size(self.query_spill_limit or self.query_memory_limit)

    @property
    def served_regions(self) -> ServedRegions:
        """The regions served here, knowing where the others are (``421`` links)."""
        return ServedRegions((r.strip() for r in self.regions.split(",") if r.strip()),
                             parse_endpoints(self.region_endpoints))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
