"""Residency: the regions this deployment serves, and where the others are served.

The one place that decides what happens to a region this deployment does not serve (CONTRACT
§6); :mod:`tally.security.policy` asks it for queries and for ingested events.

- A query naming such a region is ``421 Misdirected Request`` with ``Link: <endpoint>;
  rel="alternate"`` and an ``endpoints`` member when ``TALLY_REGION_ENDPOINTS`` names the
  region's deployment, else ``403`` (nothing to point at).
- An ingested event for it is rejected on its own, with a reason naming the endpoint when
  there is one; the rest of the batch is unaffected, so a batch is never ``421``.

:class:`~tally.config_values.ServedRegions` is a ``frozenset`` of the served regions that also
carries the endpoints, so everything that already takes "the served regions" learns where the
others are without another argument.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from tally.config_values import NO_ENDPOINTS, ServedRegions
from tally.errors import Forbidden, MisdirectedRequest, UserError


def _endpoints(served: frozenset[str], endpoints: Mapping[str, str]) -> Mapping[str, str]:
    if endpoints or not isinstance(served, ServedRegions):
        return endpoints
    return served.endpoints


def _served_list(served: frozenset[str]) -> str:
    return ",".join(sorted(served))


@dataclass(frozen=True, slots=True)
class Refusal:
    """A region this deployment does not serve; ``endpoint`` is where it is served, if known."""

    region: str
    endpoint: str | None
    served: frozenset[str]

    def reason(self) -> str:
        """Why an event for the region is not stored here."""
        where = f"; send it to {self.endpoint}" if self.endpoint else ""
        return (f"region {self.region!r} is not served by this deployment "
                f"(served: {_served_list(self.served)}){where}")


def refusal(region: str, served: frozenset[str],
            endpoints: Mapping[str, str] = NO_ENDPOINTS) -> Refusal | None:
    """None when ``region`` is served here, else the refusal. ``endpoints`` defaults to those
    ``served`` carries (a :class:`ServedRegions`)."""
    if region in served:
        return None
    return Refusal(region, _endpoints(served, endpoints).get(region), served)


def query_error(regions: Iterable[str], served: frozenset[str],
                endpoints: Mapping[str, str] = NO_ENDPOINTS) -> UserError | None:
    """The error for a query that must read ``regions``, or None when all are served here:
    ``421`` with a ``Link`` per endpoint when every region outside has a known endpoint,
    else ``403`` naming the first region served nowhere we know of."""
    refused = [r for r in (refusal(region, served, endpoints)
                           for region in dict.fromkeys(regions)) if r is not None]
    if not refused:
        return None
    unknown = [r.region for r in refused if r.endpoint is None]
    if unknown:
        return Forbidden(f"region {unknown[0]!r} is outside this deployment's regions "
                         f"(served: {_served_list(served)})", claim="served regions")
    links = {r.region: r.endpoint for r in refused if r.endpoint}
    first = refused[0]
    error = MisdirectedRequest(
        f"region {first.region!r} is served by another deployment ({first.endpoint}), not "
        f"this one (served: {_served_list(served)}); ask that deployment",
        claim="served regions", endpoints=links)
    error.headers = {"Link": ", ".join(
        f'<{url}>; rel="alternate"; title="{region}"' for region, url in links.items())}
    return error
