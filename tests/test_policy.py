"""The policy module (``security/policy.py``): every authorisation decision about data.

Unit tests of its functions, the proof that grouping cannot escape the caller's limits, and a
check that no other module takes these decisions itself. The full cross product of clients,
endpoints, metrics and filters is in ``test_policy_matrix.py``.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

import pytest

from tally.config_values import ServedRegions
from tally.errors import BadRequest, Forbidden, MisdirectedRequest
from tally.security import policy
from tally.security.tokens import Principal
from tally.semantic.catalog import METRICS
from tests.cells import player_day

SRC = Path(__file__).resolve().parents[1] / "src" / "tally"
SERVED = frozenset({"EU", "UK", "LATAM"})


def principal(brands: set[str] | None = None, regions: set[str] | None = None,
              metrics: set[str] | None = None, min_group_size: int | None = None,
              providers: set[str] | None = None) -> Principal:
    def frozen(items: set[str] | None) -> frozenset[str] | None:
        return None if items is None else frozenset(items)

    return Principal("cl_test", frozenset({"analytics:read"}), frozen(brands), frozen(regions),
                     frozen(metrics), "jti", min_group_size, providers=frozen(providers))


# --------------------------------------------------------------------------- metrics


def test_allow_metric_returns_the_catalog_metric():
    assert policy.allow_metric(principal(), "ggr") is METRICS["ggr"]
    assert policy.allow_metric(principal(metrics={"ggr"}), "ggr") is METRICS["ggr"]


def test_allow_metric_refuses_a_metric_outside_the_claim_with_403_naming_it():
    with pytest.raises(Forbidden) as refused:
        policy.allow_metric(principal(metrics={"ggr"}), "dau")
    assert refused.value.status == 403
    assert refused.value.extra == {"claim": "metrics"}
    assert "'dau'" in refused.value.detail


def test_an_unknown_metric_is_400_even_for_a_limited_client():
    with pytest.raises(BadRequest) as unknown:
        policy.allow_metric(principal(metrics={"ggr"}), "ggr_typo")
    assert unknown.value.status == 400 and unknown.value.extra == {"metric": "ggr_typo"}


# --------------------------------------------------------------------------- confine


def test_confine_narrows_an_unfiltered_query_to_the_claims_and_served_regions():
    assert policy.confine({}, principal(), SERVED) == {"region": ("EU", "LATAM", "UK")}
    limited = principal(brands={"b2", "b1"}, regions={"UK"})
    assert policy.confine({"game_id": ("g1",)}, limited, SERVED) == {
        "game_id": ("g1",), "brand_id": ("b1", "b2"), "region": ("UK",)}


def test_confine_keeps_filters_inside_the_claims_as_they_are():
    limited = principal(brands={"b1", "b2"}, regions={"EU", "UK"})
    filters = {"brand_id": ("b2",), "region": ("UK", "EU")}
    assert policy.confine(filters, limited, SERVED) == filters


@pytest.mark.parametrize(("limits", "filters", "claim"), [
    ({"brands": {"b1"}}, {"brand_id": ("b2",)}, "brands"),
    ({"brands": {"b1"}}, {"brand_id": ("b1", "b2")}, "brands"),  # partly outside: still 403
    ({"regions": {"EU"}}, {"region": ("UK",)}, "regions"),
    ({"regions": {"EU"}}, {"region": ("NA",)}, "regions"),  # the client's claim comes first
    ({}, {"region": ("NA",)}, "served regions"),
    ({"regions": {"EU", "NA"}}, {"region": ("NA",)}, "served regions"),
    ({"regions": {"NA"}}, {}, "served regions"),  # nothing of this client is served here
    ({"regions": {"NA"}}, {"brand_id": ("b1",)}, "served regions"),
    # an empty limit (never in a token: tokens.principal_from refuses it) reads nothing, and
    # is never narrowed to an empty, i.e. absent, filter
    ({"brands": set()}, {}, "brands"),
    ({"regions": set()}, {}, "served regions"),
])
def test_confine_refuses_with_403_naming_the_claim(limits, filters, claim):
    with pytest.raises(Forbidden) as refused:
        policy.confine(filters, principal(**limits), SERVED)
    assert refused.value.extra["claim"] == claim


def test_a_client_holding_regions_served_elsewhere_reads_those_served_here():
    """Not a 403 on every unfiltered query: the regions it holds here are what it sees."""
    assert policy.confine({}, principal(regions={"EU", "NA"}), SERVED) == {"region": ("EU",)}


def test_confine_asks_residency_about_regions_served_elsewhere():
    served = ServedRegions(SERVED, {"NA": "https://na.example.com"})
    with pytest.raises(MisdirectedRequest) as elsewhere:
        policy.confine({"region": ("NA",)}, principal(), served)
    assert elsewhere.value.status == 421
    assert elsewhere.value.extra["claim"] == "served regions"


# --------------------------------------------------------------------------- ingestion


@pytest.mark.parametrize(("brands", "regions", "tenant", "region", "reason", "residency"), [
    (None, None, "b1", "EU", None, False),
    ({"b1"}, {"EU"}, "b1", "EU", None, False),
    ({"b1"}, None, "b2", "EU", "tenant_id 'b2' is outside this client's brands", False),
    (None, {"EU"}, "b1", "UK", "region 'UK' is outside this client's regions", False),
    (None, None, "b1", "NA", "region 'NA' is not served by this deployment", True),
    ({"b1"}, {"EU"}, "b2", "NA", "region 'NA' is not served by this deployment", True),
])
def test_check_event(brands, regions, tenant, region, reason, residency):
    refusal = policy.check_event(tenant, region, SERVED,
                                 None if brands is None else frozenset(brands),
                                 None if regions is None else frozenset(regions))
    if reason is None:
        assert refusal is None
    else:
        assert refusal is not None and refusal.reason.startswith(reason)
        assert refusal.residency is residency


# --------------------------------------------------------------------------- operator routes


@pytest.mark.parametrize(("limits", "brands", "regions", "scope"), [
    ({}, (), (), (None, None)),  # no limit: every row, those naming no brand/region included
    ({}, ("b2", "b1", "b2"), ("NA",), (("b1", "b2"), ("NA",))),  # no residency check here
    ({"brands": {"b1", "b2"}}, (), (), (("b1", "b2"), None)),
    ({"brands": {"b1", "b2"}}, ("b2",), (), (("b2",), None)),
    ({"regions": {"EU", "NA"}}, (), ("NA",), (None, ("NA",))),
    ({"brands": {"b1"}, "regions": {"UK"}}, (), (), (("b1",), ("UK",))),
    ({"metrics": {"ggr"}}, (), (), (None, None)),  # the quarantine has no metrics
])
def test_confine_rows_narrows_to_the_filters_or_the_limits(limits, brands, regions, scope):
    assert policy.confine_rows(principal(**limits), brands, regions) == policy.RowScope(*scope)


@pytest.mark.parametrize(("limits", "brands", "regions", "claim"), [
    ({"brands": {"b1"}}, ("b2",), (), "brands"),
    ({"brands": {"b1"}}, ("b1", "b2"), (), "brands"),  # partly outside: 403, not narrowed
    ({"regions": {"EU"}}, (), ("UK",), "regions"),
    ({"brands": {"b1"}, "regions": {"EU"}}, ("b2",), ("UK",), "brands"),
])
def test_confine_rows_refuses_filters_outside_the_limits(limits, brands, regions, claim):
    with pytest.raises(Forbidden) as refused:
        policy.confine_rows(principal(**limits), brands, regions)
    assert refused.value.extra == {"claim": claim}


@pytest.mark.parametrize(("limits", "claim"), [
    ({}, None),
    ({"brands": {"b1"}}, "brands"),
    ({"regions": {"EU"}}, "regions"),
    ({"metrics": {"ggr"}}, "metrics"),
    ({"regions": {"EU"}, "metrics": {"ggr"}}, "regions"),
    ({"providers": {"studio_x"}}, "providers"),
    ({"metrics": {"ggr"}, "providers": {"studio_x"}}, "metrics"),
])
def test_require_unrestricted_names_the_first_limit(limits, claim):
    if claim is None:
        policy.require_unrestricted(principal(**limits), "setting FX rates")
        return
    with pytest.raises(Forbidden) as refused:
        policy.require_unrestricted(principal(**limits), "setting FX rates")
    assert refused.value.extra == {"claim": claim}
    assert refused.value.detail.startswith("setting FX rates concerns every brand")


def test_audit_actors_are_the_admin_itself_and_clients_inside_its_limits():
    from tally.security.clients import Client

    def client(name: str, brands: set[str] | None = None, regions: set[str] | None = None,
               metrics: set[str] | None = None, providers: set[str] | None = None) -> Client:
        frozen = [None if s is None else frozenset(s) for s in (brands, regions, metrics)]
        return Client(name, name, frozenset({"analytics:read"}), *frozen,
                      providers=None if providers is None else frozenset(providers))

    registered = [client("b1", {"b1"}), client("b1-eu", {"b1"}, {"EU"}),
                  client("b1b2", {"b1", "b2"}), client("eu", regions={"EU"}),
                  client("b1-ggr", {"b1"}, metrics={"ggr"}), client("all"),
                  client("studio-x", providers={"studio_x"}),
                  client("b1-studio-xy", {"b1"}, providers={"studio_x", "studio_y"})]
    assert policy.audit_actors(principal(), registered) is None
    assert policy.audit_actors(principal(brands={"b1"}), registered) == {
        "cl_test", "b1", "b1-eu", "b1-ggr", "b1-studio-xy"}  # a partner of b1 is inside b1
    assert policy.audit_actors(principal(brands={"b1"}, metrics={"ggr"}), registered) == {
        "cl_test", "b1-ggr"}
    assert policy.audit_actors(principal(regions={"EU"}), registered) == {
        "cl_test", "b1-eu", "eu"}
    assert policy.audit_actors(principal(metrics={"ggr", "dau"}), registered) == {
        "cl_test", "b1-ggr"}
    assert policy.audit_actors(principal(brands={"b9"}), registered) == {"cl_test"}
    # a partner admin reads its fellow partners of its providers, never a client of all
    assert policy.audit_actors(principal(providers={"studio_x"}), registered) == {
        "cl_test", "studio-x"}
    assert policy.audit_actors(principal(providers={"studio_x", "studio_y"}), registered) == {
        "cl_test", "studio-x", "b1-studio-xy"}


# --------------------------------------------------------------------------- partners, analyses

BET_METRICS = {"stake", "wins", "ggr", "rtp", "bets", "settle_lag_p95"}  # CONTRACT §6


def test_the_metrics_made_of_bets_are_the_contracts_list():
    """A partner's confinement is a provider_id filter, so it may read exactly the metrics
    every event of which is a bet: the catalog rule (a provider_id dimension) gives the
    contract's list, and each such metric reads nothing but bet events."""
    assert {name for name, m in METRICS.items() if policy.made_of_bets(m)} == BET_METRICS
    for name in BET_METRICS:
        assert all(measure.event_type.startswith("bet.") for measure in METRICS[name].measures)


