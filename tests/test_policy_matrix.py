"""The authorisation matrix (CONTRACT §6 row-level security), generated from tables:

    clients (brand / region / provider / metric limits) × endpoints × metrics × filters (queries)
    clients × brands × regions × kinds of event                                      (ingestion)

Every cell expects either a ``403`` problem naming the claim the request breaks first, or the
answer computed here from the events the test sent — never by asking ``tally``: the exact
keys (brand, region, provider, …) and the exact value of every key. The data gives every
metric a value in every (brand, region) cell, and every bet metric one in every (brand,
region, provider) cell, so an answer missing a cell is as wrong as one with an extra cell.

Partner clients (``providers``, CONTRACT §6) read only bets on their providers' games: the
metrics of bets alone (:data:`BET_METRICS`, the contract's list, written here rather than
asked of the catalog) with a ``provider_id`` filter narrowed to their providers; every other
metric and the cohort analyses are ``403`` (claim ``providers``). The ``metrics`` claim also
names the analyses (``funnel``, ``retention``, ``ltv``) a client may run; LTV needs its metric
too.

To add an endpoint, append a :class:`QueryEndpoint` to ``ENDPOINTS``: how to ask it for a
metric (``None`` for endpoints without one) under filters, what its answer shows — the
dimensions it is keyed by, and/or how many players it counts (every cell of the data holds
exactly one player, so a count is the number of allowed cells). The number of cells is printed
by ``test_matrix_size`` and recorded in docs/security.md. The operator (``admin``) routes
have their own matrix over these clients: ``test_admin_matrix.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx2 as httpx
import pytest
from fastapi.testclient import TestClient

from tally import metadata
from tally.api.app import create_app
from tally.config import Settings
from tally.security.clients import create_client
from tally.semantic.catalog import METRICS
from tests.cells import player_day

SERVED = ("EU", "UK", "LATAM")
UNSERVED = "NA"
BRANDS = ("b1", "b2", "b3")
PROVIDERS = ("studio_x", "studio_y", "studio_z")  # player_day bets on studio_x
DAY = datetime(2025, 10, 23, 10)
FROM, TO = "2025-10-23", "2025-10-24"
# CONTRACT §6: what a partner may read — the metrics made of bets alone (ngr also subtracts
# bonus.consumed, which is no bet)
BET_METRICS = frozenset({"stake", "wins", "ggr", "rtp", "bets", "settle_lag_p95"})
ANALYSES = ("funnel", "retention", "ltv")


def bets_in(brand: str, region: str, provider: str) -> int:
    """A different number of bets per cell, so totals tell cells apart."""
    return 1 + PROVIDERS.index(provider) + len(PROVIDERS) * (
        SERVED.index(region) + len(SERVED) * BRANDS.index(brand))


def _at(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def provider_bets(brand: str, region: str, player: str, provider: str, n: int,
                  start: datetime, tag: str = "") -> list[dict[str, Any]]:
    """``n`` bets placed and settled on a game of ``provider``, with stakes, wins and settle
    lags that differ from bet to bet (so RTP and the p95 lag tell providers apart); ``tag``
    in every id."""
    out = []
    base = {"tenant_id": brand, "region": region, "player_id": player, "trace_id": "tr-pb",
            "schema_version": "1.0.0"}
    for k in range(n):
        tag_k = f"{tag}{brand}-{region}-{provider}-{k}"
        placed = start + timedelta(seconds=20 * k)
        settled = placed + timedelta(seconds=1 + (k * 7 + PROVIDERS.index(provider)) % 11)
        bet = {"bet_id": f"pb-{tag_k}", "stake_minor": 100 * (k + 1) + 13, "currency": "EUR",
               "game_id": f"g-{provider}", "provider_id": provider}
        out.append({**base, "event_id": f"pb-placed-{tag_k}", "event_type": "bet.placed",
                    "occurred_at": _at(placed), "ingested_at": _at(placed + timedelta(seconds=2)),
                    "payload": bet})
        out.append({**base, "event_id": f"pb-settled-{tag_k}", "event_type": "bet.settled",
                    "occurred_at": _at(settled),
                    "ingested_at": _at(settled + timedelta(seconds=2)),
                    "payload": {**bet, "win_minor": (37 * k * (PROVIDERS.index(provider) + 2))
                                % 900}})
    return out


def cell_events(brand: str, region: str) -> list[dict[str, Any]]:
    """One player's day (every metric has a value) plus bets on every provider."""
    player = f"p-{brand}-{region}"
    events = player_day(brand, region, player, DAY, bets=bets_in(brand, region, "studio_x"))
    for provider in PROVIDERS[1:]:
        events += provider_bets(brand, region, player, provider,
                                bets_in(brand, region, provider), DAY + timedelta(minutes=20))
    return events


