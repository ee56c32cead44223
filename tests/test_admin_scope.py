"""What confining the operator routes needs below the API (issue 9 item 6): the quarantine's
brand and region columns — filled for new rejections, back-filled when an older store is
opened, NULL (listed only to an admin without limits) for a journal record written before
they existed — and the audit log's filtered, bounded pages. The routes themselves are in
``test_admin_matrix.py``.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from tally.audit.log import AuditLog
from tally.storage.base import WriteSet
from tally.storage.duckdb import DuckDBBackend
from tests.conftest import bearer, make_event
from tests.test_ingest_api import assert_problem

RECEIVED = datetime(2025, 10, 23, 12)
# the quarantine as the release before this change created it
OLD_QUARANTINE = """
CREATE SEQUENCE quarantine_seq;
CREATE TABLE quarantine (
  id BIGINT PRIMARY KEY DEFAULT nextval('quarantine_seq'),
  received_at TIMESTAMP NOT NULL, client_id VARCHAR NOT NULL, batch_index INTEGER NOT NULL,
  event_id VARCHAR, reason VARCHAR NOT NULL, event VARCHAR NOT NULL);
"""
OLD_ROWS = [  # (stored event text, the brand and region it names as strings)
    ('{"event_id":"a","tenant_id":"b1","region":"EU","payload":{}}', "b1", "EU"),
    ('{"event_id":"b","tenant_id":"b2","region":"UK"}', "b2", "UK"),
    ('{"event_id":"c","tenant_id":7,"region":["EU"]}', None, None),
    ('{"event_id":"d","region":"LATAM"}', None, "LATAM"),
    ('{"event_id":"e","redacted":true}', None, None),  # a residency stub
    ("not json at all", None, None),
    ('["tenant_id","b1"]', None, None),
    ('{"deep":' + "[" * 2000 + "]" * 2000 + ',"tenant_id":"b3","region":"EU"}', "b3", "EU"),
]


def old_store(data_dir: Path) -> None:
    data_dir.mkdir(parents=True)
    con = duckdb.connect(str(data_dir / "events.duckdb"))
    con.execute(OLD_QUARANTINE)
    for i, (event, _, _) in enumerate(OLD_ROWS):
        con.execute("INSERT INTO quarantine (received_at, client_id, batch_index, event_id,"
                    " reason, event) VALUES (?, 'cl_old', ?, ?, 'bad', ?)",
                    [RECEIVED, i, str(i), event])
    con.close()


def test_an_older_store_gains_the_columns_back_filled_from_the_stored_events(tmp_path):
    data_dir = tmp_path / "data"
    old_store(data_dir)
    backend = DuckDBBackend(data_dir)
    try:
        rows = backend.quarantine(0, 100)
        assert [(r.tenant_id, r.region) for r in rows] == [(t, r) for _, t, r in OLD_ROWS]
        assert [r.event for r in rows] == [e for e, _, _ in OLD_ROWS]  # events untouched
        b1_or_b3 = backend.quarantine(0, 100, brands=["b1", "b3"])
        assert [r.batch_index for r in b1_or_b3] == [0, 7]
        eu_b3 = backend.quarantine(0, 100, brands=["b3"], regions=["EU"])
        assert [r.batch_index for r in eu_b3] == [7]
        # paging with the scope in SQL: a page of 1 after the first EU row is the next EU row
        assert [r.batch_index for r in backend.quarantine(rows[0].id, 1, regions=["EU"])] == [7]
    finally:
        backend.close()
    DuckDBBackend(data_dir).close()  # opening a migrated store again changes nothing


def test_a_journal_record_written_before_the_columns_applies_with_them_null(tmp_path):
    """A record journalled by the previous release (its quarantine table without the new
    columns) and replayed after the upgrade must not poison the applier."""
    backend = DuckDBBackend(tmp_path)
    try:
        old_layout = pa.table({
            "received_at": pa.array([RECEIVED], pa.timestamp("us")),
            "client_id": ["cl_old"], "batch_index": pa.array([0], pa.int32()),
            "event_id": ["x"], "reason": ["bad"],
            "event": ['{"event_id":"x","tenant_id":"b1","region":"EU"}']})
        backend.write(WriteSet(quarantine=[old_layout]), journal_seq=1)
        (row,) = backend.quarantine(0, 10)
        assert (row.event_id, row.tenant_id, row.region) == ("x", None, None)
        assert backend.quarantine(0, 10, brands=["b1"]) == []  # unknown: not provably b1's
    finally:
        backend.close()


def test_new_rejections_keep_the_brand_and_region_they_name(client, settings):
    headers = bearer(client, settings.data_dir)
    batch = [make_event(tenant_id="b1", region="EU", payload={}),
             make_event(tenant_id="b2", region="NA"),  # residency: a stub, but still b2/NA
             make_event(tenant_id=["b1"], region=3)]
    assert client.post("/v1/events:batch", headers=headers,
                       json=batch).json()["rejected"] == 3
    client.get("/v1/admin/quarantine", headers=headers)  # flushes the applier
    backend: DuckDBBackend = client.app.state.runtime.backend  # type: ignore[attr-defined]
    rows = backend.quarantine(0, 10)
    assert [(r.event_id, r.tenant_id, r.region) for r in rows] == [
        (batch[0]["event_id"], "b1", "EU"), (batch[1]["event_id"], "b2", "NA"),
        (batch[2]["event_id"], None, None)]
    assert json.loads(rows[1].event) == {"event_id": batch[1]["event_id"], "redacted": True}


@pytest.mark.parametrize("params", [{"brand_id": ""}, {"region": " "}])
def test_a_blank_listing_filter_is_400(client, settings, params):
    r = client.get("/v1/admin/quarantine", params=params, headers=bearer(client,
                                                                         settings.data_dir))
    assert assert_problem(r, 400)["parameter"] == next(iter(params))


def test_a_filtered_audit_page_reads_a_bounded_number_of_entries(tmp_path):
    """However few entries are the caller's, one page reads at most ``max_scanned``; the
    pages, followed, still give every one of them, in order."""
    log = AuditLog(tmp_path, checkpoint_entries=1000, checkpoint_seconds=3600)
    try:
        actors = ["cl_a" if i % 5 == 0 else "cl_b" for i in range(23)]
        for actor in actors:
            log.append({"kind": "admin", "actor": {"client_id": actor}})
        log.append({"kind": "audit", "event": "no actor"})
        pages, after = [], 0
        while True:
            page = log.entries(after, 10, frozenset({"cl_a"}), max_scanned=4)
            pages.append([entry["seq"] for entry in page.items])
            if page.next_after is None:
                break
            assert page.next_after == after + 4 and len(page.items) <= 1
            after = page.next_after
        seen = [seq for page_seqs in pages for seq in page_seqs]
        assert seen == [i + 1 for i, actor in enumerate(actors) if actor == "cl_a"]
        assert len(pages) == 6  # 24 entries, 4 at a time
        everything = log.entries(0, 100)
        assert len(everything.items) == 24 and everything.next_after is None
        assert log.entries(0, 24).next_after is None  # a full page that ends the log
        assert log.entries(0, 23).next_after == 23
    finally:
        log.close()