@pytest.mark.parametrize("metric", sorted(METRICS))
def test_a_partner_reads_the_metrics_of_bets_and_no_other(metric):
    partner = principal(providers={"studio_x"})
    if metric in BET_METRICS:
        assert policy.allow_metric(partner, metric) is METRICS[metric]
        return
    with pytest.raises(Forbidden) as refused:
        policy.allow_metric(partner, metric)
    assert refused.value.extra == {"claim": "providers"}
    assert f"{metric!r} is not made of bets" in refused.value.detail


def test_the_metrics_claim_is_named_before_the_providers_claim():
    with pytest.raises(Forbidden) as refused:
        policy.allow_metric(principal(providers={"studio_x"}, metrics={"rtp"}), "deposits")
    assert refused.value.extra == {"claim": "metrics"}


@pytest.mark.parametrize(("limits", "allowed", "claim"), [
    ({}, ("funnel", "retention", "ltv"), None),  # an omitted claim: every analysis
    ({"metrics": {"ggr", "funnel"}}, ("funnel",), "metrics"),
    ({"metrics": {"retention", "ltv", "ngr"}}, ("retention", "ltv"), "metrics"),
    ({"metrics": {"ggr"}}, (), "metrics"),  # metrics, but no analysis
    ({"providers": {"studio_x"}}, (), "providers"),  # a partner counts bets, not players
    ({"providers": {"studio_x"}, "metrics": {"funnel"}}, (), "providers"),
])
def test_allow_analysis(limits, allowed, claim):
    for name in ("funnel", "retention", "ltv"):
        if name in allowed:
            policy.allow_analysis(principal(**limits), name)
            continue
        with pytest.raises(Forbidden) as refused:
            policy.allow_analysis(principal(**limits), name)
        expected = "metrics" if "metrics" in limits and name not in limits["metrics"] else claim
        assert refused.value.extra == {"claim": expected}, name


