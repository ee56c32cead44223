"""Every authorisation decision about data, in one place (CONTRACT §6, row-level security).

A client's brands, regions, providers and metrics (``tally client create``) travel in its
tokens as claims and reach this module as a :class:`Principal`. They are hard limits: a
request naming anything outside them is refused with a ``403`` naming the claim, never
answered with a silently empty result, and a request naming nothing is narrowed to them.
Endpoints ask this module and never compare claims themselves:

- :func:`allow_metric` — may this caller read this metric?
- :func:`allow_analysis` — may this caller run funnel, retention or LTV? (the ``metrics``
  claim names them too; omitted means all)
- :func:`confine` — the caller's filters, checked and narrowed to its brands, regions and
  providers and to the regions this deployment serves (every query endpoint: timeseries,
  slice, funnel, retention, LTV);
- :func:`check_event` — may this caller ingest this event (its brand, region and provider)?
- :func:`suppress_small_groups` / :func:`below_min_group` — the per-client minimum group size
  for distinct-player numbers (privacy);
- :func:`confine_rows`, :func:`audit_actors`, :func:`require_unrestricted` — the operator
  (``admin``) routes, which obey the same limits: the quarantine is confined to the caller's
  brands and regions, the audit log to calls provably inside its limits, and deployment-wide
  operations (verifying the whole log, setting FX rates) need an admin with no limit at all.

**Partners.** A client limited to ``providers`` (a game studio) sees only bets on its
providers' games, across every brand it may see. The confinement is a ``provider_id`` filter
(:func:`confine` adds it, and refuses one naming another provider), so it can hold only for
a metric every event of which carries a ``provider_id`` — a metric made of bets, which the
catalog says by giving it the ``provider_id`` dimension (:func:`made_of_bets`). Any other
metric (deposits, active players, NGR with its bonuses) and the cohort analyses, which count
players, are ``403`` (claim ``providers``) for a partner, as is the quarantine (whole events
of every kind, with no provider to confine them by).

Regions this deployment does not serve are residency's call (``security/residency.py``:
``403``, or ``421`` pointing at the region's deployment); this module asks it from
:func:`refuse_unserved_regions` (queries) and :func:`check_event` (ingestion) only. The
served regions are a ``ServedRegions`` that carries the other regions' endpoints, so the
``endpoints`` arguments below are needed only to override them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tally.config_values import NO_ENDPOINTS
from tally.errors import Forbidden, MisdirectedRequest, UnknownMetric
from tally.security.clients import ANALYSES, ANALYSIS_METRICS, Client
from tally.security.residency import query_error, refusal
from tally.security.tokens import Principal
from tally.semantic.catalog import METRICS, Kind, Metric

Filters = dict[str, tuple[str, ...]]
BRAND_KEY, REGION_KEY, PROVIDER_KEY = "brand_id", "region", "provider_id"
SUPPRESSED = "suppressed"  # the flag on a cell whose value was withheld


# --------------------------------------------------------------------------- queries


def allow_metric(principal: Principal, name: str | None) -> Metric:
    """The catalog metric ``name`` if the caller may read it: ``400`` when no such metric
    exists, ``403`` when it is outside the caller's metrics (claim ``metrics``) or, for a
    partner, not made of bets (claim ``providers``)."""
    metric = METRICS.get(name or "")
    if metric is None:
        raise UnknownMetric(f"unknown metric {name!r} (see GET /v1/metrics)", metric=name)
    if principal.metrics is not None and metric.name not in principal.metrics:
        raise Forbidden(f"metric {metric.name!r} is outside this client's metrics",
                        claim="metrics")
    if principal.providers is not None and not made_of_bets(metric):
        raise Forbidden(f"metric {metric.name!r} is not made of bets alone, so it cannot be "
                        "confined to this client's providers (a partner reads the metrics of "
                        f"bets: {', '.join(sorted(_bet_metrics()))})", claim="providers")
    return metric


def made_of_bets(metric: Metric) -> bool:
    """Whether every event ``metric`` reads is a bet, i.e. carries a ``provider_id``, so that
    a ``provider_id`` filter confines all of it. The catalog gives a metric the
    ``provider_id`` dimension exactly then (NGR, with its bonuses, has none)."""
    return PROVIDER_KEY in metric.dimensions


def _bet_metrics() -> frozenset[str]:
    return frozenset(name for name, metric in METRICS.items() if made_of_bets(metric))


def allow_analysis(principal: Principal, name: str) -> None:
    """May the caller run the analysis ``name`` (funnel, retention, ltv)? The ``metrics``
    claim names the analyses a client may run (omitted: all): ``403`` (claim ``metrics``)
    when it does not name this one. A partner may run none: they count players and their
    deposits, not bets (``403``, claim ``providers``). LTV also needs its metric:
    :func:`allow_metric` on ``ggr`` or ``ngr``, whichever it asks for."""
    if principal.metrics is not None and name not in principal.metrics:
        raise Forbidden(f"the {name} analysis is outside this client's metrics (the claim "
                        f"names the analyses a client may run: {', '.join(ANALYSES)})",
                        claim="metrics")
    if principal.providers is not None:
        raise Forbidden(f"the {name} analysis counts players, not bets, so it cannot be "
                        "confined to this client's providers", claim="providers")


def visible_metrics(principal: Principal) -> frozenset[str] | None:
    """The metrics the caller may see listed (None: every metric)."""
    if principal.providers is None:
        return principal.metrics
    bets = _bet_metrics()
    return bets if principal.metrics is None else bets & principal.metrics


def visible_analyses(principal: Principal) -> tuple[str, ...]:
    """The analyses the caller may run, in :data:`ANALYSES` order: those its ``metrics``
    claim names (all when omitted; none for a partner), an analysis of metrics (LTV) only
    if the caller may also read one of them."""
    if principal.providers is not None:
        return ()
    metrics = principal.metrics
    if metrics is None:
        return ANALYSES
    runnable = []
    for name in ANALYSES:
        needed = ANALYSIS_METRICS.get(name, ())
        if name in metrics and (not needed or any(m in metrics for m in needed)):
            runnable.append(name)
    return tuple(runnable)


def confine(filters: Mapping[str, tuple[str, ...]], principal: Principal,
            served_regions: frozenset[str],
            endpoints: Mapping[str, str] = NO_ENDPOINTS) -> Filters:
    """``filters`` checked against the caller's providers, brands and regions and this
    deployment's regions, then narrowed to them: a provider, brand or region filter naming
    anything outside is a ``403`` naming the claim (``providers``, ``brands``, ``regions`` or
    ``served regions``; ``421`` for a region ``endpoints`` says another deployment serves);
    without such a filter the answer is restricted to everything the caller may see. Because
    the result always carries the restriction, a ``group_by``/``dim`` on ``brand_id``,
    ``region`` or ``provider_id`` can only produce groups inside the limits."""
    for claim, limit in (("brands", principal.brands), ("providers", principal.providers)):
        if limit is not None and not limit:
            # tokens never carry an empty limit (tokens.principal_from); were one to get here,
            # the narrowing below would add an empty, i.e. absent, filter: everything
            raise Forbidden(f"this client's {claim} limit is empty: it may read nothing",
                            claim=claim)
    confined = dict(filters)
    brands = confined.get(BRAND_KEY, ())
    regions = confined.get(REGION_KEY, ())
    providers = confined.get(PROVIDER_KEY, ())
    _refuse_outside(PROVIDER_KEY, providers, principal.providers, "providers")
    _refuse_outside(BRAND_KEY, brands, principal.brands, "brands")
    _refuse_outside(REGION_KEY, regions, principal.regions, "regions")
    refuse_unserved_regions(regions, served_regions, endpoints)
    if not providers and principal.providers is not None:
        confined[PROVIDER_KEY] = tuple(sorted(principal.providers))
    if not brands and principal.brands is not None:
        confined[BRAND_KEY] = tuple(sorted(principal.brands))
    if not regions:
        confined[REGION_KEY] = visible_regions(principal, served_regions)
    return confined


def _refuse_outside(key: str, values: Iterable[str], allowed: frozenset[str] | None,
                    claim: str) -> None:
    if allowed is None:
        return
    for value in values:
        if value not in allowed:
            raise Forbidden(f"{key} {value!r} is outside this client's {claim}", claim=claim)


def refuse_unserved_regions(regions: Iterable[str], served_regions: frozenset[str],
                            endpoints: Mapping[str, str] = NO_ENDPOINTS) -> None:
    """A query naming a region this deployment does not serve is refused (residency)."""
    error = query_error(regions, served_regions, endpoints)
    if error is not None:
        raise error


def visible_regions(principal: Principal, served_regions: frozenset[str]) -> tuple[str, ...]:
    """The regions an unfiltered query of this caller reads: its regions that are served
    here (a client may hold regions another deployment serves)."""
    allowed = served_regions if principal.regions is None else principal.regions & served_regions
    if not allowed and principal.regions:  # all served elsewhere: 421 if we know where
        elsewhere = query_error(sorted(principal.regions), served_regions)
        if isinstance(elsewhere, MisdirectedRequest):
            raise elsewhere
    if not allowed:
        raise Forbidden("none of this client's regions is served by this deployment "
                        f"(served: {','.join(sorted(served_regions))})",
                        claim="served regions")
    return tuple(sorted(allowed))


# --------------------------------------------------------------------------- ingestion


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why one event may not be ingested; ``residency`` refusals are stored nowhere."""

    reason: str
    residency: bool = False


