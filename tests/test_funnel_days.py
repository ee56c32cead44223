"""A funnel's whole days kept between queries (cohorts/funnel.py ``_by_day``): a funnel that
the kept rows answer keeps each whole UTC day's best attempts under the data version of the
events they read, and reuses them — the answers stay the reference's
(``tests/cohort_reference.py``) over sliding and unaligned ranges, after late events in
a kept day, late registrations under a player-attribute filter, and for tokens confined to
different brands; a collided hash is never answered from kept days.

The stream spans a week with attempts that cross midnight, so that a day's attempts reach
into the next day and a range's partial first and last days matter.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tally.api.app import create_app
from tally.cohorts import funnel as funnel_
from tally.config import Settings
from tally.insights.cache import PartCache
from tally.runtime import Runtime
from tests import cohort_reference as cref
from tests.conftest import bearer, on_duckdb_only
from tests.test_cohorts import FUNNEL, assert_answer, ev, iso, send

START = datetime(2025, 11, 1, tzinfo=UTC)
BRANDS = ("fd-1", "fd-2")
PATH = [("payment.intent", {}), ("payment.captured", {}),
        ("wallet.credit", {"reason": "deposit"}), ("bet.placed", {})]
STEPS = [{"event": "payment.intent"}, {"event": "payment.captured"},
         {"event": "wallet.credit", "reason": "deposit"}, {"event": "bet.placed"}]


GAPS = [0, 30, 120, 600, 1200, 1800, 3600, 10_800]  # seconds between an attempt's steps


def week_stream(seed: int = 17) -> list[dict[str, Any]]:
    """Two brands sharing player ids, 7 days from 1 Nov: each player's attempts along the
    deposit path, steps 0 s to 3 h apart, mostly minutes (some parts missing, some
    repeated), many of them started in the last hour of a day; registrations with a device
    for most players."""
    rng = random.Random(seed)
    out = []
    for brand in BRANDS:
        for i in range(40):
            player = f"p{i}"
            if rng.random() < 0.8:
                out.append(ev("player.registered", iso(START - timedelta(days=1)), player,
                              brand, device=rng.choice(["mobile", "desktop"])))
            for _ in range(rng.randint(1, 8)):
                day = rng.randrange(7)
                late = rng.random() < 0.4  # started near midnight: the attempt crosses it
                when = START + timedelta(days=day, seconds=rng.randrange(
                    86_400 - 3600 if late else 0, 86_400))
                for event_type, payload in PATH:
                    if rng.random() < 0.15:
                        continue
                    when += timedelta(seconds=rng.choice(GAPS))
                    for _ in range(2 if rng.random() < 0.1 else 1):
                        out.append(ev(event_type, iso(when), player, brand,
                                      region=rng.choice(["EU", "UK"]), **payload))
    return out


SENT = week_stream()


@dataclass
class Week:
    client: TestClient
    headers: dict[str, str]
    settings: Settings
    sent: list[dict[str, Any]]

    @property
    def runtime(self) -> Runtime:
        return self.client.app.state.runtime  # type: ignore[attr-defined, no-any-return]

    def check(self, body: dict[str, Any], headers: dict[str, str] | None = None,
              brands: tuple[str, ...] | None = None) -> dict[str, Any]:
        """The API's answer, checked against the reference on the events sent (``brands``:
        the caller's, as a filter the reference applies)."""
        want = body if brands is None else \
            {**body, "filters": {**body.get("filters", {}), "brand_id": list(brands)}}
        expected = cref.funnel(self.sent, want)
        assert_answer(self.client.post(FUNNEL, json=body, headers=headers or self.headers),
                      expected)
        return expected

    def add(self, events: list[dict[str, Any]]) -> None:
        send(self.client, self.headers, events)
        assert self.runtime.ingest.flush()
        self.sent += events


@pytest.fixture
def week(tmp_path) -> Iterator[Week]:
    settings = Settings(data_dir=tmp_path / "data", regions="EU,UK,LATAM")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        headers = bearer(client, settings.data_dir)
        send(client, headers, SENT)
        assert client.app.state.runtime.ingest.flush()  # type: ignore[attr-defined]
        yield Week(client, headers, settings, list(SENT))


def body(start: str, end: str, window: int = 3600, **extra: Any) -> dict[str, Any]:
    return {"steps": STEPS, "window_sec": window, "from": start, "to": end, **extra}


def day(n: int, hours: float = 0) -> str:
    return iso(START + timedelta(days=n, hours=hours))