@pytest.mark.parametrize(("limits", "metrics", "analyses"), [
    ({}, None, ("funnel", "retention", "ltv")),
    ({"metrics": {"ggr", "funnel", "ltv"}}, {"ggr", "funnel", "ltv"}, ("funnel", "ltv")),
    # LTV without ggr or ngr cannot run: it is not listed
    ({"metrics": {"rtp", "ltv", "retention"}}, {"rtp", "ltv", "retention"}, ("retention",)),
    ({"providers": {"studio_x"}}, BET_METRICS, ()),
    ({"providers": {"studio_x"}, "metrics": {"rtp", "dau", "funnel", "ggr", "ltv"}},
     {"rtp", "ggr"}, ()),
])
def test_visible_metrics_and_analyses(limits, metrics, analyses):
    assert policy.visible_metrics(principal(**limits)) == metrics
    assert policy.visible_analyses(principal(**limits)) == analyses


def test_confine_narrows_a_partner_to_its_providers_across_its_brands():
    partner = principal(providers={"studio_y", "studio_x"})
    assert policy.confine({}, partner, SERVED) == {
        "provider_id": ("studio_x", "studio_y"), "region": ("EU", "LATAM", "UK")}
    assert policy.confine({"provider_id": ("studio_y",)}, partner, SERVED) == {
        "provider_id": ("studio_y",), "region": ("EU", "LATAM", "UK")}
    limited = principal(brands={"b1"}, providers={"studio_x"})
    assert policy.confine({"game_id": ("g1",)}, limited, SERVED) == {
        "game_id": ("g1",), "provider_id": ("studio_x",), "brand_id": ("b1",),
        "region": ("EU", "LATAM", "UK")}
    # a client without providers is not narrowed: its provider filter stays as sent
    assert policy.confine({"provider_id": ("any",)}, principal(), SERVED)["provider_id"] == (
        "any",)