@dataclass(frozen=True)
class Limits:
    name: str
    brands: frozenset[str] | None = None
    regions: frozenset[str] | None = None
    metrics: frozenset[str] | None = None
    providers: frozenset[str] | None = None

    def cli(self, items: frozenset[str] | None) -> str | None:
        return None if items is None else ",".join(sorted(items))


def _set(*items: str) -> frozenset[str]:
    return frozenset(items)


CLIENTS = (
    Limits("all"),
    Limits("brand-b1", brands=_set("b1")),
    Limits("brands-b1b2-eu", brands=_set("b1", "b2"), regions=_set("EU")),
    Limits("regions-uk-latam", regions=_set("UK", "LATAM")),
    Limits("regions-eu-na", regions=_set("EU", UNSERVED)),  # NA is served elsewhere
    Limits("region-na-only", regions=_set(UNSERVED)),  # nothing of it is served here
    Limits("metrics-ggr-dau-bets", metrics=_set("ggr", "dau", "bets")),  # and no analysis
    Limits("b2-latam-rtp-wau", brands=_set("b2"), regions=_set("LATAM"),
           metrics=_set("rtp", "wau")),
    # the analyses in the metrics claim: funnel and LTV of ngr (not of ggr), no retention
    Limits("analyses-funnel-ltv-ngr", metrics=_set("funnel", "ltv", "ngr", "deposits")),
    Limits("analyses-retention-ltv", metrics=_set("retention", "ltv")),  # LTV, but no metric
    # partners (game studios)
    Limits("provider-y", providers=_set("studio_y")),
    Limits("providers-x-z", providers=_set("studio_x", "studio_z")),
    Limits("b1b3-provider-z", brands=_set("b1", "b3"), providers=_set("studio_z")),
    Limits("provider-y-uk-metrics", regions=_set("UK"), providers=_set("studio_y"),
           metrics=_set("rtp", "bets", "dau", "funnel")),
)

Filters = tuple[tuple[str, str], ...]  # (key, value) pairs as sent: keys repeat
FILTERS: tuple[Filters, ...] = (
    (),
    *((("brand_id", b),) for b in BRANDS),
    *((("region", r),) for r in (*SERVED, UNSERVED)),
    (("brand_id", "b2"), ("region", "UK")),
    (("brand_id", "b1"), ("brand_id", "b3")),  # partly outside: 403, never narrowed
)
# for the metrics with a provider_id dimension (those of bets) only
PROVIDER_FILTERS: tuple[Filters, ...] = (
    (("provider_id", "studio_y"),),
    (("provider_id", "studio_x"), ("provider_id", "studio_z")),
    (("provider_id", "studio_x"), ("provider_id", "studio_y")),  # partly outside x-z: 403
    (("provider_id", "studio_z"), ("brand_id", "b1")),
)

Seen = dict[tuple[str, ...], Any]  # answer keys → value


@dataclass(frozen=True)
class QueryEndpoint:
    name: str
    metrics: tuple[str | None, ...]
    ask: Callable[[TestClient, dict[str, str], str | None, Filters], httpx.Response]
    seen: Callable[[dict[str, Any], str | None], Seen] | None = None  # keys → value
    keys: Callable[[str | None], tuple[str, ...]] = lambda metric: ()  # dims the answer shows
    players: Callable[[dict[str, Any]], int] | None = None  # players the answer counts


