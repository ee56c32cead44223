"""The in-memory dedup index against a plain set, and the keyed hash."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from tally.ingest import dedup
from tally.ingest.dedup import DedupIndex, key_hasher

keys = st.tuples(st.integers(-(2**63), 2**63 - 1), st.integers(-(2**63), 2**63 - 1))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(keys, max_size=40), max_size=25), st.lists(keys, max_size=60))
def test_index_agrees_with_a_set(batches, probes):
    index, reference = DedupIndex(), set()
    for batch in batches:
        unique = [k for k in dict.fromkeys(batch) if k not in reference]  # writer's contract
        index.add([k[0] for k in unique], [k[1] for k in unique])
        reference.update(unique)
    for probe_keys in (probes, list(reference)[:50]):
        if not probe_keys:
            continue
        hi = np.array([k[0] for k in probe_keys], dtype=np.int64)
        lo = np.array([k[1] for k in probe_keys], dtype=np.int64)
        assert index.contains(hi, lo).tolist() == [k in reference for k in probe_keys]
    assert len(index) == len(reference)


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
