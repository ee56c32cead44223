"""Privacy (security issue, item 7): no player id in any aggregate answer, a per-client minimum
group size for distinct-player numbers, keyed pseudonymisation of ``player_id`` at ingest."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pydantic
import pytest
from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient

from tally import metadata
from tally.api.app import create_app
from tally.config import Settings
from tally.security.clients import authenticate, create_client
from tally.semantic.catalog import METRICS
from tests.cells import player_day
from tests.conftest import bearer, on_duckdb_only
from tests.stores import rows as stored_rows
from tests.stores import stored as stored_store

DAY = datetime(2025, 10, 23, 9)
FROM, TO = "2025-10-23", "2025-10-25"
TS, SLICE = "/v1/analytics/timeseries", "/v1/analytics/slice"
ROOT = Path(__file__).resolve().parents[1]


def post(client: TestClient, headers: dict[str, str], events: list[dict[str, Any]]) -> dict:
    r = client.post("/v1/events:batch", json=events, headers=headers)
    assert r.status_code == 202, r.text
    return r.json()


# --------------------------------------------------------------------------- canaries

CANARY = "canary7f3a9c"  # in every id of the canary players: player, session, bet, payment


def canary_requests() -> list[tuple[str, str, dict[str, Any]]]:
    """(method, path, params or JSON body): every aggregate route, every metric and dim."""
    requests: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", "/v1/metrics", {}), ("GET", "/v1/schemas", {}), ("GET", "/metrics", {}),
        ("GET", "/healthz", {}), ("GET", "/readyz", {}),
    ]
    for name, metric in METRICS.items():
        for group_by in ("", *metric.dimensions):
            requests.append(("GET", TS, {"metric": name, "granularity": "1d", "from": FROM,
                                         "to": TO, "group_by": group_by}))
        for dim in metric.dimensions:
            requests.append(("GET", SLICE, {"metric": name, "dim": dim, "from": FROM,
                                            "to": TO}))
    for correlate_by in ("player_id", "payment_id"):
        requests.append(("POST", "/v1/analytics/funnel", {
            "steps": [{"event": "payment.intent"}, {"event": "payment.captured"}],
            "window_sec": 3600, "from": FROM, "to": TO, "correlate_by": correlate_by}))
    for cohort in ("first_deposit", "registration"):
        requests.append(("POST", "/v1/analytics/retention", {
            "cohort": cohort, "start_date": "2025-10-23", "end_date": "2025-10-23",
            "return_event": "bet.placed", "days": [1, 7]}))
    for metric_name in ("ggr", "ngr"):
        requests.append(("GET", "/v1/analytics/ltv", {
            "cohort": "first_deposit", "currency": "EUR", "horizon": "7d",
            "metric": metric_name, "start_date": "2025-10-23", "end_date": "2025-10-23"}))
    return requests


# Raw data for operators, not aggregates: they answer stored events and are admin-only.
RAW_ROUTES = {"/v1/admin/quarantine", "/v1/events:batch"}


def test_every_aggregate_route_is_asked_by_the_canary_test():
    app = create_app(Settings())
    asked = {path for _, path, _ in canary_requests()}
    analytic = {ctx.path for ctx in iter_route_contexts(app.routes)
                if (ctx.path or "").startswith("/v1/analytics/")}
    assert analytic - asked == set(), "add a canary request for every aggregate route"


@pytest.fixture
def canaries(client, headers) -> None:
    events = []
    for i in range(3):
        events += player_day("b1", "EU", f"{CANARY}-player-{i}", DAY + timedelta(hours=i),
                             bets=2, tag=f"{CANARY}-{i}")
    events += player_day("b2", "UK", "ordinary-player", DAY)
    receipt = post(client, headers, events)
    assert receipt["accepted"] == len(events)


def test_no_canary_id_in_any_aggregate_answer(client, headers, canaries):
    answered = 0
    for method, path, args in canary_requests():
        if method == "GET":
            r = client.get(path, params={k: v for k, v in args.items() if v}, headers=headers)
        else:
            r = client.post(path, json=args, headers=headers)
        window = METRICS.get(args.get("metric", ""))
        if path == SLICE and window is not None and window.window_days > 1:
            assert r.status_code == 400  # trailing windows are timeseries-only
        else:
            assert r.status_code == 200, (path, args, r.text[:300])
            answered += 1
        text = r.text + json.dumps(dict(r.headers))
        assert CANARY not in text, (path, args)
    assert answered >= 100
    # the canaries are there to be found: the admin's raw quarantine is not an aggregate
    raw = client.get("/v1/admin/quarantine", headers=headers)
    assert raw.status_code == 200


# --------------------------------------------------------------------------- min group size


def group(brand: str, region: str, players: int, start: datetime = DAY) -> list[dict[str, Any]]:
    return [e for i in range(players)
            for e in player_day(brand, region, f"p-{brand}-{region}-{i}", start)]


@pytest.fixture
def small_groups(client, headers) -> None:
    """dau on 23 Oct: b1/EU 3, b2/EU 6, b2/UK 2, b1/LATAM 1 (nobody on 24 Oct)."""
    events = (group("b1", "EU", 3) + group("b2", "EU", 6) + group("b2", "UK", 2)
              + group("b1", "LATAM", 1))
    post(client, headers, events)


def test_distinct_player_cells_below_the_minimum_are_null_and_flagged(client, auth,
                                                                      small_groups):
    everyone = auth(scopes="analytics:read")
    guarded = _bearer_with_min_group(client, 5)
    params = {"metric": "dau", "granularity": "1d", "from": FROM, "to": TO,
              "group_by": "brand_id,region"}
    plain = client.get(TS, params=params, headers=everyone).json()["series"]
    shown = client.get(TS, params=params, headers=guarded).json()["series"]
    real = {(p["ts"][:10], p["brand_id"], p["region"]): p["value"] for p in plain}
    assert real[("2025-10-23", "b2", "UK")] == 2 and real[("2025-10-24", "b2", "UK")] == 0
    for point in shown:
        value = real[(point["ts"][:10], point["brand_id"], point["region"])]
        if 0 < value < 5:
            assert point["value"] is None and point["suppressed"] is True, point
        else:
            assert point["value"] == value and "suppressed" not in point, point
    assert sum(1 for p in shown if p.get("suppressed")) == 3


COHORT_REQUESTS = [
    ("POST", "/v1/analytics/funnel", lambda brand: {
        "steps": [{"event": "payment.intent"}, {"event": "payment.captured"},
                  {"event": "wallet.credit", "reason": "deposit"}],
        "window_sec": 3600, "from": FROM, "to": TO, "filters": {"brand_id": brand}}),
    ("POST", "/v1/analytics/retention", lambda brand: {
        "cohort": "first_deposit", "start_date": FROM, "end_date": FROM, "days": [0, 1],
        "filters": {"brand_id": brand}}),
    ("GET", "/v1/analytics/ltv", lambda brand: {
        "cohort": "first_deposit", "start_date": FROM, "end_date": FROM, "horizon": "2d",
        "filters": f"brand_id:{brand}"}),
]


@pytest.mark.parametrize(("method", "path", "body"), COHORT_REQUESTS)
def test_cohort_counts_below_the_minimum_are_withheld(client, auth, small_groups, method,
                                                      path, body):
    """b1 has 3 players (below 5: every count, rate, median, share and per-member value is
    withheld), b2 has 8 (shown exactly as to a client without a minimum)."""
    everyone = auth(scopes="analytics:read")
    guarded = _bearer_with_min_group(client, 5)

    def ask(headers: dict[str, str], brand: str) -> dict[str, Any]:
        args = body(brand)
        r = (client.post(path, json=args, headers=headers) if method == "POST"
             else client.get(path, params=args, headers=headers))
        assert r.status_code == 200, r.text
        return dict(r.json())

    assert ask(guarded, "b2") == ask(everyone, "b2")
    small, plain = ask(guarded, "b1"), ask(everyone, "b1")
    assert small != plain
    text = json.dumps(small)
    assert not re.search(r": (3|0\.333\d*)[,}\]]", text), text  # b1's size, a share of it
    assert '"suppressed": true' in text
    withheld = small.get("steps") or small.get("rows") or small.get("cohorts")
    assert withheld and all(item.get("suppressed") for item in withheld)


def _bearer_with_min_group(client: TestClient, k: int,
                           scopes: str = "analytics:read") -> dict[str, str]:
    settings = client.app.state.runtime.settings
    con = metadata.connect(settings.data_dir)
    client_id, secret = create_client(con, "guarded", scopes, min_group_size=k)
    con.close()
    r = client.post("/oauth/token", auth=(client_id, secret),
                    data={"grant_type": "client_credentials"})
    assert r.status_code == 200
    claims = json.loads(base64.urlsafe_b64decode(
        r.json()["access_token"].split(".")[1] + "=="))
    assert claims["min_group_size"] == k  # carried in the token
    return {"Authorization": f"Bearer {r.json()['access_token']}"}


@pytest.mark.parametrize("metric", ["wau", "mau"])
def test_trailing_windows_are_suppressed_too(client, small_groups, metric):
    guarded = _bearer_with_min_group(client, 5)
    r = client.get(TS, headers=guarded, params={
        "metric": metric, "granularity": "1d", "from": FROM, "to": TO, "group_by": "brand_id"})
    by_brand = {(p["ts"][:10], p["brand_id"]): p for p in r.json()["series"]}
    assert by_brand[("2025-10-23", "b1")] == {"ts": "2025-10-23T00:00:00Z", "brand_id": "b1",
                                              "value": None, "suppressed": True}  # 4 players
    assert by_brand[("2025-10-24", "b2")]["value"] == 8  # still in the window: shown


def test_slice_puts_withheld_keys_last_in_key_order_not_value_order(client, small_groups):
    """LATAM (1) and UK (2) are both withheld: their order must not tell which is bigger."""
    guarded = _bearer_with_min_group(client, 5)
    for order in ("-value", "value"):
        r = client.get(SLICE, headers=guarded, params={
            "metric": "dau", "dim": "region", "from": FROM, "to": TO, "order": order})
        assert r.json()["items"] == [
            {"region": "EU", "value": 9},
            {"region": "LATAM", "value": None, "suppressed": True},
            {"region": "UK", "value": None, "suppressed": True},
        ]


def test_other_metrics_and_other_clients_are_not_suppressed(client, auth, small_groups):
    guarded = _bearer_with_min_group(client, 5)
    everyone = auth(scopes="analytics:read")
    params = {"metric": "bets", "dim": "region", "from": FROM, "to": TO}
    assert client.get(SLICE, params=params, headers=guarded).json()["items"][-1] == {
        "region": "LATAM", "value": 1}
    # same query, same data: the guarded answer (cached first) is not served to the other
    params = {"metric": "dau", "dim": "region", "from": FROM, "to": TO}
    first = client.get(SLICE, params=params, headers=guarded)
    second = client.get(SLICE, params=params, headers=everyone)
    assert first.headers["etag"] != second.headers["etag"]
    assert {i["region"]: i["value"] for i in second.json()["items"]} == {
        "EU": 9, "UK": 2, "LATAM": 1}


def test_cli_min_group_size_reaches_the_client(tmp_path):
    data = tmp_path / "data"
    tally = [sys.executable, "-m", "tally.cli"]
    out = subprocess.run([*tally, "client", "create", "--name", "bi", "--scopes",
                          "analytics:read", "--min-group-size", "10", "--data-dir", str(data)],
                         capture_output=True, text=True, check=True)
    created = json.loads(out.stdout)
    con = metadata.connect(data)
    found = authenticate(con, created["client_id"], created["client_secret"])
    assert found is not None and found.min_group_size == 10
    bad = subprocess.run([*tally, "client", "create", "--name", "bi", "--scopes",
                          "analytics:read", "--min-group-size", "0", "--data-dir", str(data)],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and bad.stdout == ""
    assert len(bad.stderr.strip().splitlines()) == 1 and "min group size" in bad.stderr


OLD_CLIENTS = """CREATE TABLE clients (client_id TEXT PRIMARY KEY, name TEXT NOT NULL,
  secret_salt BLOB NOT NULL, secret_hash BLOB NOT NULL, scopes TEXT NOT NULL, brands TEXT,
  regions TEXT, metrics TEXT, created_at TEXT NOT NULL, disabled INTEGER NOT NULL DEFAULT 0)"""


def test_a_store_from_before_min_group_size_is_migrated_on_open(tmp_path):
    path = tmp_path / "meta.sqlite3"
    old = sqlite3.connect(path)
    old.execute(OLD_CLIENTS)
    salt, secret = b"s" * 16, "old-secret"
    old.execute("INSERT INTO clients VALUES ('cl_old', 'old', ?, ?, 'analytics:read', 'b1',"
                " NULL, NULL, '2025-01-01', 0)", (salt, hashlib.sha256(salt + b"old-secret")
                                                 .digest()))
    old.commit()
    old.close()
    for _ in range(2):  # opening again is a no-op
        con = metadata.connect(tmp_path)
        columns = [row[1] for row in con.execute("PRAGMA table_info(clients)")]
        assert columns.count("min_group_size") == 1
        con.close()
    con = metadata.connect(tmp_path)
    old_client = authenticate(con, "cl_old", secret)
    assert old_client is not None and old_client.min_group_size is None
    assert old_client.brands == frozenset({"b1"})


# --------------------------------------------------------------------------- pseudonymisation

KEY = "k" * 24 + "-master-key-0123"  # 40 bytes


def expected_pseudonym(key: bytes, tenant: str, player: str) -> str:
    """RFC 5869 HKDF-SHA256 (no salt) written out here, then HMAC-SHA256, base64url, 22."""
    prk = hmac.new(b"\0" * 32, key, hashlib.sha256).digest()
    info = b"tally/player_id-pseudonym/v1/" + tenant.encode()
    tenant_key = hmac.new(prk, info + b"\x01", hashlib.sha256).digest()
    mac = hmac.new(tenant_key, player.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).decode()[:22]


def _stream() -> list[dict[str, Any]]:
    events = group("b1", "EU", 4) + group("b2", "UK", 3)
    events += player_day("b1", "EU", "p-shared", DAY) + player_day("b2", "EU", "p-shared", DAY)
    events += player_day("b1", "EU", "p-b1-EU-0", DAY + timedelta(days=1))  # returns
    return events


def keyed_settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "keyed", regions="EU,UK",
                    pseudonymise_key=pydantic.SecretStr(KEY))


@pytest.fixture(params=["brand", "deployment"])
def two_stores(request, tmp_path) -> Iterator[tuple[TestClient, TestClient, str]]:
    """The same stream into a store with the key (scope: per brand, or one for all) and one
    without it."""
    keyed = keyed_settings(tmp_path).model_copy(update={"pseudonymise_scope": request.param})
    plain = Settings(data_dir=tmp_path / "plain", regions="EU,UK")
    with TestClient(create_app(keyed), raise_server_exceptions=False) as a, \
            TestClient(create_app(plain), raise_server_exceptions=False) as b:
        yield a, b, request.param


def test_stored_player_ids_are_the_keyed_pseudonyms(tmp_path, caplog):
    settings = keyed_settings(tmp_path)
    data_dir = settings.data_dir
    events = _stream()
    bad = player_day("b1", "EU", "p-raw-quarantined", DAY, tag="q")[3]
    bad["payload"]["currency"] = "XXQ"  # rejected: kept in the quarantine
    with caplog.at_level(logging.DEBUG), \
            TestClient(create_app(settings), raise_server_exceptions=False) as keyed:
        headers = bearer(keyed, data_dir)
        receipt = post(keyed, headers, [*events, bad])
        listing = keyed.get("/v1/admin/quarantine", headers=headers).json()["items"]
    assert receipt["accepted"] == len(events) and receipt["rejected"] == 1
    assert listing[0]["event"]["player_id"] == expected_pseudonym(KEY.encode(), "b1",
                                                                  "p-raw-quarantined")
    raw_ids = {e["player_id"] for e in events} | {"p-raw-quarantined"}
    assert caplog.records  # the app logged (access lines), just never a raw id
    assert not [r for r in caplog.records
                if any(p in r.getMessage() + json.dumps(r.__dict__, default=str)
                       for p in raw_ids)]

    stored = set(stored_rows(data_dir, "SELECT DISTINCT tenant_id, player_id FROM events"))
    assert stored == {(e["tenant_id"], expected_pseudonym(KEY.encode(), e["tenant_id"],
                                                          e["player_id"])) for e in events}
    assert all(len(p) == 22 for _, p in stored)
    shared = {t: p for t, p in stored if p == expected_pseudonym(KEY.encode(), t, "p-shared")}
    assert len(set(shared.values())) == 2  # one player id, two brands: unrelated pseudonyms
    # no raw id anywhere in the store: every text column of every table
    with stored_store(data_dir) as store:
        listing = ("SELECT table_name, column_name FROM information_schema.columns "
                   "WHERE data_type = 'VARCHAR'") if store.dialect == "duckdb" else (
            "SELECT table, name FROM system.columns WHERE database = currentDatabase() "
            "AND type IN ('String', 'Nullable(String)')")
        columns = [tuple(r.values()) for r in store.query(listing).to_pylist()]
        assert ("events", "player_id") in columns
        for table, column in columns:
            for raw in raw_ids:  # test ids: no quote in them
                hits = store.query(f"SELECT count(*) AS n FROM {table} "  # noqa: S608
                                   f"WHERE {column} LIKE '%{raw}%'").to_pylist()
                assert hits == [{"n": 0}], (table, column, raw)


@on_duckdb_only("two stores open at once: chDB runs one engine a process")
def test_distinct_counts_are_unchanged_by_pseudonymisation(two_stores):
    """Within a brand, always. Across brands, "p-shared" (one raw id under b1 and b2) is one
    player with the deployment scope, and one per brand with the brand scope (documented)."""
    keyed, plain, scope = two_stores
    answers = []
    for app_client in (keyed, plain):
        settings = app_client.app.state.runtime.settings
        headers = bearer(app_client, settings.data_dir)
        post(app_client, headers, _stream())
        answer: dict[tuple[str, str], Any] = {}
        for metric in ("dau", "wau", "mau"):
            for group_by in ("brand_id", "region", "brand_id,region"):
                r = app_client.get(TS, headers=headers, params={
                    "metric": metric, "granularity": "1d", "from": FROM, "to": TO,
                    "group_by": group_by})
                answer[(metric, group_by)] = r.json()["series"]
        for dim in ("brand_id", "region"):
            r = app_client.get(SLICE, headers=headers, params={
                "metric": "dau", "dim": dim, "from": FROM, "to": TO})
            answer[("slice", dim)] = r.json()["items"]
        answers.append(answer)
    keyed_answer, plain_answer = answers
    assert {i["brand_id"]: i["value"] for i in plain_answer[("slice", "brand_id")]} == {
        "b1": 5, "b2": 4}
    for key, plain_series in plain_answer.items():
        if scope == "deployment" or "region" not in key or "brand_id,region" in key:
            assert keyed_answer[key] == plain_series, key
            continue
        # brand scope, grouped by region only: EU counts p-shared twice while it is active
        # in the window (dau: its day; wau/mau: every day of the range)
        expected = [{**p, "value": p["value"] + (
            p["region"] == "EU" and (key[0] != "dau" or p.get("ts", FROM).startswith(FROM)))}
            for p in plain_series]
        assert keyed_answer[key] == expected, key


def test_deployment_scope_gives_one_pseudonym_for_all_brands():
    from tally.security.pseudonym import Pseudonymiser

    one_key = Pseudonymiser(KEY.encode(), per_brand=False)
    prk = hmac.new(b"\0" * 32, KEY.encode(), hashlib.sha256).digest()
    key = hmac.new(prk, b"tally/player_id-pseudonym/v1:deployment\x01", hashlib.sha256).digest()
    expected = base64.urlsafe_b64encode(
        hmac.new(key, b"p-shared", hashlib.sha256).digest()).decode()[:22]
    assert one_key.pseudonym("b1", "p-shared") == one_key.pseudonym("b2", "p-shared") == expected
    per_brand = Pseudonymiser(KEY.encode())
    assert per_brand.pseudonym("b1", "p-shared") != per_brand.pseudonym("b2", "p-shared")


def test_the_key_must_be_long_enough():
    with pytest.raises(pydantic.ValidationError, match="at least 32 bytes"):
        Settings(pseudonymise_key=pydantic.SecretStr("short"))
    assert KEY not in repr(Settings(pseudonymise_key=pydantic.SecretStr(KEY)))


def test_settings_are_documented():
    readme = (ROOT / "README.md").read_text()
    assert "TALLY_PSEUDONYMISE_KEY" in readme and "--min-group-size" in readme