def check_event(tenant_id: str, region: str, served_regions: frozenset[str],
                brands: frozenset[str] | None, regions: frozenset[str] | None,
                endpoints: Mapping[str, str] = NO_ENDPOINTS, *,
                providers: frozenset[str] | None = None,
                provider_id: str | None = None) -> Refusal | None:
    """The per-event ingestion check: None when the caller may write this brand and region
    — and, for a partner (``providers``), when the event is a bet (it has a ``provider_id``)
    on one of its providers' games: a studio writes nothing else into an operator's data.
    Residency comes first, so an event for a region not served here is looked at no further.
    (Plain arguments rather than a Principal: this runs for every event of every batch.)"""
    unserved = refusal(region, served_regions, endpoints)
    if unserved is not None:
        return Refusal(unserved.reason(), residency=True)
    if regions is not None and region not in regions:
        return Refusal(f"region {region!r} is outside this client's regions")
    if brands is not None and tenant_id not in brands:
        return Refusal(f"tenant_id {tenant_id!r} is outside this client's brands")
    if providers is not None and provider_id not in providers:
        if provider_id is None:
            return Refusal("this client is limited to providers: it may send only bets on "
                           "their games (this event has no provider_id)")
        return Refusal(f"provider_id {provider_id!r} is outside this client's providers")
    return None


