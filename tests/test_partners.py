"""Partner tokens for studios (issue 10 item 9; CONTRACT §1 ``--providers``, §6).

A game studio watching RTP and engagement of its own games on an operator's platform gets a
client limited to its providers: ``tally client create --providers p1,p2``. Here, through the
real ``tally`` executable and a real ``tally serve``: the option is checked and shown like the
other limits; the token carries a ``providers`` claim (an identity provider's token may too);
and the studio reads only bets on its providers' games, across the operator's brands, with
every answer computed here from the events the test sent. The full cross product of clients,
routes, metrics and filters is the authorisation matrix (``test_policy_matrix.py``).
"""

from __future__ import annotations

import base64
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from fastapi.testclient import TestClient

from tally import metadata
from tally.api.app import create_app
from tally.config import Settings
from tally.errors import Unauthorized
from tally.security.clients import authenticate
from tally.security.tokens import principal_from
from tests.conftest import make_event
from tests.server import Server, cli, new_client, token
from tests.test_cli import assert_one_line_error
from tests.test_tokens import bearer, forge_for

BET_METRICS = {"stake", "wins", "ggr", "rtp", "bets", "settle_lag_p95"}  # CONTRACT §6


def stored_providers(data_dir: Path) -> list[tuple[str, str | None]]:
    db = data_dir / "meta.sqlite3"
    if not db.exists():
        return []
    with sqlite3.connect(db) as con:
        return con.execute("SELECT client_id, providers FROM clients").fetchall()


# ------------------------------------------------------------------ tally client create


def test_create_stores_shows_and_lists_the_providers(tmp_path: Path):
    data = tmp_path / "data"
    out = cli("client", "create", "--name", "studio", "--scopes", "analytics:read",
              "--providers", " studio_y, studio_x,", "--brands", "b1", data_dir=data)
    assert out.returncode == 0, out.stderr
    client_id = json.loads(out.stdout)["client_id"]
    assert stored_providers(data) == [(client_id, "studio_x,studio_y")]
    everyone = new_client(data)[0]  # and one without: "all"
    shown = json.loads(cli("client", "show", client_id, "--json", data_dir=data).stdout)
    assert shown["providers"] == ["studio_x", "studio_y"] and shown["brands"] == ["b1"]
    text = cli("client", "show", client_id, data_dir=data).stdout
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in text.splitlines())}
    assert fields["providers"] == "studio_x,studio_y"
    listed = json.loads(cli("client", "list", "--json", data_dir=data).stdout)
    assert [(c["client_id"], c["providers"]) for c in listed] == [
        (client_id, ["studio_x", "studio_y"]), (everyone, None)]
    header, *rows = cli("client", "list", data_dir=data).stdout.splitlines()
    column = header.split().index("PROVIDERS") - 1  # "CLIENT ID" is two words
    assert [row.split()[column] for row in rows] == ["studio_x,studio_y", "all"]


@pytest.mark.parametrize("value", ["", ",", " , "], ids=repr)
def test_create_refuses_an_empty_providers_limit(tmp_path: Path, value: str):
    out = cli("client", "create", "--name", "studio", "--scopes", "analytics:read",
              "--providers", value, data_dir=tmp_path)
    assert_one_line_error(out, 2, "--providers", "never means all")
    assert stored_providers(tmp_path) == []  # nothing registered, so nothing unrestricted


def test_create_refuses_a_provider_id_no_event_can_carry(tmp_path: Path):
    out = cli("client", "create", "--name", "studio", "--scopes", "analytics:read",
              "--providers", "studio_x," + "p" * 129, data_dir=tmp_path)
    assert_one_line_error(out, 2, "--providers", "not a provider id", "provider_id", "1-128")
    assert not tmp_path.joinpath("meta.sqlite3").exists()  # refused before anything is written


# ------------------------------------------------------------------ the claim


def _claims(access_token: str) -> dict[str, Any]:
    payload = access_token.split(".")[1]
    padded = payload + "=" * (-len(payload) % 4)
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(padded))
    return decoded


