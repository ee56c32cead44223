"""``tally demo --url``: the synthetic stream sent to a running server through tally-client.

The events are the in-process load's (:mod:`tally.demo.load`: the same generator, seed, clock
and batches), sent as a producer would send them — over HTTP, each batch with its own
idempotency key and retried safely — so the server's store ends up holding what the
in-process demo would have stored. The demo's FX rates go through ``POST /v1/admin/fx-rates``
when the client may set rates (an admin without limits); otherwise the summary says they were
not set and the operator sets them. ``tally_client`` is imported here only: the server never
needs it.
"""

from __future__ import annotations

import time
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from tally.config import Settings
from tally.demo.catalog import fx_rates
from tally.demo.generator import demo_markets, generate
from tally.demo.load import BATCH_EVENTS, _progress

if TYPE_CHECKING:
    from tally_client import TallyClient


def send_demo(url: str, client_id: str, client_secret: str, settings: Settings, *,
              events: int, days: int, seed: int) -> dict[str, Any]:
    """Send ``events`` synthetic events over the ``days`` before the current hour to the
    server at ``url``; returns a JSON-able summary. Raises ``tally_client.TallyProblem`` for
    an error answer and ``httpx.TransportError`` when the server cannot be reached."""
    from tally_client import TallyClient

    started = time.perf_counter()
    totals = {"events_generated": 0, "accepted": 0, "duplicates": 0, "rejected": 0}
    end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    with TallyClient(url, client_id=client_id, client_secret=client_secret,
                     max_batch_events=settings.max_batch_events,
                     max_batch_bytes=settings.max_batch_bytes) as tally:
        rates = _send_rates(tally, (end - timedelta(days=days)).date())
        if demo_markets(settings.served_regions):  # else no demo brand lives where we may send
            batch_size = max(1, min(BATCH_EVENTS, settings.max_batch_events))
            with _progress() as progress:
                task = progress.add_task("demo events", total=events)
                for batch in generate(events, days, seed, end, batch_size,
                                      settings.served_regions):
                    result = tally.ingest(batch)
                    totals["events_generated"] += len(batch)
                    totals["accepted"] += result.accepted
                    totals["duplicates"] += result.duplicates
                    totals["rejected"] += result.rejected
                    progress.advance(task, len(batch))
    return {**totals, "seconds": round(time.perf_counter() - started, 2), "url": url,
            "fx_rates": rates}


def _send_rates(tally: TallyClient, first_day: date) -> str:
    """The demo's rates from ``first_day`` on, in the server's base currency: what was done."""
    from tally_client import Conflict, Forbidden, FxRate

    try:
        base = tally.fx_rates().base_currency
        rows = [FxRate(date=day, currency=currency, rate=rate)
                for day, currency, rate in fx_rates(base, first_day)]
        if not rows:
            return f"not set: the demo has no rates for base currency {base}"
        added = tally.add_fx_rates(rows)
    except Forbidden as exc:
        return f"not set: {exc.detail or 'the client may not set FX rates'}"
    except Conflict as exc:
        return f"not set: {exc.detail}"
    return f"{added.inserted} set, {added.unchanged} already there"
