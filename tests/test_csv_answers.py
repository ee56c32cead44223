"""``Accept: text/csv`` on timeseries and slice (CONTRACT §8): the JSON answer's rows, as RFC
4180 CSV, confined, validated and paginated exactly like it."""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from datetime import datetime
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
from fastapi.testclient import TestClient

from tests.cells import player_day
from tests.conftest import TokenFactory, make_event
from tests.test_privacy import _bearer_with_min_group

TS, SLICE, BATCH = "/v1/analytics/timeseries", "/v1/analytics/slice", "/v1/events:batch"
CSV = {"Accept": "text/csv"}
DAY = "2025-10-23"
# a game id a spreadsheet must not split: a comma, quotes, a line break
AWKWARD = 'g,"odd"\nname'
GAMES = ("g_01", "g_02", "g_03", AWKWARD)


def _events() -> list[dict[str, Any]]:
    events = []
    for i in range(60):
        brand = "brand-a" if i % 3 else "brand-b"
        events.append(make_event(
            tenant_id=brand, player_id=f"p{i % 7}" if i % 3 else f"q{i % 2}",
            occurred_at=f"{DAY}T{i % 24:02d}:05:00Z",
            payload={"bet_id": f"b{i}", "stake_minor": 1000 + 37 * i, "win_minor": 11 * i,
                     "currency": "EUR", "game_id": GAMES[i % 4], "provider_id": "studio_x"}))
    return events


@pytest.fixture
def stored(client: TestClient, headers: dict[str, str]) -> list[dict[str, Any]]:
    events = _events()
    r = client.post(BATCH, content=json.dumps(events),
                    headers={**headers, "Content-Type": "application/json"})
    assert r.status_code == 202 and r.json()["accepted"] == len(events), r.text
    return events


def parsed(text: str) -> tuple[list[str], list[dict[str, str]]]:
    rows = list(csv.reader(io.StringIO(text, newline="")))
    return rows[0], [dict(zip(rows[0], row, strict=True)) for row in rows[1:]]


def as_field(value: Any) -> str:
    """A JSON value as the CSV writes it (null empty, booleans lower case)."""
    return "" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def ts_params(**extra: str) -> dict[str, str]:
    return {"metric": "ggr", "granularity": "1h", "from": f"{DAY}T00:00:00Z",
            "to": f"{DAY}T00:00:00Z".replace("23T", "24T"), **extra}


def test_a_timeseries_in_csv_holds_the_json_rows(client, headers, stored):
    params = ts_params(group_by="brand_id", currency="EUR")
    js = client.get(TS, params=params, headers=headers)
    r = client.get(TS, params=params, headers={**headers, **CSV})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/csv")
    assert r.headers["content-disposition"] == 'inline; filename="ggr-1h-EUR.csv"'
    assert r.text.endswith("\r\n") and "\r\n" in r.text  # RFC 4180 line ends
    columns, rows = parsed(r.text)
    assert columns == ["ts", "brand_id", "value_minor"]
    series = js.json()["series"]
    assert rows == [{c: as_field(p.get(c)) for c in columns} for p in series]
    # and the money, counted from the events themselves: GGR = stakes - wins, minor units
    ggr: dict[tuple[str, str], int] = defaultdict(int)
    for e in stored:
        ggr[(e["occurred_at"][:13], e["tenant_id"])] += (e["payload"]["stake_minor"]
                                                         - e["payload"]["win_minor"])
    assert {(row["ts"][:13], row["brand_id"]): int(row["value_minor"]) for row in rows
            if int(row["value_minor"])} == dict(ggr)
    # money stays integer minor units when read by a typed CSV reader too
    table = pacsv.read_csv(io.BytesIO(r.content))
    assert table.schema.field("value_minor").type == pa.int64()


def test_a_slice_in_csv_pages_like_the_json_and_quotes_what_it_must(client, headers, stored):
    params = {"metric": "ggr", "dim": "game_id", "from": DAY, "to": "2025-10-24", "limit": "3"}
    first = client.get(SLICE, params=params, headers={**headers, **CSV})
    assert first.status_code == 200, first.text
    columns, rows = parsed(first.text)
    assert columns == ["game_id", "value_minor"]
    js = client.get(SLICE, params=params, headers=headers).json()
    assert rows == [{c: as_field(item.get(c)) for c in columns} for item in js["items"]]
    # the next page: the same request with the JSON's cursor, in the Link header
    link = first.headers["link"]
    assert link.startswith(f"<{SLICE}?") and link.endswith('>; rel="next"')
    url = link[1:link.index(">")]
    second = client.get(url, headers={**headers, **CSV})
    nxt = client.get(SLICE, params={**params, "cursor": js["next_cursor"]}, headers=headers)
    assert parsed(second.text)[1] == [{c: as_field(i.get(c)) for c in columns}
                                      for i in nxt.json()["items"]]
    assert "link" not in second.headers  # the last page
    every = rows + parsed(second.text)[1]
    assert sorted(row["game_id"] for row in every) == sorted(GAMES)  # the awkward id intact