@pytest.mark.parametrize(("limits", "filters", "claim"), [
    ({"providers": {"studio_x"}}, {"provider_id": ("studio_y",)}, "providers"),
    ({"providers": {"studio_x"}}, {"provider_id": ("studio_x", "studio_y")}, "providers"),
    # providers come before brands and regions
    ({"providers": {"studio_x"}, "brands": {"b1"}},
     {"provider_id": ("studio_y",), "brand_id": ("b2",)}, "providers"),
    ({"providers": {"studio_x"}, "brands": {"b1"}}, {"brand_id": ("b2",)}, "brands"),
    ({"providers": set()}, {}, "providers"),  # an empty limit never widens to all
])
def test_confine_refuses_a_partner_outside_its_providers(limits, filters, claim):
    with pytest.raises(Forbidden) as refused:
        policy.confine(filters, principal(**limits), SERVED)
    assert refused.value.extra["claim"] == claim


@pytest.mark.parametrize(("providers", "provider_id", "reason"), [
    (None, None, None),
    (None, "studio_y", None),
    ({"studio_x"}, "studio_x", None),
    ({"studio_x"}, "studio_y", "provider_id 'studio_y' is outside this client's providers"),
    ({"studio_x"}, None, "this client is limited to providers: it may send only bets"),
])
def test_check_event_holds_a_partner_to_bets_on_its_providers(providers, provider_id, reason):
    refusal = policy.check_event("b1", "EU", SERVED, None, None,
                                 providers=None if providers is None else frozenset(providers),
                                 provider_id=provider_id)
    assert (refusal is None) is (reason is None)
    if refusal is not None:
        assert refusal.reason.startswith(reason) and not refusal.residency


def test_a_partner_may_not_read_the_quarantine():
    with pytest.raises(Forbidden) as refused:
        policy.confine_rows(principal(providers={"studio_x"}), (), ())
    assert refused.value.extra == {"claim": "providers"}


# --------------------------------------------------------------------------- over HTTP

