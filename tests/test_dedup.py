"""The in-memory dedup index against a plain set, and the keyed hash."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tally.ingest import dedup
from tally.ingest.dedup import DedupIndex, key_hasher

keys = st.tuples(st.integers(-(2**63), 2**63 - 1), st.integers(-(2**63), 2**63 - 1))


# a compact index's keys: the high half of the low word is what it keeps of it (low halves
# drawn from few values, so that keys differing only there occur)
compact_keys = st.tuples(st.integers(-(2**63), 2**63 - 1), st.integers(-3, 3),
                         st.integers(0, 2**32 - 1)).map(lambda k: (k[0], (k[1] << 32) | k[2]))


@pytest.mark.parametrize("compact", [False, True])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_index_agrees_with_a_set(compact, data):
    """Against a set of the keys as the index tells them apart: whole, or (compact) the high
    word and the high half of the low one."""
    drawn = compact_keys if compact else keys
    batches = data.draw(st.lists(st.lists(drawn, max_size=40), max_size=25))
    probes = data.draw(st.lists(drawn, max_size=60))

    def told(k: tuple[int, int]) -> tuple[int, int]:
        return (k[0], k[1] >> 32) if compact else k

    index, reference = DedupIndex(compact=compact), set()
    for batch in batches:
        unique = [k for k in dict.fromkeys(batch) if told(k) not in reference]  # writer's
        unique = list({told(k): k for k in reversed(unique)}.values())  # contract: new keys
        index.add([k[0] for k in unique], [k[1] for k in unique])
        reference.update(told(k) for k in unique)
    for probe_keys in (probes, [(h, lo << 32) if compact else (h, lo)
                                for h, lo in list(reference)[:50]]):
        if not probe_keys:
            continue
        hi = np.array([k[0] for k in probe_keys], dtype=np.int64)
        lo = np.array([k[1] for k in probe_keys], dtype=np.int64)
        assert index.contains(hi, lo).tolist() == [told(k) in reference for k in probe_keys]
    assert len(index) == len(reference)


def test_compact_index_keeps_96_bits_in_12_bytes_a_key():
    rng = np.random.default_rng(8)
    hi = rng.integers(-(2**63), 2**63 - 1, 200_000, dtype=np.int64)
    lo = rng.integers(-(2**63), 2**63 - 1, 200_000, dtype=np.int64)
    whole, compact = DedupIndex(), DedupIndex(compact=True)
    for index in (whole, compact):
        index.load([(hi, lo)])
        assert index.contains(hi, lo).all()
    fence = whole.nbytes - 16 * len(hi)
    assert 0 < fence < 2 * len(hi)  # about a byte a key
    assert compact.nbytes == 12 * len(hi) + fence
    # a key that differs only in the low 32 bits is the same key to the compact index alone
    near = lo ^ 1
    assert not whole.contains(hi, near).any()
    assert compact.contains(hi, near).all()
    assert not compact.contains(hi, lo ^ (1 << 32)).any()
    with pytest.raises(ValueError, match="whole keys"):
        compact.arrays()


def test_same_high_half_different_low_half_is_not_a_duplicate():
    index = DedupIndex()
    index.add([5, 5, 5], [1, 2, 3])
    found = index.contains(np.array([5, 5, 6], dtype=np.int64), np.array([3, 4, 1], np.int64))
    assert found.tolist() == [True, False, False]


def test_runs_stay_few_and_bounded(monkeypatch):
    monkeypatch.setattr(dedup, "MAX_MERGED_RUN", 4096)
    index = DedupIndex()
    rng = np.random.default_rng(3)
    for _ in range(300):
        hi = rng.integers(-(2**63), 2**63 - 1, 100, dtype=np.int64)
        index.add(hi, hi)
    assert len(index) == 30_000
    assert index.run_count <= 30_000 // 2048 + 12


def test_bulk_load_then_lookup():
    rng = np.random.default_rng(5)
    hi = rng.integers(-(2**63), 2**63 - 1, 50_000, dtype=np.int64)
    lo = rng.integers(-(2**63), 2**63 - 1, 50_000, dtype=np.int64)
    index = DedupIndex()
    index.load([(hi[:20_000], lo[:20_000]), (hi[20_000:], lo[20_000:])])
    assert index.contains(hi, lo).all()
    assert not index.contains(hi, lo + 1).any()


def test_hash_is_keyed_and_separates_tenant_from_event_id():
    a, b = key_hasher(b"k1"), key_hasher(b"k2")
    assert a("t", "e") == a("t", "e")
    assert a("t", "e") != b("t", "e")
    assert a("ab", "c") != a("a", "bc")


def test_fence_edges_extreme_values_and_long_equal_runs():
    lo_end, hi_end = -(2**63), 2**63 - 1
    rng = np.random.default_rng(11)
    hi = np.concatenate(([lo_end, hi_end, 0, -1], np.full(100, 7, np.int64),
                         rng.integers(lo_end, hi_end, 5000, dtype=np.int64)))
    lo = np.arange(len(hi), dtype=np.int64)
    index = DedupIndex()
    index.load([(hi, lo)])
    assert index.contains(hi, lo).all()
    probes_hi = np.array([lo_end, hi_end, 0, -1, 7, 7, 8, 1], dtype=np.int64)
    probes_lo = np.array([0, 1, 2, 3, 4 + 99, 4 + 100, 0, 0], dtype=np.int64)
    assert index.contains(probes_hi, probes_lo).tolist() == [True] * 5 + [False] * 3


# -- the partitioned index on disk -------------------------------------------------------------

import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from datetime import datetime  # noqa: E402
from pathlib import Path  # noqa: E402

import pyarrow as pa  # noqa: E402

from tally.ingest.dedup_disk import PartitionedDedupIndex, partition_of  # noqa: E402
from tally.storage.base import WriteSet  # noqa: E402
from tally.storage.factory import open_backend  # noqa: E402
from tally.storage.schema import EVENTS_SCHEMA  # noqa: E402


class StoreKeys:
    """A real store (the DuckDB backend, as ``tally serve`` opens it) whose events carry the
    given keys: what the index checks itself against and rebuilds from."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.backend = open_backend("duckdb", root, derived=lambda dialect: ())
        self.rows = 0

    def store(self, hi, lo, seq):
        n = len(hi)
        ids = [f"e{self.rows + i}" for i in range(n)]
        self.rows += n
        at = pa.array([datetime(2025, 10, 23)] * n, pa.timestamp("us"))
        text = {"event_type": "bet.placed", "tenant_id": "brand-1", "region": "EU",
                "schema_version": "1.0.0", "payload": "{}"}
        columns = {"ingest_seq": pa.array([seq] * n, pa.int64()),
                   "id_hi": pa.array(np.asarray(hi, np.int64)),
                   "id_lo": pa.array(np.asarray(lo, np.int64)),
                   "event_id": pa.array(ids), "occurred_at": at, "ingested_at": at,
                   "received_at": at, **{k: pa.array([v] * n) for k, v in text.items()}}
        table = pa.Table.from_arrays(
            [columns.get(f.name, pa.nulls(n, f.type)) for f in EVENTS_SCHEMA],
            schema=EVENTS_SCHEMA)
        self.backend.write(WriteSet(events=[table]), journal_seq=seq)

    def __getattr__(self, name):  # event_keys, max_ingest_seq, setting, put_setting
        return getattr(self.backend, name)


