"""A query stored for later (an export job's, an embed's): ``{"kind": ..., ...}`` as the body
of ``POST /v1/exports`` or ``POST /v1/embeds`` gives it, checked by the request model of the
route it names — the same parameters, the same errors — and kept as
``{"kind", "params"}`` (``insights/kinds.py`` plans it)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from tally.api.models import (
    FunnelBody,
    LtvQuery,
    RetentionBody,
    SliceQuery,
    TimeseriesQuery,
    validated,
)
from tally.errors import InvalidParameter

# each kind's request model: its route's query parameters, or its body
QUERY_MODELS: dict[str, type[BaseModel]] = {
    "timeseries": TimeseriesQuery, "slice": SliceQuery, "ltv": LtvQuery,
    "funnel": FunnelBody, "retention": RetentionBody}
BODIES = ("funnel", "retention")  # kinds whose route takes a JSON body (kept as JSON)
KINDS = ", ".join(QUERY_MODELS)


def stored_query(raw: dict[str, Any], drop: tuple[str, ...]) -> dict[str, Any]:
    """``raw`` checked as its route would check it, without the parameters in ``drop``
    (an export pages through every row: no ``limit``, no ``cursor``)."""
    query = dict(raw)
    kind = query.pop("kind", None)
    if not isinstance(kind, str) or kind not in QUERY_MODELS:
        raise InvalidParameter(f"query.kind must be one of {KINDS}", parameter="query.kind")
    checked = validated(QUERY_MODELS[kind], query, "query")
    params = checked if kind in BODIES else {
        k: str(v) for k, v in checked.items() if v is not None and k not in drop}
    return {"kind": kind, "params": params}
