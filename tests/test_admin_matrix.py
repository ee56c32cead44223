"""The authorisation matrix of the operator (``admin``) routes (issue 9 item 6; CONTRACT §6).

The clients of ``test_policy_matrix.py`` (no limit; one brand; two brands × one region; two
regions; a served and an unserved region; only an unserved region; three metrics; brand ×
region × two metrics; metrics naming analyses; four partners limited to providers), each
registered *with the admin scope*, × every admin route:

- ``GET /v1/admin/quarantine`` × listing filters: the exact entries, in order, through cursor
  paging, or a ``403`` naming the claim (always ``providers`` for a partner: the entries are
  events of every kind, not bets of its providers);
- ``GET /v1/admin/audit``: the exact entries, through cursor paging;
- ``GET /v1/admin/audit/verify`` and ``POST /v1/admin/fx-rates``: ``200`` for the admin
  without limits, otherwise ``403`` naming its first limit (and no rate written);
- ``GET /v1/admin/fx-rates``: ``200`` for every admin.

What each admin may see is computed here from the tables and from what the test sent or the
log file holds — never by asking ``tally``: a quarantine entry is visible when the brand and
region its event names are inside the admin's limits and filters (an entry naming no brand or
region only where the admin has no limit on it); an audit entry when the admin has no limit
at all, or its client is the admin's own or one registered here whose brands, regions,
metrics and providers each lie within the admin's.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tally.api.app import create_app
from tally.config import Settings
from tests.conftest import make_event
from tests.test_ingest_api import assert_problem
from tests.test_policy_matrix import BRANDS, CLIENTS, SERVED, UNSERVED, Limits
from tests.test_policy_matrix import registered as register

ADMIN_SCOPES = "admin analytics:read events:write"
REGIONS_SENT = (*SERVED, UNSERVED)  # NA: refused for residency, still listed (as a stub)
# clients without the admin scope whose audit entries some admins may read: limits inside
# some admins' limits and outside others'
READERS = (
    Limits("reader-b1-eu", brands=frozenset({"b1"}), regions=frozenset({"EU"})),
    Limits("reader-uk", regions=frozenset({"UK"})),
    Limits("reader-b2-latam-rtp", brands=frozenset({"b2"}), regions=frozenset({"LATAM"}),
           metrics=frozenset({"rtp"})),
    Limits("reader-ggr", metrics=frozenset({"ggr"})),
    Limits("reader-all"),
    Limits("reader-studio-y", providers=frozenset({"studio_y"})),  # inside partner admins'
    Limits("reader-b1-studio-z", brands=frozenset({"b1"}), providers=frozenset({"studio_z"})),
)
CORRUPTED = Limits("reader-corrupted", brands=frozenset({"b1"}), regions=frozenset({"EU"}))

Filters = tuple[tuple[str, str], ...]
FILTERS: tuple[Filters, ...] = (
    (),
    (("brand_id", "b1"),),
    (("brand_id", "b3"),),
    (("region", "EU"),),
    (("region", UNSERVED),),
    (("region", "UK"), ("region", "LATAM")),
    (("brand_id", "b2"), ("region", "LATAM")),
    (("brand_id", "b1"), ("brand_id", "b3")),  # partly outside a b1 admin: 403, never narrowed
)


@dataclass(frozen=True)
class Sent:
    """A rejected event as sent: its id and the brand and region it names (None: not a
    string or absent)."""

    event_id: str
    tenant_id: str | None
    region: str | None


@dataclass
class World:
    client: TestClient
    settings: Settings
    admins: dict[str, tuple[str, dict[str, str]]]  # limits name → (client id, Authorization)
    limits_of: dict[str, Limits]  # client id → its limits, every client registered here
    corrupted_id: str
    quarantined: list[Sent]  # in the order they were rejected


def rejected_batch() -> tuple[list[dict[str, Any]], list[Sent]]:
    """One invalid event (a string stake) per (brand, region) cell, an unserved region
    included, and malformed ones naming no usable brand or region."""
    events: list[dict[str, Any]] = []
    for brand in BRANDS:
        for region in REGIONS_SENT:
            event = make_event(tenant_id=brand, region=region, player_id=f"p-{brand}-{region}")
            event["payload"]["stake_minor"] = "not a number"
            events.append(event)
    malformed = [make_event(region="EU"), make_event(tenant_id=7, region="UK"),
                 make_event(tenant_id="b1"), make_event(tenant_id="b2", region=["EU"])]
    del malformed[0]["tenant_id"], malformed[2]["region"]
    events += malformed
    sent = [Sent(e["event_id"], e.get("tenant_id") if isinstance(e.get("tenant_id"), str)
                 else None, e.get("region") if isinstance(e.get("region"), str) else None)
            for e in events]
    return events, sent


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("admin") / "data",
                        regions=",".join(SERVED))
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        limits_of: dict[str, Limits] = {}
        admins: dict[str, tuple[str, dict[str, str]]] = {}
        for limits in CLIENTS:
            admins[limits.name] = register(client, settings.data_dir, limits, ADMIN_SCOPES)
            limits_of[admins[limits.name][0]] = limits
        for limits in (*READERS, CORRUPTED):  # each leaves a token entry and a query entry
            client_id, headers = register(client, settings.data_dir, limits, "analytics:read")
            limits_of[client_id] = limits
            metric = sorted(limits.metrics or {"bets"})[0]
            client.get("/v1/analytics/timeseries", headers=headers, params={
                "metric": metric, "granularity": "1d", "from": "2025-10-23", "to": "2025-10-24"})
        corrupted_id = next(i for i, lim in limits_of.items() if lim is CORRUPTED)
        with sqlite3.connect(settings.data_dir / "meta.sqlite3") as con:
            con.execute("UPDATE clients SET brands = '' WHERE client_id = ?", (corrupted_id,))
        # entries of no registered client: an unauthenticated call, an unknown client's token
        assert client.get("/v1/admin/audit").status_code == 401
        assert client.post("/oauth/token", auth=("cl_00000000000000ff", "x"),
                           data={"grant_type": "client_credentials"}).status_code == 401
        events, sent = rejected_batch()
        receipt = client.post("/v1/events:batch", json=events,
                              headers=admins["all"][1])
        assert receipt.status_code == 202 and receipt.json()["rejected"] == len(events)
        # a limited producer's event for a brand outside it: quarantined under that brand
        outside = make_event(tenant_id="b2", region="EU")
        receipt = client.post("/v1/events:batch", json=[outside],
                              headers=admins["brand-b1"][1])
        assert receipt.json()["rejected"] == 1, receipt.text
        sent.append(Sent(outside["event_id"], "b2", "EU"))
        yield World(client, settings, admins, limits_of, corrupted_id, sent)


# --------------------------------------------------------------------------- expectations


def refused_claim(limits: Limits, filters: Filters) -> str | None:
    """The claim a quarantine listing with these filters breaks (a partner's always, then
    brands, then regions)."""
    if limits.providers is not None:
        return "providers"
    for key, claim, allowed in (("brand_id", "brands", limits.brands),
                                ("region", "regions", limits.regions)):
        if allowed is not None and any(k == key and v not in allowed for k, v in filters):
            return claim
    return None


def visible_quarantine(world: World, limits: Limits, filters: Filters) -> list[str]:
    def admits(value: str | None, key: str, allowed: frozenset[str] | None) -> bool:
        named = {v for k, v in filters if k == key}
        pool = named or allowed
        return pool is None or value in pool

    return [s.event_id for s in world.quarantined
            if admits(s.tenant_id, "brand_id", limits.brands)
            and admits(s.region, "region", limits.regions)]


def _limits(limits: Limits) -> tuple[tuple[str, frozenset[str] | None], ...]:
    return (("brands", limits.brands), ("regions", limits.regions),
            ("metrics", limits.metrics), ("providers", limits.providers))


def unlimited(limits: Limits) -> bool:
    return all(limit is None for _, limit in _limits(limits))


def first_limit(limits: Limits) -> str:
    return next(claim for claim, limit in _limits(limits) if limit is not None)


def visible_actors(world: World, limits: Limits) -> set[str] | None:
    """The client ids whose entries this admin reads (None: every entry)."""
    if unlimited(limits):
        return None

    def within(theirs: frozenset[str] | None, ours: frozenset[str] | None) -> bool:
        return ours is None or (theirs is not None and theirs <= ours)

    own = world.admins[limits.name][0]
    return {own} | {client_id for client_id, theirs in world.limits_of.items()
                    if client_id != world.corrupted_id  # its stored limit is unknown
                    and within(theirs.brands, limits.brands)
                    and within(theirs.regions, limits.regions)
                    and within(theirs.metrics, limits.metrics)
                    and within(theirs.providers, limits.providers)}


def log_entries(world: World) -> list[dict[str, Any]]:
    path = world.settings.data_dir / "audit" / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()]


def walk(world: World, route: str, headers: dict[str, str], params: dict[str, Any],
         limit: int) -> list[dict[str, Any]]:
    """Every item of a listing, following ``next_cursor`` to the end."""
    items: list[dict[str, Any]] = []
    cursor = None
    for _ in range(1000):
        page = world.client.get(route, headers=headers, params={
            **params, "limit": limit, **({"cursor": cursor} if cursor else {})})
        assert page.status_code == 200, page.text
        body = page.json()
        items += body["items"]
        cursor = body["next_cursor"]
        # the scope is applied before the page is cut: a page is short only at the end
        assert len(body["items"]) == limit if cursor else len(body["items"]) <= limit
        if cursor is None:
            return items
    raise AssertionError("the cursor never ended")


# --------------------------------------------------------------------------- the matrix


QUARANTINE_CELLS = [(lim, f) for lim in CLIENTS for f in FILTERS]


def _params(filters: Filters) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key, value in filters:
        out.setdefault(key, []).append(value)
    return out


@pytest.mark.parametrize("limits", CLIENTS, ids=lambda lim: lim.name)
def test_quarantine_matrix(world: World, limits: Limits) -> None:
    """Every filter set: exactly the entries of the admin's brands and regions, in order,
    through pages of 3 — or a 403 naming the claim."""
    headers = world.admins[limits.name][1]
    for filters in FILTERS:
        claim = refused_claim(limits, filters)
        if claim is not None:
            r = world.client.get("/v1/admin/quarantine", headers=headers,
                                 params=_params(filters))
            assert assert_problem(r, 403)["claim"] == claim, (limits.name, filters)
            continue
        items = walk(world, "/v1/admin/quarantine", headers, _params(filters), limit=3)
        expected = visible_quarantine(world, limits, filters)
        assert [item["event_id"] for item in items] == expected, (limits.name, filters)


def test_the_quarantine_cells_are_not_trivial(world: World) -> None:
    """The tables leave every admin something to see and something hidden (but the one
    without limits), so the matrix can tell a leak from a confinement."""
    everything = len(world.quarantined)
    for limits in (lim for lim in CLIENTS if lim.providers is None):  # partners: 403
        seen = len(visible_quarantine(world, limits, ()))
        assert 0 < seen <= everything and (seen < everything) == (
            limits.brands is not None or limits.regions is not None), limits.name


@pytest.mark.parametrize("limits", CLIENTS, ids=lambda lim: lim.name)
def test_audit_matrix(world: World, limits: Limits) -> None:
    """Exactly the entries of calls inside the admin's limits, through pages of 7."""
    client_id, headers = world.admins[limits.name]
    items = walk(world, "/v1/admin/audit", headers, {}, limit=7)
    written = log_entries(world)[:-1]  # the last line is the last page's own entry
    actors = visible_actors(world, limits)
    expected = [e for e in written
                if actors is None or (e["actor"] or {}).get("client_id") in actors]
    assert [e["seq"] for e in items] == [e["seq"] for e in expected], limits.name
    assert items == expected  # as written, so the reader can check hashes
    if actors is not None:  # the entries of others it reads are all of limits inside its own
        others = {e["actor"]["client_id"] for e in items} - {client_id}
        assert others <= actors and world.corrupted_id not in others


