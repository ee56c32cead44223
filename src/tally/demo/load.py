"""``tally demo``: generate the synthetic stream and load it through the real ingest path.

Every batch goes through :meth:`IngestService.submit` — the same decode, validation, dedup
and durable group commit as ``POST /v1/events:batch`` — so the demo store is exactly what a
producer sending these events would have produced, duplicates and late events included.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
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
from tally.demo.catalog import Event, fx_rates
from tally.demo.generator import demo_markets, generate
from tally.events.envelope import ValidationContext
from tally.runtime import open_ingest, open_store, tune_gc
from tally.semantic.fx import FxRates

BATCH_EVENTS = 10_000  # ~4 MB of JSON: amortises a commit, well under the 10 MiB default
PIPELINE_DEPTH = 2  # batches prepared ahead of the one being committed


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0.0
        rate = task.completed / elapsed if elapsed > 0 else 0.0
        return Text(f"{rate:,.0f} events/s", style="progress.data.speed")


def load_demo(settings: Settings, *, events: int, days: int, seed: int) -> dict[str, Any]:
    """Fill the store at ``settings.data_dir`` with ``events`` synthetic events over the
    ``days`` before the current hour; returns a JSON-able summary."""
    metadata.ensure_data_dir(settings.data_dir)
    started = time.perf_counter()
    totals = {"events_generated": 0, "accepted": 0, "duplicates": 0, "rejected": 0}
    if not demo_markets(settings.served_regions):
        return _summary(totals, started, settings)  # no demo brand lives where we may store
    backend = open_store(settings)  # StoreUnavailable if `tally serve` holds it
    try:
        svc = open_ingest(settings, backend)
        tune_gc()
        end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
        # rates from the first day on, so money answers over demo data convert out of the box
        FxRates(backend, settings.base_currency).add(
            fx_rates(settings.base_currency, (end - timedelta(days=days)).date()))
        batch_size = max(1, min(BATCH_EVENTS, settings.max_batch_events))
        batches = generate(events, days, seed, end, batch_size, settings.served_regions)
        svc.start()
        in_flight: deque[tuple[int, Future[dict[str, Any]]]] = deque()
        with _progress() as progress:
            task = progress.add_task("demo events", total=events)
            for number, batch in enumerate(batches):
                for count, body in _bodies(batch, settings.max_batch_bytes):
                    ctx = ValidationContext(received_at=datetime.now(UTC),
                                            served_regions=settings.served_regions)
                    trace_id = f"tr_demo_{seed}_{number}"
                    in_flight.append((count, svc.submit(body, ctx, "demo", trace_id)))
                    while len(in_flight) > PIPELINE_DEPTH:  # prepare ahead, commit behind
                        _count(in_flight.popleft(), totals)
                progress.advance(task, len(batch))
            while in_flight:
                _count(in_flight.popleft(), totals)
    finally:
        svc.stop()
        backend.close()
    return _summary(totals, started, settings)


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
