"""The authorisation matrix (CONTRACT §6 row-level security), generated from tables:

    clients (brand / region / metric limits) × endpoints × metrics × filters   (queries)
    clients × brands × regions                                                  (ingestion)

Every cell expects either a ``403`` problem naming the violated claim, or an answer whose
(brand, region) groups are exactly the allowed ones — computed here from the tables, not by
asking ``tally``. The data gives every metric a value in every (brand, region) cell, so an
answer missing a cell is as wrong as one with an extra cell.

To add an endpoint, append a :class:`QueryEndpoint` to ``ENDPOINTS``: how to ask it for a
metric (``None`` for endpoints without one) under filters, and what its answer shows — the
(brand, region) keys it is grouped by, and/or how many players it counts (every cell of the
data holds exactly one player, so a count is the number of allowed cells). The number of cells
is printed by ``test_matrix_size`` and recorded in docs/security.md. The operator (``admin``)
routes have their own matrix over these clients: ``test_admin_matrix.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx2 as httpx
import pytest
from fastapi.testclient import TestClient

from tally.api.app import create_app
from tally.config import Settings
from tally.semantic.catalog import METRICS
from tests.cells import player_day
from tests.conftest import bearer

SERVED = ("EU", "UK", "LATAM")
UNSERVED = "NA"
BRANDS = ("b1", "b2", "b3")
DAY = datetime(2025, 10, 23, 10)
FROM, TO = "2025-10-23", "2025-10-24"


def bets_in(brand: str, region: str) -> int:
    """A different number of bets per cell, so totals tell cells apart."""
    return 1 + BRANDS.index(brand) * len(SERVED) + SERVED.index(region)


@dataclass(frozen=True)
class Limits:
    name: str
    brands: frozenset[str] | None = None
    regions: frozenset[str] | None = None
    metrics: frozenset[str] | None = None

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
    Limits("metrics-ggr-dau-bets", metrics=_set("ggr", "dau", "bets")),
    Limits("b2-latam-rtp-wau", brands=_set("b2"), regions=_set("LATAM"),
           metrics=_set("rtp", "wau")),
)

Filters = tuple[tuple[str, str], ...]  # (key, value) pairs as sent: keys repeat
FILTERS: tuple[Filters, ...] = (
    (),
    *((("brand_id", b),) for b in BRANDS),
    *((("region", r),) for r in (*SERVED, UNSERVED)),
    (("brand_id", "b2"), ("region", "UK")),
    (("brand_id", "b1"), ("brand_id", "b3")),  # partly outside: 403, never narrowed
)

Pair = tuple[str, str]
Seen = dict[tuple[str, ...], Any]  # answer keys → value


@dataclass(frozen=True)
class QueryEndpoint:
    name: str
    metrics: tuple[str | None, ...]
    ask: Callable[[TestClient, dict[str, str], str | None, Filters], httpx.Response]
    seen: Callable[[dict[str, Any]], Seen] | None = None  # the answer's keys (None: not keyed)
    project: Callable[[Pair], tuple[str, ...]] = lambda pair: pair  # cell → the key it shows
    players: Callable[[dict[str, Any]], int] | None = None  # players the answer counts


def _filters_param(filters: Filters) -> dict[str, str]:
    return {"filters": ",".join(f"{k}:{v}" for k, v in filters)} if filters else {}


def _ask_timeseries(client: TestClient, headers: dict[str, str], metric: str | None,
                    filters: Filters) -> httpx.Response:
    return client.get("/v1/analytics/timeseries", headers=headers, params={
        "metric": metric, "granularity": "1d", "from": FROM, "to": TO,
        "group_by": "brand_id,region", **_filters_param(filters)})


def _seen_timeseries(body: dict[str, Any]) -> Seen:
    assert body["next_cursor"] is None
    return {(p["brand_id"], p["region"]): p.get("value", p.get("value_minor"))
            for p in body["series"]}


def _slice_endpoint(dim: str) -> QueryEndpoint:
    def ask(client: TestClient, headers: dict[str, str], metric: str | None,
            filters: Filters) -> httpx.Response:
        return client.get("/v1/analytics/slice", headers=headers, params={
            "metric": metric, "dim": dim, "from": FROM, "to": TO, **_filters_param(filters)})

    def seen(body: dict[str, Any]) -> Seen:
        assert body["next_cursor"] is None
        return {(item[dim],): item.get("value", item.get("value_minor"))
                for item in body["items"]}

    index = 0 if dim == "brand_id" else 1
    return QueryEndpoint(f"slice by {dim}", SLICE_METRICS, ask, seen,
                         lambda pair: (pair[index],))


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
ENDPOINTS: list[QueryEndpoint] = [
    QueryEndpoint("timeseries", ALL_METRICS, _ask_timeseries, _seen_timeseries),
    _slice_endpoint("brand_id"),
    _slice_endpoint("region"),
    QueryEndpoint("funnel", (None,), _ask_funnel, players=lambda body: body["total"]),
    QueryEndpoint("retention", (None,), _ask_retention, players=_cohort_size("rows")),
    QueryEndpoint("ltv", ("ggr", "ngr"), _ask_ltv, players=_cohort_size("cohorts")),
]


# --------------------------------------------------------------------------- expectations


def refused_claims(limits: Limits, metric: str | None, filters: Filters) -> set[str]:
    """Every claim the request violates (any of them may be the one named)."""
    claims: set[str] = set()
    if metric is not None and limits.metrics is not None and metric not in limits.metrics:
        claims.add("metrics")
    regions_named = False
    for key, value in filters:
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
    return claims


def allowed_cells(limits: Limits, filters: Filters) -> set[Pair]:
    brands = set(BRANDS) if limits.brands is None else set(BRANDS) & limits.brands
    regions = set(SERVED) if limits.regions is None else set(SERVED) & limits.regions
    for key, pool in (("brand_id", brands), ("region", regions)):
        named = {v for k, v in filters if k == key}
        if named:
            pool &= named
    return {(b, r) for b in brands for r in regions}


# --------------------------------------------------------------------------- the store


@dataclass
class World:
    client: TestClient
    headers: dict[str, dict[str, str]]  # client name → Authorization


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("matrix") / "data",
                        regions=",".join(SERVED))
    events = [e for b in BRANDS for r in SERVED
              for e in player_day(b, r, f"p-{b}-{r}", DAY, bets=bets_in(b, r))]
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        writer = bearer(client, settings.data_dir)
        receipt = client.post("/v1/events:batch", json=events, headers=writer)
        assert receipt.status_code == 202 and receipt.json()["accepted"] == len(events), \
            receipt.text
        headers = {lim.name: bearer(client, settings.data_dir, "analytics:read events:write",
                                    lim.cli(lim.brands), lim.cli(lim.regions),
                                    lim.cli(lim.metrics)) for lim in CLIENTS}
        yield World(client, headers)


QUERY_CELLS = [(lim, ep, metric, filters) for lim in CLIENTS for ep in ENDPOINTS
               for metric in ep.metrics for filters in FILTERS]
BRANDS_SENT = (*BRANDS, "b9")  # b9: a brand nobody has data for
REGIONS_SENT = (*SERVED, UNSERVED)
INGEST_CELLS = [(lim, b, r) for lim in CLIENTS for b in BRANDS_SENT for r in REGIONS_SENT]


def _cell_id(cell: tuple[Any, ...]) -> str:
    lim, ep, metric, filters = cell
    return f"{lim.name}|{ep.name}|{metric or '-'}|{','.join(f'{k}:{v}' for k, v in filters) or '-'}"


def test_matrix_size():
    """Recorded in docs/security.md (Row-level security)."""
    assert len(QUERY_CELLS) == len(CLIENTS) * len(FILTERS) * sum(len(e.metrics) for e in ENDPOINTS)
    assert len(INGEST_CELLS) == len(CLIENTS) * len(BRANDS_SENT) * len(REGIONS_SENT)
    print(f"matrix: {len(QUERY_CELLS)} query cells + {len(INGEST_CELLS)} ingestion cells")


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


def check_query_cell(world: World, limits: Limits, endpoint: QueryEndpoint,
                     metric: str | None, filters: Filters) -> None:
    response = endpoint.ask(world.client, world.headers[limits.name], metric, filters)
    claims = refused_claims(limits, metric, filters)
    if claims:
        assert response.status_code == 403, (response.status_code, response.text[:200])
        assert response.headers["content-type"].startswith("application/problem+json")
        problem = response.json()
        assert problem["claim"] in claims, (problem, claims)
        return
    assert response.status_code == 200, (response.status_code, response.text[:200])
    cells = allowed_cells(limits, filters)
    assert cells, "the tables should leave something to see in a 200 cell"
    if endpoint.players is not None:
        assert endpoint.players(response.json()) == len(cells), len(cells)
    if endpoint.seen is None:
        return
    seen = endpoint.seen(response.json())
    expected = {endpoint.project(cell) for cell in cells}
    assert set(seen) == expected, (sorted(seen), sorted(expected))
    if metric == "bets":  # and the values are those of the allowed cells only
        totals: dict[tuple[str, ...], int] = {}
        for b, r in cells:
            key = endpoint.project((b, r))
            totals[key] = totals.get(key, 0) + bets_in(b, r)
        assert seen == totals, (seen, totals)


def test_ingestion_matrix(client: TestClient, settings: Settings) -> None:
    """Per event: a brand or region outside the client is rejected naming the claim; a region
    not served here is rejected for residency and stored nowhere; the rest is accepted."""
    for limits in CLIENTS:
        headers = bearer(client, settings.data_dir, "events:write admin",
                         limits.cli(limits.brands), limits.cli(limits.regions))
        cells = [(b, r) for lim, b, r in INGEST_CELLS if lim is limits]
        batch = [player_day(b, r, "p-ingest", DAY, tag=f"{limits.name}-{b}-{r}")[0]
                 for b, r in cells]
        receipt = client.post("/v1/events:batch", json=batch, headers=headers)
        assert receipt.status_code == 202, receipt.text
        errors = {e["index"]: e["detail"] for e in receipt.json()["errors"]}
        for i, (brand, region) in enumerate(cells):
            expected = expected_rejection(limits, brand, region)
            if expected is None:
                assert i not in errors, (limits.name, brand, region, errors.get(i))
            else:
                assert i in errors and expected in errors[i], (limits.name, brand, region,
                                                               errors.get(i))
        assert receipt.json()["accepted"] == len(cells) - len(errors)


def expected_rejection(limits: Limits, brand: str, region: str) -> str | None:
    if region not in SERVED:
        return "not served by this deployment"
    if limits.regions is not None and region not in limits.regions:
        return "outside this client's regions"
    if limits.brands is not None and brand not in limits.brands:
        return "outside this client's brands"
    return None


def test_refused_events_for_unserved_regions_are_stored_nowhere(client, settings):
    headers = bearer(client, settings.data_dir)
    event = player_day("b1", UNSERVED, "p-secret-player", DAY, tag="nowhere")[0]
    receipt = client.post("/v1/events:batch", json=[event], headers=headers)
    assert receipt.json()["rejected"] == 1
    listing = client.get("/v1/admin/quarantine", headers=headers)
    assert listing.status_code == 200
    assert "p-secret-player" not in listing.text