def test_the_audit_cells_are_not_trivial(world: World) -> None:
    """Some limited admins read other clients' entries, and none reads those of no client."""
    readers_seen = {lim.name: len((visible_actors(world, lim) or set()) - {
        world.admins[lim.name][0]}) for lim in CLIENTS if not unlimited(lim)}
    assert readers_seen["brand-b1"] >= 1 and readers_seen["regions-uk-latam"] >= 1
    assert readers_seen["b2-latam-rtp-wau"] >= 1 and readers_seen["metrics-ggr-dau-bets"] >= 1
    assert readers_seen["provider-y"] >= 1 and readers_seen["b1b3-provider-z"] >= 1


@pytest.mark.parametrize("limits", CLIENTS, ids=lambda lim: lim.name)
def test_deployment_wide_admin_routes_need_an_admin_without_limits(world: World,
                                                                   limits: Limits) -> None:
    headers = world.admins[limits.name][1]
    listing = world.client.get("/v1/admin/fx-rates", headers=headers)
    assert listing.status_code == 200, listing.text  # reading the rates: any admin
    rate = [{"date": "2025-09-01", "currency": "GBP",
             "rate": f"1.{CLIENTS.index(limits) + 10}"}]
    added = world.client.post("/v1/admin/fx-rates", headers=headers, json=rate)
    verify = world.client.get("/v1/admin/audit/verify", headers=headers)
    after = world.client.get("/v1/admin/fx-rates", headers=headers).json()
    if unlimited(limits):
        assert added.status_code == 200 and added.json()["inserted"] == 1, added.text
        assert verify.status_code == 200 and verify.json()["intact"] is True
        return
    for refused in (added, verify):
        assert assert_problem(refused, 403)["claim"] == first_limit(limits), refused.text
    assert "without limits" in added.json()["detail"]
    assert after == listing.json()  # nothing written