def test_an_identity_providers_token_may_carry_providers():
    """External and built-in tokens go through the same ``principal_from``: a ``providers``
    claim is a limit like ``brands``, and an empty one never means all."""
    base = {"client_id": "cl_idp", "sub": "cl_idp", "jti": "j", "scope": "analytics:read"}
    assert principal_from({**base, "providers": ["studio_x"]}).providers == {"studio_x"}
    assert principal_from(base).providers is None
    for bad in ([], [" "], ["studio_x", ""], "studio_x", [7]):
        with pytest.raises(Unauthorized):
            principal_from({**base, "providers": bad})


@pytest.fixture
def app(tmp_path: Path) -> Iterator[tuple[TestClient, Settings]]:
    settings = Settings(data_dir=tmp_path / "data", regions="EU,UK,LATAM")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client, settings


def test_a_forged_empty_providers_claim_is_refused(app):
    client, settings = app
    forge = forge_for(settings)
    issuer = {"iss": settings.issuer, "aud": settings.audience}
    control = forge.sign(claims=forge.claims(**issuer, providers=["studio_x"]))
    ok = client.get("/v1/metrics", headers=bearer(control))
    assert ok.status_code == 200 and {m["name"] for m in ok.json()["metrics"]} == BET_METRICS
    empty = forge.sign(claims=forge.claims(**issuer, providers=[]))
    r = client.get("/v1/metrics", headers=bearer(empty))
    assert r.status_code == 401 and "claim 'providers' is empty" in r.json()["detail"]


def test_a_stored_empty_providers_limit_gets_no_token(app):
    client, settings = app
    con = metadata.connect(settings.data_dir)
    from tally.security.clients import create_client

    client_id, secret = create_client(con, "studio", "analytics:read", providers="studio_x")
    con.execute("UPDATE clients SET providers = ' , '")
    con.close()
    r = client.post("/oauth/token", auth=(client_id, secret),
                    data={"grant_type": "client_credentials"})
    assert r.status_code == 401 and "empty providers limit" in r.json()["detail"]


def test_a_store_of_an_earlier_version_gains_the_column(tmp_path: Path):
    """A ``meta.sqlite3`` made before ``providers`` existed: its clients keep working, with
    no provider limit (NULL), once the store is opened."""
    data = tmp_path / "data"
    data.mkdir()
    with sqlite3.connect(data / "meta.sqlite3") as old:
        old.executescript(metadata.SCHEMA)
        for table, column, kind in metadata.ADDED_COLUMNS:
            if column != "providers":
                old.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        old.execute("INSERT INTO clients (client_id, name, secret_salt, secret_hash, scopes,"
                    " created_at) VALUES ('cl_old', 'old', x'00', x'00', 'analytics:read',"
                    " '2025-01-01T00:00:00+00:00')")
    con = metadata.connect(data)
    columns = {row[1] for row in con.execute("PRAGMA table_info(clients)")}
    assert "providers" in columns
    assert authenticate(con, "cl_old", "wrong") is None  # readable with the new columns
    from tally.security.clients import client_record

    assert client_record(con, "cl_old").providers is None
    con.close()


# ------------------------------------------------------------------ a studio, end to end


# the operator's bets: (brand, provider, game, stake, win), and one deposit per brand
BETS = [
    ("b1", "studio_x", "gx1", 1000, 930), ("b1", "studio_x", "gx2", 500, 610),
    ("b1", "studio_y", "gy1", 800, 100), ("b2", "studio_x", "gx1", 2000, 1890),
    ("b2", "studio_y", "gy1", 4000, 3900), ("b2", "studio_z", "gz1", 300, 0),
]
DAY = {"from": "2025-10-23", "to": "2025-10-24"}


def operator_events() -> list[dict[str, Any]]:
    events = []
    for i, (brand, provider, game, stake, win) in enumerate(BETS):
        event = make_event(tenant_id=brand)
        event["payload"].update(bet_id=f"bet-{i}", stake_minor=stake, win_minor=win,
                                game_id=game, provider_id=provider)
        events.append(event)
    for brand in ("b1", "b2"):
        events.append(make_event(tenant_id=brand, event_type="wallet.credit", payload={
            "amount_minor": 5000, "currency": "EUR", "reason": "deposit"}))
    return events


