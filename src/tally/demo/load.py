"""``tally demo``: generate the synthetic stream and load it through the real ingest path.

Every batch goes through :meth:`IngestService.submit` — the same decode, validation, dedup
and durable group commit as ``POST /v1/events:batch`` — so the demo store is exactly what a
producer sending these events would have produced, duplicates and late events included.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from tally import metadata
from tally.config import Settings
from tally.demo import columnar
from tally.demo.catalog import Event, fx_rates
from tally.demo.generator import demo_markets, generate
from tally.errors import InvalidBody
from tally.events.envelope import ValidationContext
from tally.ingest.columnar import conform
from tally.runtime import open_ingest, open_store, tune_gc
from tally.semantic.fx import FxRates

BATCH_EVENTS = 10_000  # ~4 MB of JSON: amortises a commit, well under the 10 MiB default
BULK_EVENTS = 50_000  # columnar batches: one group commit each (the writer's group limit)
PIPELINE_DEPTH = 2  # batches prepared ahead of the one being committed


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0.0
        rate = task.completed / elapsed if elapsed > 0 else 0.0
        return Text(f"{rate:,.0f} events/s", style="progress.data.speed")


def load_demo(settings: Settings, *, events: int, days: int, seed: int,
              bulk: bool = False) -> dict[str, Any]:
    """Fill the store at ``settings.data_dir`` with ``events`` synthetic events over the
    ``days`` before the current hour; returns a JSON-able summary. ``bulk``: the vectorised
    generator (``columnar.py``) through the columnar path, for big stores."""
    if not demo_markets(settings.served_regions):
        return _summary({"events_generated": 0, "accepted": 0, "duplicates": 0, "rejected": 0},
                        time.perf_counter(), settings)  # no demo brand lives where we may store
    end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    if bulk:
        stream, tables = columnar.tables(events, days, seed, end, BULK_EVENTS,
                                         settings.served_regions)
        summary = load_batches(settings, ((t.num_rows, t) for t in tables), "demo events",
                               events, fx_from=(end - timedelta(days=days)).date(),
                               trace=f"tr_demo_{seed}", bulk=True)
        return {**summary, "shape": stream.shape()}
    batch_size = max(1, min(BATCH_EVENTS, settings.max_batch_events))
    batches = generate(events, days, seed, end, batch_size, settings.served_regions)
    bodies = (body for batch in batches for body in _bodies(batch, settings.max_batch_bytes))
    return load_batches(settings, bodies, "demo events", events,
                        fx_from=(end - timedelta(days=days)).date(), trace=f"tr_demo_{seed}")


def load_files(settings: Settings, paths: Sequence[Path]) -> dict[str, Any]:
    """``tally load``: Parquet files in the columnar format, every one checked (readable, of
    the format) before anything is loaded; ``InvalidBody`` names the first that is not."""
    files = []
    for path in paths:
        try:
            parquet = pq.ParquetFile(path)
            conform(parquet.schema_arrow.empty_table())
        except InvalidBody as exc:
            raise InvalidBody(f"{path}: {exc.detail}") from None
        except (OSError, pa.ArrowException) as exc:
            raise InvalidBody(f"{path}: not a readable Parquet file ({exc})") from None
        files.append(parquet)
    total = sum(f.metadata.num_rows for f in files)
    batches = ((b.num_rows, pa.Table.from_batches([b])) for f in files
               for b in f.iter_batches(batch_size=BULK_EVENTS))
    return load_batches(settings, batches, "events", total, client_id="load", bulk=True)


def load_batches(settings: Settings, batches: Iterable[tuple[int, bytes | pa.Table]],
                 label: str, total: int | None, *, fx_from: date | None = None,
                 trace: str = "tr_load", client_id: str = "demo",
                 bulk: bool = False) -> dict[str, Any]:
    """Every batch — a JSON body or a columnar table, with its event count — through the
    ingestion path into the store at ``settings.data_dir`` (validation, quarantine, dedup,
    journal, apply), the next prepared while the writer commits the last; a summary.
    ``bulk``: the store derives its rollups and cohort tables once at the end
    (``Backend.defer_derived``) instead of in every write."""
    metadata.ensure_data_dir(settings.data_dir)
    started = time.perf_counter()
    totals = {"events_generated": 0, "accepted": 0, "duplicates": 0, "rejected": 0}
    backend = open_store(settings)  # StoreUnavailable if `tally serve` holds it
    svc = None
    derive_seconds = 0.0
    try:
        backend.defer_derived(bulk)
        svc = open_ingest(settings, backend)
        tune_gc()
        if fx_from is not None:  # rates from the first day on: money answers convert
            FxRates(backend, settings.base_currency).add(
                fx_rates(settings.base_currency, fx_from))
        svc.start()
        in_flight: deque[tuple[int, Future[dict[str, Any]]]] = deque()
        with _progress() as progress:
            task = progress.add_task(label, total=total)
            for number, (count, batch) in enumerate(batches):
                ctx = ValidationContext(received_at=datetime.now(UTC),
                                        served_regions=settings.served_regions)
                prepared = (svc.prepare_columns(batch, ctx, client_id)
                            if isinstance(batch, pa.Table)
                            else svc.prepare(batch, ctx, client_id))
                in_flight.append((count, svc.submit_prepared(prepared, f"{trace}_{number}")))
                while len(in_flight) > PIPELINE_DEPTH:  # prepare ahead, commit behind
                    _count(in_flight.popleft(), totals)
                progress.advance(task, count)
            while in_flight:
                _count(in_flight.popleft(), totals)
    finally:
        try:
            if svc is not None:
                svc.stop()
            derived = time.perf_counter()
            backend.defer_derived(False)  # the derived rows of a bulk load, made now
            derive_seconds = time.perf_counter() - derived
        finally:
            backend.close()
    return {**_summary(totals, started, settings),
            **({"derive_seconds": round(derive_seconds, 2)} if bulk else {})}


def _count(done: tuple[int, Future[dict[str, Any]]], totals: dict[str, int]) -> None:
    count, future = done
    receipt = future.result()
    totals["events_generated"] += count
    for key in ("accepted", "duplicates", "rejected"):
        totals[key] += int(receipt[key])


def _bodies(batch: list[Event], max_bytes: int) -> list[tuple[int, bytes]]:
    """(events, JSON body) of the batch, halved until each body is within the byte limit."""
    body = msgspec.json.encode(batch)
    if len(batch) <= 1 or len(body) <= max_bytes:
        return [(len(batch), body)]
    half = len(batch) // 2
    return _bodies(batch[:half], max_bytes) + _bodies(batch[half:], max_bytes)


def _progress() -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=False,
    )


def _summary(totals: dict[str, int], started: float, settings: Settings) -> dict[str, Any]:
    return {**totals, "seconds": round(time.perf_counter() - started, 2),
            "data_dir": str(settings.data_dir)}