class MemoryKeys:
    """Only for the RSS probe, which adds 24M keys: the index's own memory is what it
    measures, so no store runs in that process (a store would add its own)."""

    def __init__(self) -> None:
        self.settings: dict[str, str] = {}

    def event_keys(self, chunk_rows):
        return iter(())

    def max_ingest_seq(self):
        return 0

    def setting(self, name):
        return self.settings.get(name)

    def put_setting(self, name, value):
        self.settings[name] = value


def rand(rng, n):
    return (rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64),
            rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64))


def small_index(tmp: Path, store: StoreKeys, **kw) -> PartitionedDedupIndex:
    index = PartitionedDedupIndex.open(tmp, store, memory_mb=8, bits=3, **kw)
    index.memtable_keys, index.max_run = 700, 5000  # many runs, merges and flushes
    index.resident_budget = 64 * 4096  # pages given back all the time
    return index


def probe(index, reference, rng, stored_hi, stored_lo):
    qhi, qlo = rand(rng, 300)
    pick = rng.integers(0, len(stored_hi), 200) if len(stored_hi) else np.array([], int)
    qhi = np.concatenate((qhi, stored_hi[pick], stored_hi[pick[:50]]))
    qlo = np.concatenate((qlo, stored_lo[pick], stored_lo[pick[:50]] ^ 1))  # same hi, other lo
    got = index.contains(qhi, qlo)
    want = [(int(h), int(v)) in reference for h, v in zip(qhi, qlo, strict=True)]
    assert got.tolist() == want


