"""``tally consume --from kafka://HOST:PORT/TOPIC --group G`` (CONTRACT §1).

The store at ``--data-dir`` is opened as ``tally serve`` opens it (one process owns an
embedded store: to consume while serving the API, set ``TALLY_CONSUME_FROM`` on the server
instead). Runs until SIGTERM or SIGINT: the group of messages in flight is made durable and
its offsets committed, the acknowledged events are applied to the store (for at most
``TALLY_SHUTDOWN_SECONDS``; the rest stays in the journal), then it prints what it did.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tally.commands.common import fail
from tally.errors import StoreUnavailable

if TYPE_CHECKING:
    from tally.stream.kafka import KafkaSource

log = logging.getLogger(__name__)
CHECK_SECONDS = 10.0  # how long the brokers may take to answer at start


def consume(url: str, group: str, data_dir: Path | None,
            metrics: tuple[str, int] | None) -> dict[str, Any]:
    from confluent_kafka import KafkaException

    from tally.commands.common import settings_for
    from tally.config_values import KafkaUrlError, parse_kafka_url
    from tally.observability.logs import configure_logging
    from tally.runtime import open_ingest, open_source, open_store, tune_gc
    from tally.stream.kafka import kafka_error_text

    try:
        parse_kafka_url(url)
    except KafkaUrlError as exc:
        fail(str(exc))
    if not group.strip():
        fail("--group must name a consumer group")
    settings = settings_for(data_dir)
    configure_logging(settings.log_level)
    try:
        backend = open_store(settings)
    except StoreUnavailable as exc:
        fail(str(exc))
    ingest = open_ingest(settings, backend)
    source = None
    try:
        source = open_source(settings, ingest, url, group)
        try:
            partitions = source.check(CHECK_SECONDS)
        except KafkaException as exc:
            fail(f"cannot consume {url}: {kafka_error_text(exc)}")
        except LookupError as exc:
            fail(f"cannot consume {url}: {exc}")
        if metrics is not None:
            _serve_metrics(source, metrics)
        tune_gc()
        ingest.start()
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        try:
            source.run(stop)
        except KafkaException as exc:
            fail(f"kafka: {kafka_error_text(exc)}", code=1)
        except Exception as exc:  # logged whole; what was not committed is re-read next time
            log.exception("tally consume stopped")
            fail(f"stopped: {type(exc).__name__}: {exc}".splitlines()[0][:300], code=1)
    finally:
        if source is not None:
            source.close()
        drained = ingest.stop(settings.shutdown_seconds)
        backend.close()
    stats = source.stats
    return {"from": url, "group": group, "partitions": partitions, "messages": stats.messages,
            "accepted": stats.accepted, "duplicates": stats.duplicates,
            "rejected": stats.rejected, "poison": stats.poison, "commits": stats.commits,
            "applied": drained}


def _serve_metrics(source: KafkaSource, where: tuple[str, int]) -> None:
    """The connector's gauges (lag per partition, counts) and the process's own, in the
    Prometheus text format at ``http://HOST:PORT/metrics``."""
    from prometheus_client import start_http_server

    from tally.observability.metrics import gauge_registry

    start_http_server(where[1], addr=where[0], registry=gauge_registry(source.gauges))