# --------------------------------------------------------------------------- operator routes


@dataclass(frozen=True, slots=True)
class RowScope:
    """The rows of an operator listing (the quarantine) a caller may read, by the brand and
    region each row names. On each axis None admits every row, one naming no value included;
    a tuple admits only rows naming one of its values, so a row whose brand (or region) is
    unknown — a malformed event — is then left out: it cannot be shown to be inside."""

    brands: tuple[str, ...] | None
    regions: tuple[str, ...] | None


def confine_rows(principal: Principal, brands: Sequence[str],
                 regions: Sequence[str]) -> RowScope:
    """An operator listing's ``brand_id``/``region`` filters, checked like a query's against
    the caller's brands and regions (``403`` naming the claim for any value outside, never an
    empty page), then narrowed to them. Residency does not apply: the quarantine holds this
    deployment's refusals, those of events for regions served elsewhere included. A partner
    is refused (claim ``providers``): the entries are whole events of every kind — deposits,
    players — and many name no provider, so none can be confined to its providers."""
    if principal.providers is not None:
        raise Forbidden("the quarantine holds rejected events of every kind, which cannot be "
                        "confined to this client's providers: it needs an admin client "
                        "without a providers limit", claim="providers")
    _refuse_outside(BRAND_KEY, brands, principal.brands, "brands")
    _refuse_outside(REGION_KEY, regions, principal.regions, "regions")
    return RowScope(_narrowed(brands, principal.brands), _narrowed(regions, principal.regions))


