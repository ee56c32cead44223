"""The metric catalog and GET /v1/metrics (CONTRACT §5)."""

from __future__ import annotations

from tally.semantic.catalog import DIMENSIONS, MEASURES, METRICS, Kind, Unit
from tests.test_ingest_api import assert_problem

CONTRACT = {
    "stake": "money", "wins": "money", "ggr": "money", "ngr": "money", "rtp": "ratio",
    "bets": "count", "deposits": "money", "deposits_count": "count",
    "deposits_success": "ratio", "settle_lag_p95": "seconds", "webhook_lag_p95": "seconds",
    "dau": "count", "wau": "count", "mau": "count",
}


def test_every_contract_metric_with_its_unit():
    assert {name: m.unit.value for name, m in METRICS.items()} == CONTRACT


def test_definitions_are_built_from_declared_measures():
    assert [(s, m.name) for s, m in zip((t[0] for t in METRICS["ngr"].terms),
                                        METRICS["ngr"].measures, strict=True)] == [
        (1, "stake_sum"), (-1, "win_sum"), (-1, "bonus_consumed_sum"), (-1, "jackpot_sum"),
        (-1, "commission_sum")]
    for metric in METRICS.values():
        for _, measure in metric.terms:
            assert measure in MEASURES
        assert set(metric.dimensions) <= set(DIMENSIONS)
        if metric.unit is Unit.MONEY:
            assert all(m.money for m in metric.measures)
        if metric.kind is Kind.RATIO:
            assert len(metric.terms) == 2


def test_a_metric_is_only_sliced_by_what_all_its_events_carry():
    # bonus.consumed has no game: NGR cannot be split by game or provider
    assert "game_id" not in METRICS["ngr"].dimensions
    assert "method" in METRICS["deposits_success"].dimensions
    assert METRICS["wau"].granularities == ("1d",) and METRICS["mau"].window_days == 30


def test_metrics_endpoint_renders_the_catalog(client, headers):
    body = client.get("/v1/metrics", headers=headers).json()
    served = {m["name"]: m for m in body["metrics"]}
    assert {name: m["unit"] for name, m in served.items()} == CONTRACT
    assert served["ggr"]["answer_field"] == "value_minor"
    assert served["rtp"]["answer_field"] == "value"
    assert served["settle_lag_p95"]["percentile_method"] == "nearest-rank"
    assert "stake − wins" in served["ggr"]["definition"]
    assert body["base_currency"] == "EUR"
    assert {d["name"] for d in body["dimensions"]} == {
        "brand_id", "region", "provider_id", "game_id", "method", "currency", "device", "geo"}


def test_metrics_endpoint_lists_only_the_token_metrics(client, auth):
    limited = auth(scopes="analytics:read", metrics="ggr,ngr")
    names = [m["name"] for m in client.get("/v1/metrics", headers=limited).json()["metrics"]]
    assert names == ["ggr", "ngr"]
    assert_problem(client.get("/v1/metrics", headers=auth(scopes="events:write")), 403)
