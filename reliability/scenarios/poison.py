"""A poison record: a journal record the store cannot apply blocks neither the records behind
it nor the restart, and is set aside where the operator sees it (issue 9, defect 1).

Without a bug to exploit, the poison is made by hand: a journal written with Tally's own
``Journal`` holding good records around one whose events table breaks a ``NOT NULL``
constraint, and one with the issue's two ``bet.settled`` at the largest stake the contract
allows (their rollup sum overflowed a BIGINT). The server must start on it, apply the good
records, and list what it set aside (:func:`set_aside_listed`). Then the same two stakes come
through the front door, and later batches must still be acknowledged and visible.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx2 as httpx
import numpy as np
import pyarrow as pa

from reliability.batches import batch_request
from reliability.events import BRAND, bet, body, recent_hour
from reliability.findings import Findings
from reliability.load import send_once
from reliability.promises import judge_ingestion
from reliability.queries import bets
from reliability.server import Deployment
from reliability.setcheck import EventSet
from tally.config import Settings
from tally.events.envelope import ValidationContext
from tally.ingest.batch import prepare
from tally.ingest.dedup import key_hasher
from tally.ingest.journal import Journal
from tally.storage.base import WriteSet

INT64_MAX = 2**63 - 1
VISIBLE_WITHIN = 15.0


@dataclass(frozen=True)
class Size:
    good_records: int  # on each side of the poison
    events_per_record: int
    restarts: int  # further restarts after the first (the poison must not come back)


SIZES = {"test": Size(1, 50, 0), "quick": Size(2, 200, 1), "full": Size(5, 1000, 2)}


def set_aside_listed(url: str, headers: dict[str, str], event_ids: set[str],
                     within: float = 30) -> bool:
    """Whether the operator can see the rows that were not applied, within ``within`` seconds
    of start-up (the applier replays the journal meanwhile, and the listing waits for it only
    TALLY_READ_YOUR_WRITES_MS): they are in ``GET /v1/admin/quarantine`` with a reason
    starting "not applied"."""
    deadline = time.monotonic() + within
    while True:
        listed = _set_aside_now(url, headers)
        if listed is None or event_ids <= listed or time.monotonic() >= deadline:
            return listed is not None and event_ids <= listed
        time.sleep(0.2)


def _set_aside_now(url: str, headers: dict[str, str]) -> set[str] | None:
    found: set[str] = set()
    params: dict[str, str] = {"limit": "1000"}
    while True:
        r = httpx.get(f"{url}/v1/admin/quarantine", params=params, headers=headers, timeout=30)
        if r.status_code != 200:
            return None
        page = r.json()
        found |= {str(item.get("event_id")) for item in page["items"]
                  if str(item.get("reason", "")).startswith("not applied")}
        if not page.get("next_cursor"):
            return found
        params["cursor"] = page["next_cursor"]


def _table(events: list[dict[str, Any]], seq: int, hasher: Any) -> pa.Table:
    """The events table the writer would journal for ``events`` (``writer._stage``)."""
    ctx = ValidationContext(received_at=datetime.now(UTC),
                            served_regions=Settings().served_regions)
    prepared = prepare(body(events), ctx, "reliability", len(events), hasher)
    assert not prepared.rejections, prepared.rejections
    table = prepared.table
    return table.set_column(0, "ingest_seq", pa.array(np.full(table.num_rows, seq, np.int64)))


def _null_tenant(table: pa.Table) -> pa.Table:
    """The same rows with ``tenant_id`` NULL in the last one: violates ``NOT NULL``."""
    i = table.schema.get_field_index("tenant_id")
    values = table.column(i).to_pylist()
    return table.set_column(i, table.schema.field(i), pa.array(values[:-1] + [None], pa.string()))


def write_poisoned_journal(directory: Path, size: Size, events: EventSet,
                           hour: datetime) -> set[str]:
    """Good records, the NOT NULL poison, the overflow pair, good records; the id of the row
    that cannot be stored. Dedup keys come from a key of our own: the store makes its own at
    first start, and no event here is posted again."""
    hasher = key_hasher(secrets.token_bytes(32))
    journal, seq = Journal(directory), 0

    def record(batch: list[dict[str, Any]], poison: bool = False, good: bool = True,
               stake: int | None = None) -> None:
        nonlocal seq
        seq += 1
        keys = [(e["tenant_id"], e["event_id"]) for e in batch]
        events.record_sent(keys)
        table = _table(batch, seq, hasher)
        if stake is not None:  # beyond what validation lets in today
            i = table.schema.get_field_index("stake_minor")
            table = table.set_column(i, table.schema.field(i),
                                     pa.array([stake] * table.num_rows, pa.int64()))
        journal.append(seq, WriteSet([_null_tenant(table) if poison else table]))
        if good:
            events.record_acknowledged(keys)  # journalled: acknowledged once, by definition

    def fresh(tag: str, n: int, brand: str = BRAND) -> list[dict[str, Any]]:
        return [bet(f"{tag}-{j}", hour + timedelta(seconds=j % 3600), brand) for j in range(n)]

    for k in range(size.good_records):
        record(fresh(f"before-{k}", size.events_per_record))
    poison = fresh("poison", 3, "brand-poison")
    record(poison, poison=True, good=False)
    overflow = [bet(f"overflow-{j}", hour, "brand-overflow") for j in range(2)]
    record(overflow, good=False, stake=INT64_MAX)  # an older version's record: no bound then
    for k in range(size.good_records):
        record(fresh(f"after-{k}", size.events_per_record))
    journal.close()
    return {poison[-1]["event_id"]}  # the row with the NULL


def run(workdir: Path, size: Size) -> Findings:
    findings = Findings("poison journal record")
    events, hour = EventSet(), recent_hour()
    deployment = Deployment.create(workdir / "data")
    poison_ids = write_poisoned_journal(deployment.data / "journal", size, events, hour)
    findings.figure("journal records", 2 * size.good_records + 2)
    try:
        for start in range(1 + size.restarts):
            try:
                deployment.start()
            except RuntimeError as exc:
                last = str(exc).strip().splitlines()[-1]
                findings.expect(False, f"start {start + 1} with the poison journalled: "
                                       f"the server exited: {last}")
                break
            _serve(deployment, events, poison_ids, hour, findings)
            deployment.stop()
    finally:
        deployment.kill()
    events.check(deployment.data, findings)
    return findings.finish()


def _serve(deployment: Deployment, events: EventSet, poison_ids: set[str], hour: datetime,
           findings: Findings) -> None:
    url, headers = deployment.running.url, deployment.headers()
    findings.expect(set_aside_listed(url, headers, poison_ids),
                    "the record that could not be applied is not listed as set aside "
                    "(GET /v1/admin/quarantine, reason 'not applied …')")
    overflow = [bet(f"front-overflow-{secrets.token_hex(4)}-{j}", hour, "brand-overflow",
                    INT64_MAX) for j in range(2)]
    judge_ingestion([send_once(url, batch_request(headers, overflow, events))], events,
                    findings, "the overflow pair through the front door")
    later = [bet(f"later-{secrets.token_hex(4)}-{j}", hour + timedelta(seconds=j), BRAND)
             for j in range(20)]
    outcome = send_once(url, batch_request(headers, later, events))
    judge_ingestion([outcome], events, findings, "a batch after the poison")
    findings.expect(outcome.status == 202, f"a batch after the poison got {outcome.status}")
    expected = sum(1 for tenant, _ in events.acknowledged if tenant == BRAND)
    seen = _await_bets(url, headers, hour, expected)
    findings.expect(seen == expected, f"{expected} acknowledged events of {BRAND}, "
                                      f"{seen} visible after {VISIBLE_WITHIN:.0f} s")


def _await_bets(url: str, headers: dict[str, str], hour: datetime, expected: int) -> int:
    deadline, seen = time.monotonic() + VISIBLE_WITHIN, -1
    while time.monotonic() < deadline:
        answer = bets(url, headers, hour, hour + timedelta(hours=1), "1h")
        seen = answer.total if answer.status == 200 else -1
        if seen == expected:
            break
        time.sleep(0.2)
    return seen