def _filters_param(filters: Filters) -> dict[str, str]:
    return {"filters": ",".join(f"{k}:{v}" for k, v in filters)} if filters else {}


def _group_by(metric: str | None) -> tuple[str, ...]:
    """Timeseries groups by brand and region, and by provider where the metric has one."""
    dims = ("brand_id", "region")
    return (*dims, "provider_id") if "provider_id" in METRICS[metric or ""].dimensions else dims


def _ask_timeseries(client: TestClient, headers: dict[str, str], metric: str | None,
                    filters: Filters) -> httpx.Response:
    return client.get("/v1/analytics/timeseries", headers=headers, params={
        "metric": metric, "granularity": "1d", "from": FROM, "to": TO,
        "group_by": ",".join(_group_by(metric)), **_filters_param(filters)})


def _seen_timeseries(body: dict[str, Any], metric: str | None) -> Seen:
    assert body["next_cursor"] is None
    return {tuple(p[d] for d in _group_by(metric)): p.get("value", p.get("value_minor"))
            for p in body["series"]}


def _slice_endpoint(dim: str, metrics: tuple[str, ...]) -> QueryEndpoint:
    def ask(client: TestClient, headers: dict[str, str], metric: str | None,
            filters: Filters) -> httpx.Response:
        return client.get("/v1/analytics/slice", headers=headers, params={
            "metric": metric, "dim": dim, "from": FROM, "to": TO, **_filters_param(filters)})

    def seen(body: dict[str, Any], metric: str | None) -> Seen:
        assert body["next_cursor"] is None
        return {(item[dim],): item.get("value", item.get("value_minor"))
                for item in body["items"]}

    return QueryEndpoint(f"slice by {dim}", metrics, ask, seen, lambda metric: (dim,))


def _body_filters(filters: Filters) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key, value in filters:
        out.setdefault(key, []).append(value)
    return out


def _ask_funnel(client: TestClient, headers: dict[str, str], metric: str | None,
                filters: Filters) -> httpx.Response:
    return client.post("/v1/analytics/funnel", headers=headers, json={
        "steps": [{"event": "payment.intent"}, {"event": "payment.captured"}],
        "window_sec": 3600, "from": FROM, "to": TO, "filters": _body_filters(filters)})


def _ask_retention(client: TestClient, headers: dict[str, str], metric: str | None,
                   filters: Filters) -> httpx.Response:
    return client.post("/v1/analytics/retention", headers=headers, json={
        "cohort": "first_deposit", "start_date": FROM, "end_date": FROM,
        "return_event": "bet.placed", "days": [1], "filters": _body_filters(filters)})


def _ask_ltv(client: TestClient, headers: dict[str, str], metric: str | None,
             filters: Filters) -> httpx.Response:
    return client.get("/v1/analytics/ltv", headers=headers, params={
        "cohort": "first_deposit", "metric": metric, "horizon": "1d", "start_date": FROM,
        "end_date": FROM, **_filters_param(filters)})


def _cohort_size(rows: str) -> Callable[[dict[str, Any]], int]:
    return lambda body: sum(row["size"] for row in body[rows])


ALL_METRICS = tuple(METRICS)
SLICE_METRICS = tuple(m for m in METRICS if METRICS[m].window_days == 1)
PROVIDER_METRICS = tuple(m for m in SLICE_METRICS if "provider_id" in METRICS[m].dimensions)
ENDPOINTS: list[QueryEndpoint] = [
    QueryEndpoint("timeseries", ALL_METRICS, _ask_timeseries, _seen_timeseries, _group_by),
    _slice_endpoint("brand_id", SLICE_METRICS),
    _slice_endpoint("region", SLICE_METRICS),
    _slice_endpoint("provider_id", PROVIDER_METRICS),
    QueryEndpoint("funnel", (None,), _ask_funnel, players=lambda body: body["total"]),
    QueryEndpoint("retention", (None,), _ask_retention, players=_cohort_size("rows")),
    QueryEndpoint("ltv", ("ggr", "ngr"), _ask_ltv, players=_cohort_size("cohorts")),
]


