"""What ``GET /status`` and ``tally status`` report: health, freshness, backlog, objectives.

One JSON document (docs/operations.md, "The status page") for the on-call person who has no
Grafana. It holds **operational facts only**, as ``/metrics`` does: no brand, region, client
or player, no count of events per tenant, no store or Redis URL (either may carry a password).
The numbers are read from the same places as ``/metrics`` (:meth:`Runtime.gauges`, the request
histogram's twin :class:`~tally.observability.slo.SloWindow`), so the two never disagree.

``status`` is ``ok`` (ready, and no objective missed over the window), ``degraded`` (ready, but
an objective is missed) or ``unavailable`` (``/readyz`` would answer ``503``: ``reasons`` says
why).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from tally import __version__, metadata
from tally.observability.slo import (
    FRESHNESS_BOUND_SECONDS,
    FRESHNESS_SAMPLE_SECONDS,
    SLOT_SECONDS,
    WINDOW_SLOTS,
    SloWindow,
)
from tally.storage.factory import check_store

if TYPE_CHECKING:
    from tally.runtime import Runtime

Gauges = dict[str, list[tuple[dict[str, str], float]]]


def utc_text(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def store_probe(runtime: Runtime) -> str | None:
    """Why the store or the metadata database does not answer now (None: both answer). The
    same probe as ``/readyz``: a read of one setting (no count: nothing is disclosed)."""
    try:
        runtime.backend.setting("dedup_key")
        metadata.ping(runtime.meta)
    except Exception as exc:  # any failure is "does not answer", with its kind
        return f"store does not answer: {type(exc).__name__}"
    return None


def _redis(runtime: Runtime) -> dict[str, Any] | None:
    if not runtime.settings.redis_url:
        return None
    from redis import RedisError

    from tally.security.limits import RedisRateLimiter

    limiter = runtime.limits.limiter
    if not isinstance(limiter, RedisRateLimiter):  # pragma: no cover - set from the URL
        return None
    try:
        limiter.client.ping()
    except RedisError as exc:  # the message names host:port, never the password
        return {"reachable": False, "failure": f"{type(exc).__name__}: {exc}"[:300]}
    return {"reachable": True, "failure": None}


def _kafka(runtime: Runtime, gauges: Gauges) -> dict[str, Any] | None:
    source = runtime.source
    if source is None:
        return None
    return {
        "topic": source.address.topic, "group": source.group,
        "running": runtime.source_running(),
        "failure": runtime.source_failure,
        "lag_messages": int(sum(v for _, v in gauges.get("tally_kafka_consumer_lag_messages",
                                                          []))),
        "messages": int(_one(gauges, "tally_kafka_consumer_messages_total")),
    }


def _one(gauges: Gauges, name: str) -> float:
    values = gauges.get(name, [])
    return values[0][1] if values else 0.0


def _collect(read: Iterable[tuple[str, str, dict[str, str], float]]) -> Gauges:
    out: Gauges = {}
    for name, _help, labels, value in read:
        out.setdefault(name, []).append((labels, value))
    return out


def server_status(runtime: Runtime, window: SloWindow, started_at: datetime) -> dict[str, Any]:
    """The status document of a running server (blocking: it asks the store and Redis)."""
    gauges = _collect(runtime.gauges())
    rollups = gauges["tally_rollup_freshness_lag_seconds"]
    unreachable = store_probe(runtime)
    try:
        reasons = runtime.unready()
    except (sqlite3.Error, OSError) as exc:  # pragma: no cover - as /readyz
        reasons = [f"{type(exc).__name__}"]
    if unreachable is not None:
        reasons = [unreachable, *reasons]
    applier, journal = runtime.ingest.applier, runtime.ingest.journal
    redis = _redis(runtime)
    kafka = _kafka(runtime, gauges)
    covered, objectives = window.report()
    now = datetime.now(UTC)
    missed = [o.slo for o in objectives if o.met is False]
    status = "unavailable" if reasons else "degraded" if missed else "ok"
    return {
        "status": status,
        "source": "server",
        "version": __version__,
        "checked_at": utc_text(now),
        "started_at": utc_text(started_at),
        "uptime_seconds": round((now - started_at).total_seconds(), 1),
        "reasons": reasons,
        "health": {
            "ready": not reasons,
            "store": {"kind": check_store(runtime.settings.store),
                      "reachable": unreachable is None,
                      "writable": _one(gauges, "tally_store_writable") == 1.0,
                      "failure": applier.store_failure},
            "journal": {"writable": journal.writable(), "failure": journal.failure},
            "kafka": kafka,
            "redis": redis,
        },
        "freshness": {
            "objective_seconds": FRESHNESS_BOUND_SECONDS,
            "rollups": [{"rollup": labels["rollup"], "lag_seconds": round(value, 3)}
                        for labels, value in rollups],
        },
        "backlog": {
            "pending_rows": int(_one(gauges, "tally_applier_pending_rows")),
            "lag_seconds": round(max(v for _, v in rollups), 3),
            "max_rows": applier.max_backlog_rows,
            "max_seconds": applier.max_backlog_seconds,
            "applied_rows": int(_one(gauges, "tally_applier_applied_rows_total")),
            "set_aside_rows": int(_one(gauges, "tally_applier_set_aside_rows_total")),
            "applied_seq": applier.applied_seq,
        },
        "slo": {
            "window": {"kind": "sliding", "seconds": WINDOW_SLOTS * SLOT_SECONDS,
                       "slot_seconds": SLOT_SECONDS,
                       "covered_seconds": round(covered, 1),
                       "since": utc_text(now - timedelta(seconds=covered)),
                       "freshness_sample_seconds": FRESHNESS_SAMPLE_SECONDS},
            "missed": missed,
            "objectives": [o.public() for o in objectives],
        },
    }