def expected(providers: set[str], key: int, value: str) -> dict[str, Any]:
    """Per key (0 brand, 1 provider, 2 game) of the bets on ``providers``: stake, wins, ggr,
    bets, rtp — from the table above, not from tally."""
    sums: dict[str, list[int]] = {}
    for bet in BETS:
        if bet[1] in providers:
            cell = sums.setdefault(bet[key], [0, 0, 0])
            cell[0] += bet[3]
            cell[1] += bet[4]
            cell[2] += 1
    compute = {"stake": lambda s: s[0], "wins": lambda s: s[1], "ggr": lambda s: s[0] - s[1],
               "bets": lambda s: s[2], "rtp": lambda s: s[1] / s[0]}[value]
    return {k: compute(s) for k, s in sums.items()}


@pytest.fixture(scope="module")
def studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, dict[str, str],
                                                                      str]]:
    data = tmp_path_factory.mktemp("studio") / "data"
    operator = new_client(data)
    partner = new_client(data, "analytics:read events:write", providers="studio_x,studio_z")
    server = Server(data)
    try:
        headers = token(server.url, *operator)
        r = httpx.post(f"{server.url}/v1/events:batch", json=operator_events(), headers=headers)
        assert r.status_code == 202 and r.json()["accepted"] == len(BETS) + 2, r.text
        response = httpx.post(f"{server.url}/oauth/token", auth=partner,
                              data={"grant_type": "client_credentials"})
        access = response.json()["access_token"]
        yield server, {"Authorization": f"Bearer {access}"}, access
    finally:
        server.stop()


def _get(server: Server, headers: dict[str, str], route: str, **params: str) -> httpx.Response:
    return httpx.get(f"{server.url}{route}", headers=headers, params=params, timeout=30)


def test_the_token_carries_the_providers_claim(studio):
    _, _, access = studio
    assert _claims(access)["providers"] == ["studio_x", "studio_z"]


@pytest.mark.parametrize(("metric", "dim", "key"), [
    ("rtp", "game_id", 2), ("ggr", "brand_id", 0), ("bets", "provider_id", 1),
    ("stake", "game_id", 2), ("wins", "brand_id", 0),
])
def test_a_studio_sees_only_bets_on_its_games_across_brands(studio, metric, dim, key):
    server, headers, _ = studio
    r = _get(server, headers, "/v1/analytics/slice", metric=metric, dim=dim, **DAY)
    assert r.status_code == 200, r.text
    field = "value" if metric in ("rtp", "bets") else "value_minor"
    seen = {item[dim]: item[field] for item in r.json()["items"]}
    assert seen == pytest.approx(expected({"studio_x", "studio_z"}, key, metric))
    r = _get(server, headers, "/v1/analytics/timeseries", metric=metric, granularity="1d",
             group_by=dim, **DAY)
    assert r.status_code == 200, r.text
    assert {p[dim]: p[field] for p in r.json()["series"]} == pytest.approx(seen)


def test_a_studio_filters_among_its_own_providers(studio):
    server, headers, _ = studio
    r = _get(server, headers, "/v1/analytics/timeseries", metric="rtp", granularity="1d",
             filters="provider_id:studio_x", **DAY)
    assert r.status_code == 200, r.text
    assert [p["value"] for p in r.json()["series"]] == pytest.approx(
        [expected({"studio_x"}, 1, "rtp")["studio_x"]])


@pytest.mark.parametrize(("route", "params"), [
    ("/v1/analytics/slice", {"metric": "ggr", "dim": "game_id",
                             "filters": "provider_id:studio_y", **DAY}),
    ("/v1/analytics/slice", {"metric": "ggr", "dim": "game_id",
                             "filters": "provider_id:studio_x,provider_id:studio_y", **DAY}),
    ("/v1/analytics/timeseries", {"metric": "deposits", "granularity": "1d", **DAY}),
    ("/v1/analytics/timeseries", {"metric": "dau", "granularity": "1d", **DAY}),
    ("/v1/analytics/slice", {"metric": "ngr", "dim": "brand_id", **DAY}),
    ("/v1/analytics/ltv", {"start_date": "2025-10-23", "end_date": "2025-10-23",
                           "horizon": "1d"}),
], ids=["other-provider", "partly-other", "deposits", "dau", "ngr", "ltv"])
def test_a_studio_is_refused_what_is_not_its_bets(studio, route, params):
    """403 naming the claim, never an empty or silently narrowed answer."""
    server, headers, _ = studio
    r = _get(server, headers, route, **params)
    assert r.status_code == 403, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["claim"] == "providers"


