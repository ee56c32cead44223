"""The value types of settings and their parsers: token-bucket rates, deprecation rules, CORS
origins, served regions and their endpoints, key lengths, Kafka addresses.

Pure and light (no web framework, no Redis client), so ``config.py`` validates every setting
while importing nothing above it, and a CLI command that only reads settings starts fast; the
modules that act on these values (``security/limits.py``, ``api/hygiene.py``,
``security/residency.py``, ``security/pseudonym.py``) import them from here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC
from email.utils import format_datetime
from functools import lru_cache
from types import MappingProxyType
from urllib.parse import urlsplit

from pydantic import AwareDatetime, BaseModel, ConfigDict, HttpUrl, model_validator

MIN_KEY_LENGTH = 32  # characters of TALLY_PSEUDONYMISE_KEY


# -- rates (TALLY_RATE_*) -------------------------------------------------------------
_RATE = re.compile(
    r"^\s*(?P<count>\d+(?:\.\d+)?)\s*/\s*(?P<unit>s|m|h)\s*(?:burst\s+(?P<burst>\d+))?\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600}
@dataclass(frozen=True)
class Rate:
    """``per_second`` tokens a second, at most ``burst`` held."""

    per_second: float
    burst: int

    def __str__(self) -> str:
        if self.per_second >= 1:
            return f"{self.per_second:g} a second"
        return f"one every {1 / self.per_second:g} s"

    @property
    def window(self) -> int:
        """Seconds an empty bucket takes to fill (the ``w`` of ``RateLimit-Policy``)."""
        return max(1, math.ceil(self.burst / self.per_second))


def parse_rate(text: str) -> Rate | None:
    """``"20/s burst 40"``, ``"600/m"`` (burst = the count), or ``"off"`` (None)."""
    if text.strip().lower() == "off":
        return None
    match = _RATE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a rate like '20/s burst 40', '600/m' or 'off'")
    count = float(match["count"])
    burst = int(match["burst"]) if match["burst"] else math.ceil(count)
    if count <= 0 or burst < 1:
        raise ValueError(f"{text!r}: the rate and the burst must be positive")
    return Rate(count / _UNIT_SECONDS[match["unit"]], burst)


# -- deprecations and CORS (TALLY_DEPRECATIONS, TALLY_CORS_ORIGINS) ---------------------
class DeprecationRule(BaseModel):
    """One entry of ``TALLY_DEPRECATIONS``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    deprecation: AwareDatetime  # when the route is (or will be) deprecated
    sunset: AwareDatetime | None = None  # when it stops answering
    link: HttpUrl | None = None  # human-readable notes: the migration guide

    @model_validator(mode="after")
    def _sunset_after_deprecation(self) -> DeprecationRule:
        if self.sunset is not None and self.sunset < self.deprecation:
            raise ValueError("sunset must not be before deprecation (RFC 9745 §3)")
        return self

    def headers(self) -> list[tuple[str, str]]:
        out = [("Deprecation", f"@{int(self.deprecation.timestamp())}")]
        if self.sunset is not None:
            out.append(("Sunset", format_datetime(self.sunset.astimezone(UTC), usegmt=True)))
        if self.link is not None:
            out.append(("Link", f'<{self.link}>; rel="deprecation"; type="text/html"'))
        return out


def check_deprecations(rules: Mapping[str, DeprecationRule]) -> None:
    for pattern in rules:
        if not pattern.startswith("/") or "*" in pattern[:-1]:
            raise ValueError(f"TALLY_DEPRECATIONS key {pattern!r} must be a route path "
                             "starting with / (optionally ending in * for a prefix)")


