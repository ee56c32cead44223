"""ETags from data versions, the answer cache, and the watermark (CONTRACT §4)."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tally.api.app import create_app
from tally.config import Settings
from tests.conftest import bearer, make_event
from tests.test_ingest_api import app_with

TS = "/v1/analytics/timeseries"
Q = {"metric": "ggr", "granularity": "1h", "from": "2025-10-23T00:00:00Z",
     "to": "2025-10-24T00:00:00Z", "filters": "brand_id:brand-7"}


def bet(**overrides):
    return make_event(**overrides)


def ingest(client, headers, *events):
    r = client.post("/v1/events:batch", json=list(events), headers=headers)
    assert r.status_code == 202 and r.json()["accepted"] == len(events)


def etag(client, headers, **params) -> str:
    r = client.get(TS, params={**Q, **params}, headers=headers)
    assert r.status_code == 200, r.text
    return r.headers["etag"]


def test_an_event_elsewhere_keeps_the_etag_one_in_range_changes_it(client, headers):
    ingest(client, headers, bet(occurred_at="2025-10-23T05:00:00Z"))
    first = etag(client, headers)
    ingest(client, headers, bet(occurred_at="2025-10-23T06:00:00Z", tenant_id="brand-8"),
           bet(occurred_at="2025-10-25T06:00:00Z"))  # other brand; other day
    assert etag(client, headers) == first
    r = client.get(TS, params=Q, headers={**headers, "If-None-Match": first})
    assert r.status_code == 304 and r.content == b""
    ingest(client, headers, bet(occurred_at="2025-10-23T07:00:00Z"))  # late, in range
    assert etag(client, headers) != first


def test_a_new_fx_rate_changes_money_answers(client, headers):
    ingest(client, headers, bet(occurred_at="2025-10-23T05:00:00Z"))
    first = etag(client, headers)
    r = client.post("/v1/admin/fx-rates", headers=headers,
                    json=[{"date": "2025-10-01", "currency": "GBP", "rate": "1.15"}])
    assert r.status_code == 200
    assert etag(client, headers) != first


def test_repeats_are_served_from_the_answer_cache(client, headers):
    ingest(client, headers, bet(occurred_at="2025-10-23T05:00:00Z"))
    cache = client.app.state.runtime.answers  # type: ignore[attr-defined]
    first = client.get(TS, params=Q, headers=headers)
    hits = cache.hits
    again = client.get(TS, params=Q, headers=headers)
    assert cache.hits == hits + 1 and again.content == first.content


def test_etags_are_stable_across_a_restart(settings: Settings, client, headers):
    ingest(client, headers, bet(occurred_at="2025-10-23T05:00:00Z"))
    before = etag(client, headers)
    client.__exit__(None, None, None)
    with TestClient(create_app(settings)) as again:
        assert etag(again, headers) == before


def test_watermark_is_per_brand_scope_and_less_the_lateness(tmp_path):
    with app_with(tmp_path, allowed_lateness=60) as (client, writer):
        ingest(client, writer, bet(occurred_at="2025-10-23T05:00:00Z"),
               bet(occurred_at="2025-10-23T09:30:00Z", tenant_id="brand-8"))
        limited = bearer(client, tmp_path / "d", "analytics:read", brands="brand-7")
        q = {**Q, "filters": ""}
        own = client.get(TS, params=q, headers=limited).headers["x-data-watermark"]
        assert own == "2025-10-23T04:59:00.000000Z"  # brand-7 only, less 60 s
        everyone = client.get(TS, params=q, headers=writer)
        assert everyone.status_code == 403  # the writer has no analytics:read