DAY = datetime(2025, 10, 23, 9)


@pytest.fixture
def three_brands(client, headers):
    events = [e for brand in ("b1", "b2", "b3") for region in ("EU", "UK", "LATAM")
              for e in player_day(brand, region, f"p-{brand}-{region}", DAY)]
    r = client.post("/v1/events:batch", json=events, headers=headers)
    assert r.status_code == 202 and r.json()["accepted"] == len(events), r.text


def test_group_by_brand_and_region_only_produces_groups_inside_the_limits(client, auth,
                                                                          three_brands):
    limited = auth(scopes="analytics:read", brands="b1,b3", regions="UK,NA")
    everyone = auth(scopes="analytics:read")
    params = {"metric": "bets", "granularity": "1d", "from": "2025-10-23", "to": "2025-10-24",
              "group_by": "brand_id,region"}
    r = client.get("/v1/analytics/timeseries", params=params, headers=limited)
    assert r.status_code == 200, r.text
    assert {(p["brand_id"], p["region"]) for p in r.json()["series"]} == {("b1", "UK"),
                                                                            ("b3", "UK")}
    r = client.get("/v1/analytics/timeseries", params=params, headers=everyone)
    assert len(r.json()["series"]) == 9  # the other groups exist: they were confined away


@pytest.mark.parametrize(("dim", "expected"), [("brand_id", {"b1", "b3"}), ("region", {"UK"})])
def test_slice_dims_only_produce_keys_inside_the_limits(client, auth, three_brands, dim,
                                                        expected):
    limited = auth(scopes="analytics:read", brands="b1,b3", regions="UK")
    r = client.get("/v1/analytics/slice", headers=limited, params={
        "metric": "dau", "dim": dim, "from": "2025-10-23", "to": "2025-10-24"})
    assert r.status_code == 200, r.text
    assert {item[dim] for item in r.json()["items"]} == expected


def test_a_refusal_is_problem_json_naming_the_claim_never_an_empty_answer(client, auth,
                                                                          three_brands):
    limited = auth(scopes="analytics:read", brands="b1")
    r = client.get("/v1/analytics/slice", headers=limited, params={
        "metric": "ggr", "dim": "game_id", "from": "2025-10-23", "to": "2025-10-24",
        "filters": "brand_id:b2"})
    assert r.status_code == 403
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["claim"] == "brands" and "'b2'" in r.json()["detail"]


# --------------------------------------------------------------------------- one module decides


def _sources() -> list[tuple[Path, str]]:
    own = {SRC / "security" / "policy.py", SRC / "security" / "residency.py"}
    return [(p, p.read_text()) for p in sorted(SRC.rglob("*.py")) if p not in own]


def test_no_other_module_refuses_on_claims():
    """Claim refusals (a ``claim=`` member, the wording of a limit) exist only in the policy
    module and the residency rules it asks."""
    offenders = [str(p.relative_to(SRC)) for p, text in _sources()
                 if re.search(r"claim\s*=|outside this client", text)]
    assert offenders == []


CLAIM_TEST = re.compile(
    r"\bin\s+(\w+\.)*(principal\.|allowed_)(brands|regions|metrics|providers)\b")
LOOP = re.compile(r"\bfor\s+[\w, ()]+\s+$")  # `for b in principal.brands` iterates, not tests


def test_no_other_module_compares_values_with_the_claims():
    """``x in principal.brands`` and the like belong to the policy module."""
    offenders = [f"{p.relative_to(SRC)}: {line.strip()}" for p, text in _sources()
                 for line in text.splitlines()
                 for match in CLAIM_TEST.finditer(line)
                 if not LOOP.search(line[:match.start()])]
    assert offenders == []


@pytest.mark.parametrize(("line", "flagged"), [
    ("    if region not in ctx.allowed_regions:", True),
    ("    if metric.name not in principal.metrics:", True),
    ("    ok = brand in self.ctx.principal.brands", True),
    ("    if provider_id not in ctx.allowed_providers:", True),
    ("    for brand in principal.brands:", False),
    ("    charged = [b for b in principal.brands]", False),
])
def test_the_claim_comparison_detector(line, flagged):
    found = [m for m in CLAIM_TEST.finditer(line) if not LOOP.search(line[:m.start()])]
    assert bool(found) is flagged
