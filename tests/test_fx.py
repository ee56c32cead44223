"""FX rates and conversion (CONTRACT §5). Expected values are worked out by hand."""

from __future__ import annotations

from datetime import date

import pytest
from fastapi.testclient import TestClient

from tally.api.app import create_app
from tally.errors import Unprocessable
from tally.semantic.fx import FxRates
from tests.test_ingest_api import assert_problem

FX = "/v1/admin/fx-rates"
D1, D2, D3 = date(2025, 9, 1), date(2025, 9, 2), date(2025, 9, 3)


class MemoryStore:
    def __init__(self) -> None:
        self.rows: list[tuple[date, str, str]] = []

    def fx_rates(self):
        return list(self.rows)

    def add_fx_rates(self, rows):
        self.rows += rows


def rates(*rows: tuple[date, str, str]) -> FxRates:
    store = MemoryStore()
    store.rows = list(rows)
    return FxRates(store, "EUR")


def test_conversion_rounds_half_to_even_per_day_and_currency():
    fx = rates((D1, "GBP", "1.15"), (D1, "USD", "0.5"))
    assert fx.convert([(D1, "GBP", 1001)], "EUR") == 1151  # 1151.15
    assert fx.convert([(D1, "USD", 5)], "EUR") == 2  # 2.5 → 2
    assert fx.convert([(D1, "USD", 15)], "EUR") == 8  # 7.5 → 8
    assert fx.convert([(D1, "USD", -5)], "EUR") == -2  # -2.5 → -2
    # each (day, currency) sum is rounded, then the rounded sums are added
    assert fx.convert([(D1, "GBP", 1001), (D1, "EUR", 7), (D1, "GBP", 3)], "EUR") \
        == 1151 + 7 + 3  # 3 × 1.15 = 3.45 → 3


def test_minor_unit_exponents():
    fx = rates((D1, "JPY", "0.0061"), (D1, "KWD", "2.95"))
    assert fx.convert([(D1, "JPY", 12345)], "EUR") == 7530  # ¥12,345 = €75.3045
    assert fx.convert([(D1, "KWD", 1234)], "EUR") == 364  # 1.234 KWD = €3.6403
    assert fx.convert([(D1, "EUR", 100)], "JPY") == 164  # €1 = ¥163.93…


def test_cross_rates_for_a_non_base_reporting_currency():
    fx = rates((D1, "GBP", "1.15"), (D1, "USD", "0.92"))
    assert fx.convert([(D1, "GBP", 10_000)], "USD") == 12_500  # 10000 × 1.15 / 0.92


def test_missing_day_uses_the_latest_earlier_rate_and_none_is_422():
    fx = rates((D1, "GBP", "1.15"), (D3, "GBP", "1.20"))
    assert fx.convert([(D2, "GBP", 100)], "EUR") == 115
    assert fx.convert([(date(2025, 9, 9), "GBP", 100)], "EUR") == 120
    with pytest.raises(Unprocessable, match="GBP on or before 2025-08-31"):
        fx.convert([(date(2025, 8, 31), "GBP", 100)], "EUR")
    with pytest.raises(Unprocessable, match="no FX rate for BRL"):
        fx.convert([(D1, "BRL", 1)], "EUR")


def test_rates_are_append_only_through_the_api(client, headers):
    body = [{"date": "2025-09-01", "currency": "GBP", "rate": "1.15"},
            {"date": "2025-09-01", "currency": "USD", "rate": "0.92"}]
    assert client.post(FX, json=body, headers=headers).json() == {"inserted": 2, "unchanged": 0}
    same = [{"date": "2025-09-01", "currency": "GBP", "rate": "1.150"}]  # same value
    assert client.post(FX, json=same, headers=headers).json() == {"inserted": 0, "unchanged": 1}
    clash = [{"date": "2025-09-02", "currency": "GBP", "rate": "1.16"},
             {"date": "2025-09-01", "currency": "GBP", "rate": "1.16"}]
    problem = assert_problem(client.post(FX, json=clash, headers=headers), 409)
    assert problem["currency"] == "GBP" and problem["date"] == "2025-09-01"
    listed = client.get(FX, headers=headers).json()
    assert listed == {"base_currency": "EUR", "rates": [
        {"date": "2025-09-01", "currency": "GBP", "rate": "1.15"},
        {"date": "2025-09-01", "currency": "USD", "rate": "0.92"}]}  # nothing of the 409


def test_the_first_and_last_days_a_rate_may_be_for_are_stored_on_every_store(client,
                                                                            headers):
    """1900-01-01 and 2299-12-31: what ClickHouse's Date32 holds (a 0001-01-01 rate was a 500
    there and stored on DuckDB)."""
    body = [{"date": "1900-01-01", "currency": "GBP", "rate": "1.1"},
            {"date": "2299-12-31", "currency": "GBP", "rate": "1.2"}]
    assert client.post(FX, json=body, headers=headers).json() == {"inserted": 2, "unchanged": 0}
    assert client.get(FX, headers=headers).json()["rates"] == body


def test_rates_survive_a_restart(settings, client, headers):
    client.post(FX, json=[{"date": "2025-09-01", "currency": "GBP", "rate": "1.15"}],
                headers=headers)
    client.__exit__(None, None, None)
    with TestClient(create_app(settings)) as again:
        assert again.app.state.runtime.fx.convert([(D1, "GBP", 100)], "EUR") == 115


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ([{"date": "2025-09-01", "currency": "GBP", "rate": 1.15}], "decimal string"),
        ([{"date": "2025-09-01", "currency": "GBP", "rate": "-1"}], "must be > 0"),
        ([{"date": "2025-09-01", "currency": "GBP", "rate": "0"}], "must be > 0"),
        ([{"date": "2025-09-01", "currency": "GBP", "rate": "abc"}], "not a decimal"),
        ([{"date": "2025-09-01", "currency": "GBP", "rate": "NaN"}], "must be > 0"),
        ([{"date": "2025-09-01", "currency": "GBP", "rate": "1.0000000000001"}], "12 decimals"),
        ([{"date": "01/09/2025", "currency": "GBP", "rate": "1.1"}], "YYYY-MM-DD"),
        ([{"date": "0001-01-01", "currency": "GBP", "rate": "1.1"}], "from 1900-01-01"),
        ([{"date": "1899-12-31", "currency": "GBP", "rate": "1.1"}], "to 2299-12-31"),
        ([{"date": "2300-01-01", "currency": "GBP", "rate": "1.1"}], "from 1900-01-01"),
        ([{"date": "2025-09-01", "currency": "XYZ", "rate": "1.1"}], "ISO 4217"),
        ([{"date": "2025-09-01", "currency": "EUR", "rate": "1.1"}], "base currency"),
        ([{"date": "2025-09-01", "currency": "GBP", "rate": "1.1", "x": 1}], "unknown body field"),
        ({"date": "2025-09-01"}, "JSON array"),
    ],
)
def test_bad_rates_are_400(client, headers, body, detail):
    problem = assert_problem(client.post(FX, json=body, headers=headers), 400)
    assert detail in problem["detail"]
    assert client.get(FX, headers=headers).json()["rates"] == []


def test_fx_routes_need_admin(client, auth):
    reader = auth(scopes="analytics:read")
    assert_problem(client.get(FX, headers=reader), 403)
    assert_problem(client.post(FX, json=[], headers=reader), 403)
