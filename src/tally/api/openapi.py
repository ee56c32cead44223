"""The OpenAPI 3.1 document: FastAPI's, generated from the routes and their typed models
(``api/models.py``, ``api/answers.py``), completed with what FastAPI cannot see: the
component schemas of the bodies routes read themselves (to keep Tally's strict JSON
decoding), the ``Problem`` schema, and the scrape token of ``/metrics``."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from tally.api.answers import Problem
from tally.api.models import AlertBody, EmbedBody, ExportBody, FunnelBody, RetentionBody
from tally.api.routes.admin import FxRates

DESCRIPTION = (
    "Analytics API for online gaming operators: events in, metrics, funnels, retention and "
    "LTV out, with strict metric semantics (docs/metrics.md). Every error is RFC 9457 "
    "`application/problem+json` with a stable `type` (docs/api.md#problem-types). Unknown "
    "query parameters and body fields are `400 unknown-parameter`, never ignored."
)
# schemas of bodies the routes decode themselves (json_input), documented by their models
BODY_MODELS: tuple[type[BaseModel], ...] = (FunnelBody, RetentionBody, ExportBody,
                                             EmbedBody, AlertBody, FxRates, Problem)
REF = "#/components/schemas/{model}"


def document(app: FastAPI) -> dict[str, Any]:
    doc = get_openapi(title=app.title, version=app.version, openapi_version=app.openapi_version,
                      description=app.description, routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for model in BODY_MODELS:
        schema = model.model_json_schema(ref_template=REF, by_alias=True)
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    for item in doc.get("paths", {}).values():
        for op in item.values():
            for param in op.get("parameters", []):
                param["schema"] = _not_null(param["schema"])
    doc["components"].setdefault("securitySchemes", {})["metricsToken"] = {
        "type": "http", "scheme": "bearer",
        "description": "TALLY_METRICS_TOKEN, when the deployment sets one (else no auth)."}
    return doc


def _not_null(schema: dict[str, Any]) -> dict[str, Any]:
    """A parameter's schema without the ``null`` of an optional model field: a query string or
    header carries text or nothing (absent: the default), never a null."""
    branches = [b for b in schema.get("anyOf", []) if b.get("type") != "null"]
    if "anyOf" not in schema or len(branches) == len(schema["anyOf"]):
        return schema
    rest = {k: v for k, v in schema.items() if k != "anyOf"}
    if len(branches) == 1:
        return {**branches[0], **rest}
    return {**rest, "anyOf": branches}


# The document depends on the routes only (never on settings), and building it takes a few
# hundred milliseconds: built once per process and per set of routes, when the app starts
_BUILT: dict[tuple[Any, ...], dict[str, Any]] = {}


def _code(endpoint: Any) -> Any:
    """What a route runs, the same for each app's copy of a closure (the docs pages and
    assets are made per app): its code object, else the object itself."""
    return getattr(endpoint, "__code__", endpoint)


def install(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            key = (app.title, app.version, tuple(
                (getattr(r, "path", ""), tuple(sorted(getattr(r, "methods", None) or ())),
                 _code(getattr(r, "endpoint", None))) for r in app.routes))
            if key not in _BUILT:
                _BUILT[key] = document(app)
            app.openapi_schema = _BUILT[key]
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