def test_partitioned_index_agrees_with_a_set_across_flushes_merges_and_evictions(tmp_path):
    rng = np.random.default_rng(7)
    store = StoreKeys(tmp_path / "store")
    index = small_index(tmp_path / "dedup", store)
    reference: set[tuple[int, int]] = set()
    all_hi, all_lo = np.empty(0, np.int64), np.empty(0, np.int64)
    for seq in range(1, 60):
        hi, lo = rand(rng, int(rng.integers(1, 400)))
        hi[:3] = hi[0]  # equal high halves, different low halves
        found = index.contains(hi, lo)
        assert not found.any()
        index.add(hi, lo, seq)
        store.store(hi, lo, seq)
        reference.update(zip(hi.tolist(), lo.tolist(), strict=True))
        all_hi, all_lo = np.concatenate((all_hi, hi)), np.concatenate((all_lo, lo))
        probe(index, reference, rng, all_hi, all_lo)
    assert len(index) == len(reference)
    assert index.run_count > 8  # the test went through runs on disk, not only the memtable
    assert index.resident_estimate() < 8 << 20
    index.close()
    again = small_index(tmp_path / "dedup", store)
    assert again.rebuilt == []  # reused, not rebuilt
    probe(again, reference, rng, all_hi, all_lo)
    assert len(again) == len(reference)


def test_discarded_keys_are_new_again_after_a_restart(tmp_path):
    rng = np.random.default_rng(8)
    store = StoreKeys(tmp_path / "store")
    index = small_index(tmp_path / "dedup", store)
    hi, lo = rand(rng, 2000)
    index.add(hi, lo, 1)
    store.store(hi[10:], lo[10:], 1)  # the first ten were set aside when applied
    index.discard(hi[:10], lo[:10])
    index.close()
    again = small_index(tmp_path / "dedup", store)
    assert again.contains(hi, lo).tolist() == [False] * 10 + [True] * 1990
    again.add(hi[:5], lo[:5], 2)  # sent again and stored this time
    store.store(hi[:5], lo[:5], 2)
    assert again.contains(hi[:10], lo[:10]).tolist() == [True] * 5 + [False] * 5


def test_stale_index_of_another_store_or_behind_the_store_is_rebuilt(tmp_path):
    rng = np.random.default_rng(9)
    store = StoreKeys(tmp_path / "store")
    index = small_index(tmp_path / "dedup", store)
    hi, lo = rand(rng, 3000)
    index.add(hi, lo, 1)
    store.store(hi, lo, 1)
    index.close()
    more_hi, more_lo = rand(rng, 500)
    store.store(more_hi, more_lo, 2)  # written by something that did not keep the index
    again = small_index(tmp_path / "dedup", store)
    assert again.rebuilt and "covers ingest seq 1" in again.rebuilt[0]
    assert again.contains(more_hi, more_lo).all() and again.contains(hi, lo).all()
    again.close()
    other = StoreKeys(tmp_path / "store-2")  # another store, the same index folder
    fresh = small_index(tmp_path / "dedup", other)
    assert fresh.rebuilt == ["index of another store"]
    assert not fresh.contains(hi, lo).any()
    assert len(fresh) == 0


def test_damaged_or_truncated_partition_is_detected_and_rebuilt(tmp_path):
    rng = np.random.default_rng(10)
    store = StoreKeys(tmp_path / "store")
    index = small_index(tmp_path / "dedup", store)
    hi, lo = rand(rng, 6000)
    for seq, a in enumerate(range(0, 6000, 1000), start=1):
        index.add(hi[a:a + 1000], lo[a:a + 1000], seq)
        store.store(hi[a:a + 1000], lo[a:a + 1000], seq)
    index.close()
    runs = sorted((tmp_path / "dedup").glob("*.run"))
    with open(runs[0], "r+b") as f:  # truncated
        f.truncate(os.path.getsize(runs[0]) - 100)
    with open(runs[-1], "r+b") as f:  # one bit flipped in the keys
        f.seek(4096 + 8)
        byte = f.read(1)
        f.seek(4096 + 8)
        f.write(bytes([byte[0] ^ 1]))
    again = small_index(tmp_path / "dedup", store)
    assert len(again.rebuilt) == 1 and again.rebuilt[0].startswith("damaged partitions")
    damaged = {int(p.name[1:4], 16) for p in (runs[0], runs[-1])}
    assert again.rebuilt[0] == f"damaged partitions {sorted(damaged)}"
    assert again.contains(hi, lo).all()
    assert not again.contains(hi, lo ^ 1).any()
    assert set(partition_of(hi, 3).tolist()) >= damaged


