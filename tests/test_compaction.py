"""DuckDB's compaction of the kept rows (``step_times``): many small writes leave one row a
key in the compacted hours, merged spans now and then, and the same answers. The stores are
DuckDB's whatever the suite's store (the chDB suite does not run this module again)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from tally.cohorts import funnel as funnel_
from tests import cohort_reference as cref
from tests.test_cohorts import KEPT_BODIES, SENT, close


def test_kept_rows_of_many_small_writes_are_compacted_and_answer_the_same(tmp_path):
    """The stream of the cohort tests written 25 events a write (in time order, as a live
    feed comes) to four stores: one compacting `step_times` every 50 events, one never, one
    also merging every third compaction, one bulk-loaded (derived at its end). The compacted
    hours hold one row per key, the instants per key are the same in all, and every kept
    funnel gives the reference's answer from each."""
    from dataclasses import replace

    import msgspec

    from tally.events.envelope import ValidationContext
    from tally.ingest.batch import prepare
    from tally.ingest.dedup import key_hasher
    from tally.rollups import activity
    from tally.rollups.spec import derived_tables
    from tally.storage.base import DerivedTable, WriteSet
    from tally.storage.factory import open_backend

    def derived(events: int | None, merge_every: int = 10**9) -> Any:
        def tables(dialect: str) -> list[DerivedTable]:
            return [replace(t, compaction=None if events is None else
                            replace(t.compaction, events=events, merge_every=merge_every))
                    if t.compaction is not None else t for t in derived_tables(dialect)]
        return tables

    stream = sorted(SENT, key=lambda e: e["occurred_at"])
    ctx = ValidationContext(datetime.now(UTC), frozenset({"EU", "UK", "LATAM"}))
    hasher = key_hasher(b"test")
    writes = [prepare(msgspec.json.encode(stream[i:i + 25]), ctx, "t", 10_000, hasher).table
              for i in range(0, len(stream), 25)]
    plans = {"compacted": derived(50), "appended": derived(None), "bulk": derived(50),
             "merged": derived(50, merge_every=3)}
    for name in plans:
        (tmp_path / name).mkdir()
    stores = {name: open_backend("duckdb", tmp_path / name, derived=plan,
                                 retired=activity.RETIRED) for name, plan in plans.items()}
    try:
        stores["bulk"].defer_derived(True)
        for table in writes:
            for store in stores.values():
                store.write(WriteSet(events=[table]))
        stores["bulk"].defer_derived(False)
        compacted, appended = stores["compacted"], stores["appended"]
        mark = int(compacted.setting("compacted:step_times") or 0)
        keys = "event_type, reason, tenant_id, region, player_id, k, hour"
        count = (f"SELECT count(*) AS rows, count(DISTINCT ({keys})) AS keys "  # noqa: S608
                 f"FROM step_times WHERE hour < {mark}")
        [c] = compacted.query(count).to_pylist()
        [a] = appended.query(count).to_pylist()
        assert mark > 0 and c["rows"] == c["keys"] == a["keys"] < a["rows"], (mark, c, a)
        instants = (f"SELECT {keys}, list_sort(flatten(list(times))) AS t FROM step_times "
                    f"GROUP BY {keys} ORDER BY {keys}")
        assert compacted.query(instants).to_pylist() == appended.query(instants).to_pylist()
        # every third compaction merged: the same rows, in longer sorted spans (fewer places
        # where (event_type, hour) steps back in the table's order) up to the merged mark
        merged = stores["merged"]
        upto = int(merged.setting("merged:step_times") or 0)
        assert 0 < upto <= int(merged.setting("compacted:step_times") or 0)
        assert merged.query(instants).to_pylist() == appended.query(instants).to_pylist()

        def descents(store: Any) -> int:
            order = store.query(f"SELECT event_type, hour FROM step_times WHERE hour < {upto} "  # noqa: S608
                                "ORDER BY rowid").to_pylist()
            keys = [(r["event_type"], r["hour"]) for r in order]
            return sum(b < a for a, b in zip(keys, keys[1:]))

        assert descents(merged) < descents(compacted), (descents(merged), descents(compacted))
        # a bulk load (derived at its end, a few large statements): counted as compacted and
        # merged
        bulk = stores["bulk"]
        newest = str(bulk.query("SELECT max(hour) AS h FROM step_times").column("h")[0].as_py())
        assert bulk.setting("compacted:step_times") == bulk.setting("merged:step_times") == \
            newest
        for body in KEPT_BODIES:
            f = funnel_.parse(body)
            expected = cref.funnel(SENT, body)
            for store in stores.values():
                got = funnel_.answer(store, f, kept_rows=True)
                assert not close({k: got[k] for k in expected}, expected), body
    finally:
        for store in stores.values():
            store.close()