def check_cors_origins(text: str, setting: str = "TALLY_CORS_ORIGINS") -> list[str]:
    """``https://app.example.com,https://bi.example.com`` → the list; refuses ``*``, ``null``
    and anything that is not ``scheme://host[:port]`` (``setting`` names the list in errors:
    TALLY_CORS_ORIGINS, TALLY_EMBED_ORIGINS)."""
    origins: list[str] = []
    for origin in (o.strip() for o in text.split(",")):
        if not origin:
            continue
        parts = urlsplit(origin)
        if (parts.scheme not in ("http", "https") or not parts.hostname
                or parts.path or parts.query or parts.fragment or "*" in origin):
            raise ValueError(f"{setting} entry {origin!r} is not an origin "
                             "(scheme://host[:port]; no wildcard)")
        origins.append(origin)
    return origins


# -- residency (TALLY_REGIONS, TALLY_REGION_ENDPOINTS) ----------------------------------
NO_ENDPOINTS: Mapping[str, str] = MappingProxyType({})


@lru_cache(maxsize=8)
def parse_endpoints(text: str) -> Mapping[str, str]:
    """``"UK=https://uk.example.com,NA=https://na.example.com"`` → ``{"UK": …, "NA": …}``.
    Raises ``ValueError`` naming the first bad entry (a settings validator)."""
    endpoints: dict[str, str] = {}
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        region, sep, url = (part.strip() for part in entry.partition("="))
        parts = urlsplit(url)
        if not sep or not region or parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"TALLY_REGION_ENDPOINTS entry {entry!r} is not REGION=https://host")
        if region in endpoints:
            raise ValueError(f"TALLY_REGION_ENDPOINTS names region {region!r} twice")
        endpoints[region] = url.rstrip("/")
    return MappingProxyType(endpoints)


class ServedRegions(frozenset[str]):
    """The regions this deployment serves; ``endpoints`` maps other regions to the base URL
    of the deployment serving them (entries for served regions are ignored, so a fleet can
    share one ``TALLY_REGION_ENDPOINTS``)."""

    endpoints: Mapping[str, str]

    def __new__(cls, regions: Iterable[str],
                endpoints: Mapping[str, str] = NO_ENDPOINTS) -> ServedRegions:
        served = super().__new__(cls, regions)
        served.endpoints = MappingProxyType(
            {r: url for r, url in endpoints.items() if r not in served})
        return served


# -- Kafka addresses (TALLY_CONSUME_FROM, tally consume --from) ------------------------
_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")
_HOST_PORT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})")


class KafkaUrlError(ValueError):
    """A ``kafka://`` address that names no broker or topic (the CLI's one-line message)."""


@dataclass(frozen=True)
class KafkaAddress:
    bootstrap: str  # "host:port[,host:port…]", as librdkafka's bootstrap.servers takes it
    topic: str

    @property
    def url(self) -> str:
        return f"kafka://{self.bootstrap}/{self.topic}"


def parse_kafka_url(url: str) -> KafkaAddress:
    """``kafka://host:port[,host:port…]/topic`` → its brokers and topic, or KafkaUrlError."""
    parts = urlsplit(url)
    if parts.scheme != "kafka":
        raise KafkaUrlError(f"{url!r}: expected kafka://HOST:PORT/TOPIC")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise KafkaUrlError(f"{url!r}: a Kafka address has no query, fragment or credentials")
    brokers = parts.netloc.split(",") if parts.netloc else []
    if not brokers:
        raise KafkaUrlError(f"{url!r}: no broker (kafka://HOST:PORT/TOPIC)")
    for broker in brokers:
        match = _HOST_PORT.fullmatch(broker)
        if match is None or not 0 < int(match[2]) < 65536:
            raise KafkaUrlError(f"{url!r}: {broker!r} is not HOST:PORT")
    topic = parts.path.removeprefix("/")
    if not _TOPIC.fullmatch(topic) or topic in {".", ".."}:
        raise KafkaUrlError(f"{url!r}: {topic!r} is not a topic name "
                            "(1 to 249 of A-Z a-z 0-9 . _ -)")
    return KafkaAddress(",".join(brokers), topic)
