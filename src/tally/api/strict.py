"""Strict input, one mechanism for every route (CONTRACT §4): a query parameter the route does
not define, or a single-valued one given twice, is ``400 unknown-parameter`` /
``invalid-parameter`` naming it; an ``Accept`` that no media type the route answers with
satisfies is ``406``.

What a route defines is read from its own operation in the OpenAPI document, which FastAPI
generates from the typed models that parse the requests (``api/models.py``): what is
documented is exactly what is accepted. (JSON bodies are closed by their models, at every
depth: ``api/models.validated``.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request

from tally.errors import InvalidParameter, NotAcceptable, UnknownParameter


@dataclass(frozen=True)
class Operation:
    query: dict[str, bool]  # name → may repeat (an array)
    produces: tuple[str, ...]  # media types of its success answers (empty: unknown, any)


def strict_operations(app: FastAPI) -> dict[tuple[str, str], Operation]:
    known: dict[tuple[str, str], Operation] | None = getattr(app.state, "strict_ops", None)
    if known is None:
        known = {}
        for path, item in app.openapi().get("paths", {}).items():
            for method, op in item.items():
                query = {p["name"]: _is_array(p.get("schema", {}))
                         for p in op.get("parameters", []) if p.get("in") == "query"}
                produces = tuple(dict.fromkeys(
                    media for status, response in op.get("responses", {}).items()
                    if status.startswith(("2", "3"))
                    for media in response.get("content", {})))
                known[(method.upper(), path)] = Operation(query, produces)
        app.state.strict_ops = known
    return known


def _is_array(schema: dict[str, Any]) -> bool:
    return schema.get("type") == "array" or any(
        branch.get("type") == "array" for branch in schema.get("anyOf", []))


async def strict_input(request: Request) -> None:
    """The route's dependency (installed app-wide in ``create_app``)."""
    route = request.scope.get("route")
    op = strict_operations(request.app).get((request.method, getattr(route, "path_format", "")))
    if op is None:  # not in the document: the docs UI's pages and assets (api/docs.py)
        return
    names = [name for name, _ in request.query_params.multi_items()]
    unknown = [name for name in dict.fromkeys(names) if name not in op.query]
    repeated = [name for name in dict.fromkeys(names)
                if name in op.query and names.count(name) > 1 and not op.query[name]]
    accept = request.headers.get("accept")
    unacceptable = bool(accept and op.produces
                        and not any(acceptable(accept, m) for m in op.produces))
    if (unknown or repeated or unacceptable) and request.method in ("POST", "PUT", "PATCH"):
        # read the body (bounded by api/bodies.py) before answering: a connection closed with
        # a request body unread is reset, and the client may lose the answer
        await request.body()
    if unknown:
        shown = ", ".join(repr(name[:40]) for name in unknown[:10])
        allowed = ", ".join(op.query) or "none"
        raise UnknownParameter(f"unknown query parameter(s) {shown}: this route takes "
                               f"{allowed}", parameters=unknown[:10])
    if repeated:
        raise InvalidParameter(f"query parameter {repeated[0]!r} is given more than once",
                               parameter=repeated[0])
    if unacceptable:
        raise NotAcceptable(f"this route answers with {', '.join(op.produces)}; "
                            f"Accept: {(accept or '')[:100]!r} allows none of them",
                            available=list(op.produces))


def _ranges(accept: str) -> list[tuple[str, float]]:
    """RFC 9110 §12.5.1: media ranges with their weights (a malformed one is ignored)."""
    out = []
    for part in accept.split(","):
        media, *params = (p.strip() for p in part.split(";"))
        weight = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0
        if media.count("/") == 1:
            out.append((media.lower(), weight))
    return out


def quality(accept: str, media: str) -> float:
    """The weight ``accept`` gives ``media``: that of its most specific matching range (the
    type, then ``type/*``, then ``*/*``); 0 when none matches, 1 when ``accept`` names no
    range at all (malformed: it restricts nothing)."""
    kind = media.split(";")[0].strip().lower()
    major = kind.split("/")[0]
    best: tuple[int, float] | None = None
    ranges = _ranges(accept)
    for rng, weight in ranges:
        if rng == kind:
            rank = 3
        elif rng == f"{major}/*":
            rank = 2
        elif rng == "*/*":
            rank = 1
        else:
            continue
        if best is None or rank > best[0]:
            best = (rank, weight)
    if best is None:
        return 0.0 if ranges else 1.0
    return best[1]


def acceptable(accept: str, media: str) -> bool:
    """Does ``accept`` allow ``media`` (the most specific matching range decides)?"""
    return quality(accept, media) > 0