def test_the_stream_has_attempts_across_midnight_and_deep_steps():
    """Guards the generator: attempts that reach step 4 on the day after they start."""
    answer = cref.funnel(SENT, body(day(0), day(7), 86_400))
    assert answer["total"] > 30 and answer["steps"][3]["count"] > 10
    for n in range(6):  # each day's attempts reach further with the next day's events
        ranged = body(day(n), day(n + 1), 3600)
        same_day = [e for e in SENT if e["occurred_at"] < day(n + 1)]
        assert cref.funnel(SENT, ranged)["steps"][3]["count"] > \
            cref.funnel(same_day, ranged)["steps"][3]["count"]


def test_sliding_and_unaligned_ranges_reuse_kept_days_and_match_the_reference(week):
    parts = week.runtime.parts
    week.check(body(day(0), day(6)))  # cold: every day computed and kept
    kept, hits = parts.size_bytes, parts.hits
    assert kept > 0
    week.check(body(day(1), day(7)))  # slid a day: five days kept, one new
    assert parts.hits - hits == 5
    for start, end, window in [(day(0, 5.5), day(5, 17.25), 3600), (day(1, 23), day(6), 7200),
                               (day(0), day(7), 86_400), (day(2, 0.1), day(4, 23.9), 600),
                               (day(0, 12), day(3, 12), 3600), (day(1), day(3), 3601)]:
        week.check(body(start, end, window))
    empty = week.check(body("2025-10-01", "2025-10-05T06:00:00Z"))  # no events: kept empty
    assert empty["total"] == 0
    # a range of under two whole days is answered in one statement: nothing kept or read
    hits, misses = parts.hits, parts.misses
    week.check(body(day(2, 3), day(4, 1)))
    assert (parts.hits, parts.misses) == (hits, misses)
    exposed = {(m.name, s.name, tuple(sorted(s.labels.items()))): s.value
               for m in text_string_to_metric_families(week.client.get("/metrics").text)
               for s in m.samples}
    assert exposed[("tally_funnel_parts_lookups", "tally_funnel_parts_lookups_total",
                    (("result", "hit"),))] == hits
    assert exposed[("tally_funnel_parts_lookups", "tally_funnel_parts_lookups_total",
                    (("result", "miss"),))] == misses
    assert exposed[("tally_funnel_parts_bytes", "tally_funnel_parts_bytes", ())] == \
        parts.size_bytes > 0


def test_a_late_event_recomputes_the_days_that_read_it(week):
    parts = week.runtime.parts
    # p-late's attempt starts before midnight on day 2 and reaches step 3 by then
    week.add([ev("payment.intent", day(2, 23.5), "p-late", "fd-1"),
              ev("payment.captured", day(2, 23.6), "p-late", "fd-1"),
              ev("wallet.credit", day(2, 23.7), "p-late", "fd-1", reason="deposit")])
    before = week.check(body(day(0), day(7), 7200))
    # its step 4 comes late, on day 3: day 2's kept attempts are no longer right
    week.add([ev("bet.placed", day(3, 0.5), "p-late", "fd-1")])
    hits, misses = parts.hits, parts.misses
    after = week.check(body(day(0), day(7), 7200))
    assert after["steps"][3]["count"] == before["steps"][3]["count"] + 1
    # day d's results read days d and d+1: days 2 and 3 are recomputed, the other five
    # come from the kept ones
    assert (parts.misses - misses, parts.hits - hits) == (2, 5)
    # an event of another brand changes none of a brand-filtered funnel's days (asked over
    # another range, which the answer cache does not hold)
    only = {"brand_id": "fd-2"}
    week.check(body(day(0), day(7), 7200, filters=only))
    week.add([ev("bet.placed", day(4, 2), "p-x", "fd-1")])
    hits, misses = parts.hits, parts.misses
    week.check(body(day(0, 12), day(7), 7200, filters=only))
    assert (parts.misses - misses, parts.hits - hits) == (0, 6)


def test_a_late_registration_changes_a_player_attribute_filter_on_every_day(week):
    """A device filter reads each player's registration, whatever its day: a late one
    moves the player's attempts in or out of the answer on days kept before it."""
    mobile = body(day(0), day(7), 3600, filters={"device": "mobile"})
    before = week.check(mobile)
    unregistered = sorted({e["player_id"] for e in SENT} - {
        e["player_id"] for e in SENT if e["event_type"] == "player.registered"
        and e["tenant_id"] == "fd-1"})
    assert unregistered
    week.add([ev("player.registered", iso(START - timedelta(days=2)), p, "fd-1",
                 device="mobile") for p in unregistered])
    after = week.check(mobile)
    assert after["total"] > before["total"]