KILLED_WRITER = textwrap.dedent("""
    import sys, numpy as np
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_dedup import StoreKeys, rand, small_index
    store = StoreKeys(Path({folder!r}).parent / "store")  # applies nothing before the kill
    index = small_index(Path({folder!r}), store)
    rng = np.random.default_rng(12)
    for seq in range(1, 40):
        hi, lo = rand(rng, 250)
        index.add(hi, lo, seq)
        np.save(Path({folder!r}) / f"keys-{{seq}}.npy", np.stack((hi, lo)))
    print("ready", flush=True)
    import time; time.sleep(60)
""")


def test_kill_9_loses_no_key(tmp_path):
    """A process adds keys (some flushed to runs, the rest only in the log) and is killed:
    the next open knows every one of them."""
    folder = tmp_path / "dedup"
    code = KILLED_WRITER.format(tests=str(Path(__file__).parent), folder=str(folder))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    store = StoreKeys(tmp_path / "store")  # the same store, its lock freed by the kill
    keys = [np.load(folder / f"keys-{seq}.npy") for seq in range(1, 40)]
    for seq, pair in enumerate(keys[:30], start=1):  # the store applied 30 of 39 records
        store.store(pair[0], pair[1], seq)
    again = small_index(folder, store, journal_last_seq=39)
    assert again.rebuilt == []  # log replayed, nothing to rebuild
    for pair in keys:
        assert again.contains(pair[0], pair[1]).all()
    assert not again.contains(keys[0][0], keys[0][1] ^ 1).any()


RSS_PROBE = textwrap.dedent("""
    import json, sys, numpy as np, psutil
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_dedup import MemoryKeys, rand
    from tally.ingest.dedup_disk import PartitionedDedupIndex
    store = MemoryKeys()
    index = PartitionedDedupIndex.open(Path({folder!r}), store, memory_mb={mb})
    rng = np.random.default_rng(1)
    rss = []
    for step in range(8):
        index.load(rand(rng, 1_000_000) for _ in range({millions}))
        for _ in range(50):
            hi, lo = rand(rng, 1000)
            index.contains(hi, lo)
        rss.append(psutil.Process().memory_info().rss)
    print(json.dumps({{"rss": rss, "keys": len(index)}}))
""")


def test_memory_stays_bounded_as_keys_grow(tmp_path):
    """RSS of a process holding 24M keys in a 32 MB budget: it stops growing with the keys
    (an in-memory index of them would take ~400 MB)."""
    code = RSS_PROBE.format(tests=str(Path(__file__).parent), folder=str(tmp_path), mb=32,
                            millions=3)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    import json
    figures = json.loads(out)
    rss = figures["rss"]
    assert figures["keys"] == 24_000_000
    growth = rss[-1] - rss[1]  # from 6M keys to 24M keys
    assert growth < 60 << 20, rss  # ~18M more keys would be 300 MB in memory


def test_the_server_on_the_disk_index_dedups_across_restarts(tmp_path):
    """``TALLY_DEDUP_INDEX=disk``: the ingestion path uses the partitioned index, and a
    duplicate that comes back after a restart is counted, not stored again."""
    from fastapi.testclient import TestClient

    from tally.api.app import create_app
    from tally.config import Settings
    from tests.conftest import bearer, make_event

    settings = Settings(data_dir=tmp_path / "data", dedup_index="disk")
    events = [make_event() for _ in range(50)]
    with TestClient(create_app(settings)) as client:
        headers = bearer(client, settings.data_dir)
        first = client.post("/v1/events:batch", json=events, headers=headers).json()
    assert (first["accepted"], first["duplicates"]) == (50, 0)
    assert any((settings.data_dir / "dedup").iterdir())
    with TestClient(create_app(settings)) as client:
        headers = bearer(client, settings.data_dir)
        again = client.post("/v1/events:batch", json=events[:20] + [make_event()],
                            headers=headers).json()
    assert (again["accepted"], again["duplicates"]) == (1, 20)