def filter_sets(endpoint: QueryEndpoint, metric: str | None) -> tuple[Filters, ...]:
    """Every filter set a cell is asked with: provider filters for timeseries and slice of a
    metric with a provider dimension (elsewhere they are a 400, not a question of claims)."""
    if endpoint.name not in ANALYSES and metric is not None \
            and "provider_id" in METRICS[metric].dimensions:
        return FILTERS + PROVIDER_FILTERS
    return FILTERS


# --------------------------------------------------------------------------- expectations


CLAIM_ORDER = ("metrics", "providers", "brands", "regions", "served regions")


def refused_claim(limits: Limits, endpoint: QueryEndpoint, metric: str | None,
                  filters: Filters) -> str | None:
    """The claim the request breaks first (docs/security.md: metrics, providers, brands,
    regions, served regions), or None."""
    claims: set[str] = set()
    analysis = endpoint.name if endpoint.name in ANALYSES else None
    if limits.metrics is not None and (
            (analysis is not None and analysis not in limits.metrics)
            or (metric is not None and metric not in limits.metrics)):
        claims.add("metrics")
    if limits.providers is not None and (analysis is not None or metric not in BET_METRICS):
        claims.add("providers")
    regions_named = False
    for key, value in filters:
        if key == "provider_id" and limits.providers is not None \
                and value not in limits.providers:
            claims.add("providers")
        if key == "brand_id" and limits.brands is not None and value not in limits.brands:
            claims.add("brands")
        if key == "region":
            regions_named = True
            if limits.regions is not None and value not in limits.regions:
                claims.add("regions")
            elif value not in SERVED:
                claims.add("served regions")
    visible = set(SERVED) if limits.regions is None else limits.regions & set(SERVED)
    if not regions_named and not visible:
        claims.add("served regions")
    return next((claim for claim in CLAIM_ORDER if claim in claims), None)


def _pool(limit: frozenset[str] | None, everything: tuple[str, ...], key: str,
          filters: Filters) -> set[str]:
    pool = set(everything) if limit is None else set(everything) & limit
    named = {v for k, v in filters if k == key}
    return pool & named if named else pool


def allowed_cells(limits: Limits, filters: Filters) -> set[tuple[str, str]]:
    brands = _pool(limits.brands, BRANDS, "brand_id", filters)
    regions = _pool(limits.regions, SERVED, "region", filters)
    return {(b, r) for b in brands for r in regions}


def _dim(event: dict[str, Any], dim: str) -> str:
    return {"brand_id": event["tenant_id"], "region": event["region"]}.get(dim) or \
        event["payload"][dim]


