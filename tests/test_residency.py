"""Residency (CONTRACT §6): regions this deployment does not serve are refused — ``421`` with
a link to the region's deployment when ``TALLY_REGION_ENDPOINTS`` names one, else ``403`` —
and events for them are rejected one by one, stored nowhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from tally.config import Settings
from tests.conftest import make_event
from tests.test_ingest_api import assert_problem

UK, NA = "https://uk.tally.example", "https://na.tally.example"
TS = "/v1/analytics/timeseries"
SLICE = "/v1/analytics/slice"
RANGE = {"from": "2025-10-01", "to": "2025-10-03"}


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    # this is the EU deployment; the fleet shares one endpoint list (its own entry is ignored)
    return Settings(data_dir=tmp_path / "data", regions="EU,LATAM",
                    region_endpoints=f"EU=https://eu.tally.example,UK={UK},NA={NA}/")


def series(client, headers, filters: str):
    return client.get(TS, headers=headers, params={"metric": "ggr", "granularity": "1d",
                                                   "filters": filters, **RANGE})


def test_a_served_region_is_answered(client, headers):
    assert series(client, headers, "region:EU").status_code == 200


@pytest.mark.parametrize("filters", ["region:UK", "region:EU,region:UK", "region:UK,region:NA"])
def test_a_region_served_elsewhere_is_421_with_a_link_to_its_deployment(client, headers,
                                                                        filters):
    r = series(client, headers, filters)
    body = assert_problem(r, 421)
    named = [f.split(":")[1] for f in filters.split(",") if f.split(":")[1] not in ("EU",)]
    expected = {"UK": UK, "NA": NA}
    assert body["endpoints"] == {region: expected[region] for region in named}
    assert body["claim"] == "served regions"
    assert r.headers["link"] == ", ".join(
        f'<{expected[region]}>; rel="alternate"; title="{region}"' for region in named)
    assert UK in body["detail"]


@pytest.mark.parametrize("filters", ["region:APAC", "region:UK,region:APAC"])
def test_a_region_served_nowhere_known_is_403(client, headers, filters):
    r = series(client, headers, filters)
    body = assert_problem(r, 403)
    assert "'APAC'" in body["detail"] and body["claim"] == "served regions"
    assert "link" not in r.headers


def test_slice_is_held_to_the_same_rule(client, headers):
    r = client.get(SLICE, headers=headers, params={"metric": "ggr", "dim": "brand_id",
                                                   "filters": "region:NA", **RANGE})
    assert assert_problem(r, 421)["endpoints"] == {"NA": NA}


def test_a_client_whose_regions_are_all_elsewhere_is_pointed_there(client, auth):
    headers = auth(scopes="analytics:read", regions="UK")
    r = series(client, headers, "")
    assert assert_problem(r, 421)["endpoints"] == {"UK": UK}
    # one of its regions is served here: an unfiltered query reads just that one
    assert series(client, auth(scopes="analytics:read", regions="UK,EU"), "").status_code == 200


def test_client_limits_come_before_residency(client, auth):
    # not redirected to a deployment where the answer would be 403 anyway
    r = series(client, auth(scopes="analytics:read", regions="EU"), "region:UK")
    assert assert_problem(r, 403)["claim"] == "regions"


def test_events_for_other_regions_are_rejected_one_by_one_naming_the_endpoint(client,
                                                                              headers):
    batch = [make_event(region="EU"), make_event(region="UK", player_id="p_canary_uk"),
             make_event(region="APAC", player_id="p_canary_apac")]
    r = client.post("/v1/events:batch", headers=headers, json=batch)
    assert r.status_code == 202
    receipt = r.json()
    assert receipt["accepted"] == 1 and receipt["rejected"] == 2
    uk, apac = receipt["errors"]
    assert uk["index"] == 1 and f"send it to {UK}" in uk["detail"]
    assert apac["index"] == 2 and "not served" in apac["detail"] and "send it" not in \
        apac["detail"]
    quarantine = client.get("/v1/admin/quarantine", headers=headers)
    assert "p_canary" not in quarantine.text  # residency refusals keep no data
    assert [i["event"] for i in quarantine.json()["items"]] == [
        {"event_id": batch[1]["event_id"], "redacted": True},
        {"event_id": batch[2]["event_id"], "redacted": True}]


def test_a_batch_entirely_for_another_region_is_still_a_receipt(client, headers):
    batch = [make_event(region="UK") for _ in range(3)]
    r = client.post("/v1/events:batch", headers=headers, json=batch)
    assert r.status_code == 202 and r.json()["rejected"] == 3 and r.json()["accepted"] == 0


@pytest.mark.parametrize("value", ["UK", "UK=ftp://uk.example", "UK=https://a,UK=https://b",
                                   "=https://x"])
def test_bad_region_endpoints_are_a_configuration_error(value):
    with pytest.raises(ValueError, match="TALLY_REGION_ENDPOINTS"):
        Settings(region_endpoints=value)
