"""Settings from the environment (``TALLY_*``); one cached instance per process."""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tally.api.hygiene import DeprecationRule, check_cors_origins, check_deprecations
from tally.events.currencies import ISO_4217
from tally.security.limits import parse_rate
from tally.security.pseudonym import MIN_KEY_LENGTH
from tally.security.residency import ServedRegions, parse_endpoints

MIN_METRICS_TOKEN = 16  # a scrape secret, not a password: long enough not to guess


class Settings(BaseSettings):
    """Every knob of a Tally deployment. Each field is documented in the README."""

    model_config = SettingsConfigDict(env_prefix="TALLY_", extra="ignore")

    data_dir: Path = Path("./data")
    regions: str = "EU,UK,LATAM,NA,APAC"
    base_currency: str = "EUR"
    active_session_min: int = Field(default=1, ge=0, le=24 * 60)
    allowed_lateness: int = Field(default=0, ge=0)
    max_batch_events: int = Field(default=10_000, ge=1)
    max_batch_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
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
    # the HTTP edge (api/bodies.py, api/connections.py): time and room a client may take
    header_timeout_seconds: float = Field(default=10.0, gt=0, le=600)
    body_timeout_seconds: float = Field(default=30.0, gt=0, le=3600)
    body_min_rate: int = Field(default=1024, ge=0)  # bytes/s on average; 0: off
    keepalive_timeout_seconds: int = Field(default=5, ge=1, le=3600)
    max_connections: int | None = Field(default=None, ge=1)  # None: from the fd limit
    forwarded_allow_ips: str = ""  # proxies whose X-Forwarded-For is believed; "": none
    metrics_token: SecretStr | None = None  # set: GET /metrics needs it as a bearer token

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

    @field_validator("deprecations")
    @classmethod
    def _deprecations(cls, value: dict[str, DeprecationRule]) -> dict[str, DeprecationRule]:
        check_deprecations(value)
        return value

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

    @property
    def served_regions(self) -> ServedRegions:
        """The regions served here, knowing where the others are (``421`` links)."""
        return ServedRegions((r.strip() for r in self.regions.split(",") if r.strip()),
                             parse_endpoints(self.region_endpoints))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