def nearest_rank(values: list[float]) -> float | None:
    """The contract's percentile: the smallest value with at least 95 % of values ≤ it."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[math.ceil(0.95 * len(ordered)) - 1]


def _seconds(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


Placements = dict[tuple[str, str], list[float]]  # (brand, bet_id) → when placed (epoch s)


def placements(sent: list[dict[str, Any]]) -> Placements:
    placed: Placements = {}
    for e in sent:
        if e["event_type"] == "bet.placed":
            placed.setdefault((e["tenant_id"], e["payload"]["bet_id"]), []).append(
                _seconds(e["occurred_at"]))
    return placed


def reference(metric: str, events: list[dict[str, Any]],
              placed: Placements) -> float | int | None:
    """``metric`` (CONTRACT §5) over ``events``, from the events alone (EUR is the base
    currency: no conversion). ``placed``: every placement sent (a settle's pair)."""
    def of(kind: str) -> list[dict[str, Any]]:
        return [e for e in events if e["event_type"] == kind]

    def total(kind: str, field: str) -> int:
        return sum(e["payload"].get(field, 0) for e in of(kind))

    stake, wins = total("bet.settled", "stake_minor"), total("bet.settled", "win_minor")
    deposits = [e for e in of("wallet.credit") if e["payload"]["reason"] == "deposit"]
    if metric == "settle_lag_p95":  # each settle with the latest placement at or before it
        lags = []
        for e in of("bet.settled"):
            at = _seconds(e["occurred_at"])
            before = [t for t in placed.get((e["tenant_id"], e["payload"]["bet_id"]), [])
                      if t <= at]
            if before:
                lags.append(at - max(before))
        return nearest_rank(lags)
    intents = len(of("payment.intent"))
    active = {e["player_id"] for e in of("bet.placed") + deposits + of("session.started")}
    return {
        "stake": stake, "wins": wins, "ggr": stake - wins, "bets": len(of("bet.settled")),
        "rtp": wins / stake if stake else None,
        "ngr": stake - wins - total("bonus.consumed", "amount_minor")
        - total("bet.settled", "jackpot_contribution_minor")
        - total("bet.settled", "commission_minor"),
        "deposits": sum(e["payload"]["amount_minor"] for e in deposits),
        "deposits_count": len(deposits),
        "deposits_success": len(of("payment.captured")) / intents if intents else None,
        "webhook_lag_p95": nearest_rank([_seconds(e["ingested_at"]) - _seconds(e["occurred_at"])
                                         for e in events]),
        "dau": len(active), "wau": len(active), "mau": len(active),
    }[metric]


def expected_answer(sent: list[dict[str, Any]], limits: Limits, metric: str,
                    keys: tuple[str, ...], filters: Filters,
                    placed: Placements | None = None) -> Seen:
    """The answer keyed by ``keys``, computed from the events sent: those of the allowed
    (brand, region) cells, and for a metric of bets only the bets of the allowed providers."""
    cells = allowed_cells(limits, filters)
    providers = _pool(limits.providers, PROVIDERS, "provider_id", filters)
    kept = [e for e in sent if (e["tenant_id"], e["region"]) in cells]
    if metric in BET_METRICS:
        kept = [e for e in kept if e["event_type"].startswith("bet.")
                and e["payload"]["provider_id"] in providers]
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for event in kept:
        groups.setdefault(tuple(_dim(event, d) for d in keys), []).append(event)
    placed = placements(sent) if placed is None else placed
    return {key: reference(metric, events, placed) for key, events in groups.items()}


# --------------------------------------------------------------------------- the store


def registered(client: TestClient, data_dir: Any, limits: Limits,
               scopes: str) -> tuple[str, dict[str, str]]:
    """A client with these limits (through the real registration code) and a token of it."""
    con = metadata.connect(data_dir)
    client_id, secret = create_client(con, limits.name, scopes, limits.cli(limits.brands),
                                      limits.cli(limits.regions), limits.cli(limits.metrics),
                                      providers=limits.cli(limits.providers))
    con.close()
    r = client.post("/oauth/token", auth=(client_id, secret),
                    data={"grant_type": "client_credentials"})
    assert r.status_code == 200, r.text
    return client_id, {"Authorization": f"Bearer {r.json()['access_token']}"}


def register(client: TestClient, data_dir: Any, limits: Limits, scopes: str) -> dict[str, str]:
    """The token's header of :func:`registered`."""
    return registered(client, data_dir, limits, scopes)[1]


@dataclass
class World:
    client: TestClient
    headers: dict[str, dict[str, str]]  # client name → Authorization
    sent: list[dict[str, Any]]  # every event stored
    placed: Placements  # their placements, indexed


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("matrix") / "data",
                        regions=",".join(SERVED))
    events = [e for b in BRANDS for r in SERVED for e in cell_events(b, r)]
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        writer = register(client, settings.data_dir, Limits("writer"), "events:write")
        receipt = client.post("/v1/events:batch", json=events, headers=writer)
        assert receipt.status_code == 202 and receipt.json()["accepted"] == len(events), \
            receipt.text
        headers = {lim.name: register(client, settings.data_dir, lim,
                                      "analytics:read events:write") for lim in CLIENTS}
        yield World(client, headers, events, placements(events))