def test_tokens_confined_to_other_brands_never_share_kept_days(week):
    one = bearer(week.client, week.settings.data_dir, brands="fd-1")
    two = bearer(week.client, week.settings.data_dir, brands="fd-2")
    ranged = body(day(0), day(7))
    first = week.check(ranged, one, ("fd-1",))
    second = week.check(ranged, two, ("fd-2",))
    assert first != second
    assert week.check(ranged, one, ("fd-1",)) == first
    week.check(ranged)


@on_duckdb_only("the players' hashes are DuckDB's (a ClickHouse store joins on the strings)")
def test_kept_days_are_not_used_once_a_hash_has_collided(week):
    """Once ``unit_hashes`` says two players met under a hash, a funnel whose days are all
    kept is answered from the events on the strings: the kept days (falsified here, to see
    whether they are read) are not."""
    ranged = body(day(0), day(7))
    right = week.check(ranged)
    parts = week.runtime.parts
    with parts._lock:
        for key, table in parts._items.items():
            parts._items[key] = table.slice(0, 0)  # every day: no attempts
    answers = week.runtime.answers._items  # the same data version: the answer cache holds it
    answers.clear()
    hits = parts.hits
    got = week.client.post(FUNNEL, json=ranged, headers=week.headers).json()
    assert parts.hits - hits == 7 and got["total"] == 0  # the falsified days are read
    week.runtime.backend.query("UPDATE unit_hashes SET collided = true WHERE player_id = 'p1'")
    answers.clear()
    assert_answer(week.client.post(FUNNEL, json=ranged, headers=week.headers), right)


def test_the_part_cache_is_bounded_in_bytes_least_recently_used_out_first():
    table = pa.table({"k": pa.array(range(1000), pa.uint64())})
    size = table.get_total_buffer_size()
    cache = PartCache(max_bytes=3 * size)
    for key in "abc":
        cache.put(key, table)
    assert cache.get("a") is table  # a is now the most recent
    cache.put("d", table)
    assert cache.get("b") is None and cache.get("a") is table and cache.get("d") is table
    assert cache.size_bytes == 3 * size
    cache.put("big", pa.table({"k": pa.array(range(4000), pa.uint64())}))  # > the cache: not kept
    assert cache.get("big") is None and cache.size_bytes == 3 * size
    cache.put("a", table.slice(0, 10))  # replaced: its bytes counted once
    assert cache.size_bytes <= 3 * size


def test_the_kept_rows_plan_per_day_gives_each_days_best_attempts(week):
    """The per-day statement directly: each (unit, day) once, its best attempt starting on
    that day, and the best of a unit's days is the whole range's answer."""
    f = funnel_.parse(body(day(0), day(7)))
    backend = week.runtime.backend
    c = funnel_.compile_kept(f, backend.dialect, ((f.start, f.end),))
    rows = backend.execute(c.tree, c.params)
    unit = [n for n in ("k", "tenant_id", "player_id") if n in rows.column_names]
    keys = list(zip(*(rows.column(n).to_pylist() for n in (*unit, "day")), strict=True))
    assert len(keys) == len(set(keys)) > 50
    first = (f.start.replace(tzinfo=None) - datetime(1970, 1, 1)).days
    assert {key[-1] for key in keys} == set(range(first, first + 7))
    whole = funnel_.answer(week.runtime.backend, f, kept_rows=True)
    by_days = funnel_.answer(week.runtime.backend, f, kept_rows=True, days=PartCache(),
                             version=week.runtime.ingest.versions.version)
    assert by_days == whole == {**whole, **cref.funnel(week.sent, body(day(0), day(7)))}



def test_a_funnels_etag_moves_with_the_events_it_reads_only(week):
    """A funnel reads the events of its range up to the end of the last attempt's window:
    an event after that leaves its ETag (and its cached answer) as they were; one inside
    moves them. With a device filter it reads every player's registration: any event moves
    it."""
    ranged = body(day(1), day(3), 3600, filters={"brand_id": "fd-1"})
    devices = {**ranged, "filters": {"brand_id": "fd-1", "device": "mobile"}}

    def tag(b: dict[str, Any]) -> str:
        r = week.client.post(FUNNEL, json=b, headers=week.headers)
        assert r.status_code == 200
        return r.headers["etag"]

    before, before_devices = tag(ranged), tag(devices)
    week.add([ev("bet.placed", day(4, 2), "p-after", "fd-1")])  # after to + window
    assert tag(ranged) == before and tag(devices) != before_devices
    week.add([ev("bet.placed", day(3, 0.5), "p-inside", "fd-1")])  # inside the last window
    assert tag(ranged) != before
    week.check(ranged)