def test_each_representation_has_its_own_validator(client, headers, stored):
    params = ts_params()
    js = client.get(TS, params=params, headers=headers)
    cs = client.get(TS, params=params, headers={**headers, **CSV})
    assert js.headers["etag"] != cs.headers["etag"]
    assert "Accept" in cs.headers["vary"] and "Accept" in js.headers["vary"]
    again = client.get(TS, params=params,
                       headers={**headers, **CSV, "If-None-Match": cs.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    # the JSON's tag does not validate the CSV (and the other way round)
    crossed = client.get(TS, params=params,
                         headers={**headers, **CSV, "If-None-Match": js.headers["etag"]})
    assert crossed.status_code == 200 and crossed.headers["content-type"].startswith("text/csv")
    # a late event for the range changes both
    late = make_event(tenant_id="brand-a", occurred_at=f"{DAY}T05:30:00Z")
    client.post(BATCH, content=json.dumps([late]),
                headers={**headers, "Content-Type": "application/json"})
    fresh = client.get(TS, params=params,
                       headers={**headers, **CSV, "If-None-Match": cs.headers["etag"]})
    assert fresh.status_code == 200 and fresh.headers["etag"] != cs.headers["etag"]


@pytest.mark.parametrize(("accept", "csv_wanted"), [
    ("text/csv", True),
    ("text/*", True),
    ("text/csv, application/json;q=0.9", True),
    ("application/json;q=0.4, text/csv;q=0.5", True),
    ("text/csv;q=0.5, application/json", False),
    ("text/csv, application/json", False),  # a tie: JSON
    ("*/*", False),
    ("text/csv;q=0", None),  # neither allowed: 406
    ("text/csv;q=oops", None),
    ("application/xml", None),
])
def test_the_representation_follows_the_accept_weights(client, headers, stored, accept,
                                                       csv_wanted):
    r = client.get(TS, params=ts_params(), headers={**headers, "Accept": accept})
    if csv_wanted is None:
        assert r.status_code == 406, r.text
        assert r.json()["available"] == ["application/json", "text/csv"]
        return
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/csv" if csv_wanted else
                                                "application/json")


def test_csv_answers_are_confined_like_json(client, auth: TokenFactory, stored):
    only_a = auth(scopes="analytics:read", brands="brand-a")
    params = {"metric": "bets", "dim": "brand_id", "from": DAY, "to": "2025-10-24"}
    r = client.get(SLICE, params=params, headers={**only_a, **CSV})
    _, rows = parsed(r.text)
    assert rows == [{"brand_id": "brand-a",
                     "value": str(sum(1 for e in stored if e["tenant_id"] == "brand-a"))}]
    other = client.get(TS, params=ts_params(filters="brand_id:brand-b"),
                       headers={**only_a, **CSV})
    assert other.status_code == 403
    assert other.headers["content-type"] == "application/problem+json"


def test_withheld_cells_are_flagged_in_a_column(client, headers):
    players = {"brand-a": 6, "brand-b": 2}  # active players on the day; the minimum is 5
    events = [e for brand, n in players.items() for i in range(n)
              for e in player_day(brand, "EU", f"{brand}-p{i}", datetime(2025, 10, 23, 1))]
    r = client.post(BATCH, content=json.dumps(events),
                    headers={**headers, "Content-Type": "application/json"})
    assert r.status_code == 202 and r.json()["rejected"] == 0, r.text
    guarded = _bearer_with_min_group(client, 5)
    params = ts_params(metric="dau", granularity="1d", group_by="brand_id")
    r = client.get(TS, params=params, headers={**guarded, **CSV})
    assert r.status_code == 200, r.text
    columns, rows = parsed(r.text)
    assert columns == ["ts", "brand_id", "value", "suppressed"]
    assert [(row["brand_id"], row["value"], row["suppressed"]) for row in rows] == [
        ("brand-a", "6", ""), ("brand-b", "", "true")]


def test_a_bad_query_is_a_problem_whatever_was_accepted(client, headers):
    r = client.get(TS, params=ts_params(metric="nope"), headers={**headers, **CSV})
    assert r.status_code in (400, 422), r.text
    assert r.headers["content-type"] == "application/problem+json"
