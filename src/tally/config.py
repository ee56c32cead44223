"""Settings from the environment (``TALLY_*``); one cached instance per process."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tally.events.currencies import ISO_4217


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
    idempotency_ttl_seconds: int = Field(default=24 * 3600, ge=60)
    log_level: str = "INFO"

    @field_validator("regions")
    @classmethod
    def _regions_not_empty(cls, value: str) -> str:
        if not [r for r in value.split(",") if r.strip()]:
            raise ValueError("TALLY_REGIONS must name at least one region")
        return value

    @field_validator("base_currency")
    @classmethod
    def _iso_currency(cls, value: str) -> str:
        if value not in ISO_4217:
            raise ValueError(f"TALLY_BASE_CURRENCY {value!r} is not an ISO 4217 code")
        return value

    @property
    def served_regions(self) -> frozenset[str]:
        return frozenset(r.strip() for r in self.regions.split(",") if r.strip())


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