QUERY_CELLS = [(lim, ep, metric, filters) for lim in CLIENTS for ep in ENDPOINTS
               for metric in ep.metrics for filters in filter_sets(ep, metric)]
BRANDS_SENT = (*BRANDS, "b9")  # b9: a brand nobody has data for
REGIONS_SENT = (*SERVED, UNSERVED)
KINDS_SENT = (None, "studio_x", "studio_y")  # a registration (no bet); bets on two providers
INGEST_CELLS = [(lim, b, r, k) for lim in CLIENTS for b in BRANDS_SENT for r in REGIONS_SENT
                for k in KINDS_SENT]


def _cell_id(cell: tuple[Any, ...]) -> str:
    lim, ep, metric, filters = cell
    return f"{lim.name}|{ep.name}|{metric or '-'}|{','.join(f'{k}:{v}' for k, v in filters) or '-'}"


def test_matrix_size():
    """Recorded in docs/security.md (Row-level security)."""
    per_client = sum(len(filter_sets(e, m)) for e in ENDPOINTS for m in e.metrics)
    assert len(QUERY_CELLS) == len(CLIENTS) * per_client
    assert len(INGEST_CELLS) == len(CLIENTS) * len(BRANDS_SENT) * len(REGIONS_SENT) * 3
    partners = [c for c in QUERY_CELLS if c[0].providers is not None]
    print(f"matrix: {len(QUERY_CELLS)} query cells ({len(partners)} of partner clients) + "
          f"{len(INGEST_CELLS)} ingestion cells")


@pytest.mark.parametrize("limits", CLIENTS, ids=lambda lim: lim.name)
def test_query_matrix(world: World, limits: Limits) -> None:
    """One test per client (one store for all): every endpoint × metric × filter cell."""
    failures: list[str] = []
    cells = [c for c in QUERY_CELLS if c[0] is limits]
    for cell in cells:
        _, endpoint, metric, filters = cell
        try:
            check_query_cell(world, limits, endpoint, metric, filters)
        except AssertionError as exc:
            failures.append(f"{_cell_id(cell)}: {exc}")
    by_endpoint: dict[str, int] = {}
    for failure in failures:
        name = failure.split("|")[1]
        by_endpoint[name] = by_endpoint.get(name, 0) + 1
    assert not failures, (f"{len(failures)} of {len(cells)} cells fail {by_endpoint}:\n"
                          + "\n".join(f[:300] for f in failures[:20]))


def _same(seen: Seen, expected: Seen) -> bool:
    """Equal keys and values; ratios and seconds within float rounding."""
    return seen.keys() == expected.keys() and all(
        seen[k] == expected[k] or (isinstance(seen[k], float) and expected[k] is not None
                                   and math.isclose(seen[k], expected[k], rel_tol=1e-9))
        for k in seen)


def check_query_cell(world: World, limits: Limits, endpoint: QueryEndpoint,
                     metric: str | None, filters: Filters) -> None:
    response = endpoint.ask(world.client, world.headers[limits.name], metric, filters)
    claim = refused_claim(limits, endpoint, metric, filters)
    if claim is not None:
        assert response.status_code == 403, (response.status_code, response.text[:200])
        assert response.headers["content-type"].startswith("application/problem+json")
        problem = response.json()
        assert problem["claim"] == claim, (problem, claim)
        return
    assert response.status_code == 200, (response.status_code, response.text[:200])
    cells = allowed_cells(limits, filters)
    assert cells, "the tables should leave something to see in a 200 cell"
    if endpoint.players is not None:
        assert endpoint.players(response.json()) == len(cells), len(cells)
    if endpoint.seen is None:
        return
    assert metric is not None
    seen = endpoint.seen(response.json(), metric)
    expected = expected_answer(world.sent, limits, metric, endpoint.keys(metric), filters,
                               world.placed)
    assert expected, "the tables should leave something to see in a 200 cell"
    assert _same(seen, expected), (sorted(seen.items()), sorted(expected.items()))