@pytest.mark.parametrize("analysis", ["funnel", "retention"])
def test_a_studio_runs_no_cohort_analysis(studio, analysis):
    server, headers, _ = studio
    body = ({"steps": [{"event": "wallet.credit"}, {"event": "bet.settled"}],
             "window_sec": 3600, **DAY} if analysis == "funnel"
            else {"cohort": "first_deposit", "start_date": DAY["from"], "end_date": DAY["from"],
                  "days": [1]})
    r = httpx.post(f"{server.url}/v1/analytics/{analysis}", headers=headers, json=body,
                   timeout=30)
    assert r.status_code == 403 and r.json()["claim"] == "providers", r.text


def test_the_catalog_lists_what_a_studio_may_use(studio):
    server, headers, _ = studio
    body = _get(server, headers, "/v1/metrics").json()
    assert {m["name"] for m in body["metrics"]} == BET_METRICS
    assert body["analyses"] == []


def test_a_studio_may_write_only_bets_on_its_games(studio):
    server, headers, _ = studio
    mine = make_event(tenant_id="b1")
    mine["payload"].update(provider_id="studio_z", game_id="gz9")
    theirs = make_event(tenant_id="b1")
    theirs["payload"].update(provider_id="studio_y")
    deposit = make_event(tenant_id="b1", event_type="wallet.credit", payload={
        "amount_minor": 100, "currency": "EUR", "reason": "deposit"})
    r = httpx.post(f"{server.url}/v1/events:batch", json=[mine, theirs, deposit],
                   headers=headers, timeout=30)
    assert r.status_code == 202, r.text
    errors = {e["index"]: e["detail"] for e in r.json()["errors"]}
    assert r.json()["accepted"] == 1 and set(errors) == {1, 2}
    assert "provider_id 'studio_y' is outside this client's providers" in errors[1]
    assert "may send only bets" in errors[2]


# ------------------------------------------------------------------ the analyses claim


def test_the_metrics_claim_names_the_analyses(app):
    """A client whose claim omits an analysis gets 403 on it; LTV also needs its metric;
    ``GET /v1/metrics`` lists the analyses it may run."""
    client, settings = app
    from tally.security.clients import create_client

    def headers(metrics: str | None) -> dict[str, str]:
        con = metadata.connect(settings.data_dir)
        client_id, secret = create_client(con, "bi", "analytics:read", metrics=metrics)
        con.close()
        r = client.post("/oauth/token", auth=(client_id, secret),
                        data={"grant_type": "client_credentials"})
        return {"Authorization": f"Bearer {r.json()['access_token']}"}

    funnel = {"steps": [{"event": "wallet.credit"}, {"event": "bet.settled"}],
              "window_sec": 60, **DAY}
    ltv = {"start_date": DAY["from"], "end_date": DAY["from"], "horizon": "1d"}
    for metrics, analyses in ((None, ["funnel", "retention", "ltv"]),
                              ("ggr,funnel", ["funnel"]), ("ggr,ltv", ["ltv"]),
                              ("ltv,rtp", []), ("ggr", [])):
        h = headers(metrics)
        assert client.get("/v1/metrics", headers=h).json()["analyses"] == analyses, metrics
        ran = client.post("/v1/analytics/funnel", json=funnel, headers=h)
        assert ran.status_code == (200 if "funnel" in analyses else 403), (metrics, ran.text)
        ran = client.get("/v1/analytics/ltv", params=ltv, headers=h)
        assert ran.status_code == (200 if "ltv" in analyses else 403), (metrics, ran.text)
        if ran.status_code == 403:
            assert ran.json()["claim"] == "metrics"