def _narrowed(named: Sequence[str], allowed: frozenset[str] | None) -> tuple[str, ...] | None:
    if named:
        return tuple(sorted(set(named)))
    return None if allowed is None else tuple(sorted(allowed))


def _limits(principal: Principal | Client) -> tuple[tuple[str, frozenset[str] | None], ...]:
    return (("brands", principal.brands), ("regions", principal.regions),
            ("metrics", principal.metrics), ("providers", principal.providers))


def require_unrestricted(principal: Principal, operation: str) -> None:
    """Deployment-wide operations — verifying the whole audit log, setting FX rates (which
    change every brand's money answers) — are for an admin with no brand, region, metric or
    provider limit: ``403`` naming the first limit the caller has."""
    for claim, limit in _limits(principal):
        if limit is not None:
            raise Forbidden(f"{operation} concerns every brand, region, metric and provider; "
                            f"this client is limited to {claim} {','.join(sorted(limit))}, so "
                            "it needs an admin client without limits", claim=claim)


def audit_actors(principal: Principal, registered: Iterable[Client]) -> frozenset[str] | None:
    """The clients whose audit entries this admin may read (None: every entry). An admin with
    no limit reads the whole log. Any other reads its own client's entries and those of the
    ``registered`` clients whose brands, regions, metrics and providers each lie within its
    own (for a partner: partners of its providers only): all such a client may ever ask is
    inside this admin's limits, so its calls show nothing outside them. Entries of no client
    (unauthenticated calls, the log's own events) and of clients not registered here (an
    external issuer's) are therefore for an admin without limits."""
    if all(limit is None for _, limit in _limits(principal)):
        return None
    inside = {client.client_id for client in registered
              if all(_within(theirs, ours) for (_, theirs), (_, ours)
                     in zip(_limits(client), _limits(principal), strict=True))}
    return frozenset({principal.client_id, *inside})


def _within(theirs: frozenset[str] | None, ours: frozenset[str] | None) -> bool:
    """Whether a limit lies within another: anything within no limit, nothing but a subset
    within a limit (no limit — every value — is within none)."""
    return ours is None or (theirs is not None and theirs <= ours)


# --------------------------------------------------------------------------- privacy


def below_min_group(count: int | None, principal: Principal) -> bool:
    """Whether a distinct-player count must be withheld from this caller: a positive count
    under its minimum group size. Zero is shown: an empty cell describes nobody."""
    k = principal.min_group_size
    return k is not None and count is not None and 0 < count < k


def may_suppress(metric: Metric, principal: Principal) -> bool:
    """Whether an answer of ``metric`` to ``principal`` can withhold values (and so flag
    them ``suppressed``): distinct-player counts, to a client with a minimum group size."""
    return principal.min_group_size is not None and metric.kind is Kind.DISTINCT


def suppress_small_groups(metric: Metric, rows: list[dict[str, Any]], field: str,
                          principal: Principal, *, ranked_by: str | None = None
                          ) -> list[dict[str, Any]]:
    """Rows of an answer with every distinct-player value below the caller's minimum group
    size replaced by ``null`` and flagged ``"suppressed": true``. Other metrics pass through.

    ``ranked_by`` (the slice dimension): rows are ranked by value, so withheld rows move to
    the end ordered by that key, like every other null, and their order leaks nothing."""
    if not may_suppress(metric, principal):
        return rows
    shown: list[dict[str, Any]] = []
    withheld: list[dict[str, Any]] = []
    for row in rows:
        value = row.get(field)
        if isinstance(value, int) and below_min_group(value, principal):
            row = {**row, field: None, SUPPRESSED: True}
            if ranked_by is not None:
                withheld.append(row)
                continue
        shown.append(row)
    withheld.sort(key=lambda row: str(row[ranked_by or ""]))
    return shown + withheld