def test_the_partner_cells_are_not_trivial(world: World) -> None:
    """Each partner sees some bets and not others, with values that differ by provider, so
    the matrix tells a confinement from a leak; and sees no metric but those of bets."""
    for limits in (lim for lim in CLIENTS if lim.providers is not None):
        mine = expected_answer(world.sent, limits, "bets", ("provider_id",), ())
        everyone = expected_answer(world.sent, CLIENTS[0], "bets", ("provider_id",), ())
        assert set(mine) == {(p,) for p in limits.providers} < set(everyone), limits.name
        assert sum(mine.values()) < sum(everyone.values())
        listed = world.client.get("/v1/metrics", headers=world.headers[limits.name]).json()
        assert {m["name"] for m in listed["metrics"]} == BET_METRICS & (
            limits.metrics or BET_METRICS), limits.name
        assert listed["analyses"] == []
    rtps = expected_answer(world.sent, CLIENTS[0], "rtp", ("provider_id",), ())
    assert len(set(rtps.values())) == len(PROVIDERS)


def test_ingestion_matrix(client: TestClient, settings: Settings) -> None:
    """Per event: a brand, region or (for a partner) provider outside the client is rejected
    naming the claim — a partner may send only bets on its providers' games; a region not
    served here is rejected for residency and stored nowhere; the rest is accepted."""
    for limits in CLIENTS:
        headers = register(client, settings.data_dir, limits, "events:write admin")
        cells = [(b, r, k) for lim, b, r, k in INGEST_CELLS if lim is limits]
        batch = [ingest_event(limits.name, b, r, k) for b, r, k in cells]
        receipt = client.post("/v1/events:batch", json=batch, headers=headers)
        assert receipt.status_code == 202, receipt.text
        errors = {e["index"]: e["detail"] for e in receipt.json()["errors"]}
        for i, (brand, region, kind) in enumerate(cells):
            expected = expected_rejection(limits, brand, region, kind)
            if expected is None:
                assert i not in errors, (limits.name, brand, region, kind, errors.get(i))
            else:
                assert i in errors and expected in errors[i], (limits.name, brand, region,
                                                               kind, errors.get(i))
        assert receipt.json()["accepted"] == len(cells) - len(errors)


def ingest_event(name: str, brand: str, region: str, provider: str | None) -> dict[str, Any]:
    tag = f"{name}-{brand}-{region}-{provider}"
    if provider is None:
        return player_day(brand, region, "p-ingest", DAY, tag=tag)[0]  # player.registered
    return provider_bets(brand, region, "p-ingest", provider, 1, DAY, tag)[1]  # bet.settled


def expected_rejection(limits: Limits, brand: str, region: str,
                       provider: str | None) -> str | None:
    if region not in SERVED:
        return "not served by this deployment"
    if limits.regions is not None and region not in limits.regions:
        return "outside this client's regions"
    if limits.brands is not None and brand not in limits.brands:
        return "outside this client's brands"
    if limits.providers is not None and provider is None:
        return "may send only bets on their games"
    if limits.providers is not None and provider not in limits.providers:
        return f"provider_id {provider!r} is outside this client's providers"
    return None


def test_refused_events_for_unserved_regions_are_stored_nowhere(client, settings):
    headers = register(client, settings.data_dir, Limits("all"), "events:write admin")
    event = player_day("b1", UNSERVED, "p-secret-player", DAY, tag="nowhere")[0]
    receipt = client.post("/v1/events:batch", json=[event], headers=headers)
    assert receipt.json()["rejected"] == 1
    listing = client.get("/v1/admin/quarantine", headers=headers)
    assert listing.status_code == 200
    assert "p-secret-player" not in listing.text
