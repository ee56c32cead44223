"""Embedded widgets (CONTRACT §9): ``POST /v1/embeds`` makes one; ``/embed/<token>`` is its
page, ``/embed/<token>/data`` what the page draws.

The query is checked and confined when the widget is made, exactly as its route would check
it with the creator's token (``api/queries.py``, ``insights/kinds.py``), and signed into the
token with the creator's limits (``embeds/tokens.py``). The page and its data read the
query and the limits from the token only: the data route takes no parameter (strict input
refuses any), so a viewer cannot widen the brands, regions or metrics it shows. Each view
and data request is charged to the creator's rate limits and quotas, and audited under the
creator's client with the widget's id; a creator revoked (or whose secret was rotated with
``--revoke-tokens``) after making a widget takes it down with them.
"""

from __future__ import annotations

from typing import Any

import msgspec
from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse

from tally.api import answers
from tally.api.answering import answering, json_answer
from tally.api.answers import AUTHED, problems
from tally.api.caching import respond
from tally.api.deps import AnalyticsReader, RuntimeDep
from tally.api.embed_page import page, refused_page
from tally.api.models import EmbedBody, validated
from tally.api.queries import stored_query
from tally.embeds import tokens
from tally.embeds.charts import shape
from tally.embeds.tokens import CHARTS, Embed, EmbedRefused
from tally.errors import InvalidParameter, InvalidToken
from tally.insights.kinds import PAGE, plan_for
from tally.insights.series import Plan, utc_text
from tally.json_input import ANY, decode
from tally.runtime import Runtime
from tally.security.admission import admit_client, admit_token_source
from tally.security.tokens import Principal, TokenService

router = APIRouter(tags=["embeds"])
DATA_MAX_AGE = 10  # seconds a browser may reuse a widget's data without asking
_REFUSED: dict[int | str, dict[str, Any]] = {403: {
    "description": "Tampered with, expired, or its creator revoked.",
    "content": {"text/html": {"schema": {"type": "string"}}}}}


def _plan(runtime: Runtime, principal: Principal, query: dict[str, Any]) -> Plan:
    """The query's plan, confined by ``principal``: a slice's own top N, else the route's
    largest page."""
    limit = query["params"].get("limit") if query["kind"] in PAGE else None
    return plan_for(query, runtime.context_for(principal), limit=int(limit) if limit else None)


def _root(request: Request) -> str:
    return str(request.scope.get("root_path", "")).rstrip("/")


@router.post("/v1/embeds", summary="Make an embeddable widget (a signed, expiring URL)",
             status_code=201, response_model=None,
             responses={201: {"model": answers.EmbedCreated},
                        **problems(*AUTHED, 413, 415, 422)},
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                 "schema": {"$ref": "#/components/schemas/EmbedBody"}}}}})
async def create_embed(request: Request, principal: AnalyticsReader,
                       runtime: RuntimeDep) -> JSONResponse:
    body = validated(EmbedBody, decode(await request.body(), "the body", ANY))
    query = stored_query(body["query"], ("cursor",))
    chart = body["chart"]
    if query["kind"] not in CHARTS[chart]:
        raise InvalidParameter(f"a {chart} chart draws {', '.join(sorted(CHARTS[chart]))} "
                               f"queries, not {query['kind']}", parameter="chart")
    _plan(runtime, principal, query)  # the route's checks and confinement, now
    embed = tokens.make(principal, query, chart, body.get("title"),
                        body.get("ttl_seconds") or tokens.DEFAULT_TTL_SECONDS,
                        body.get("refresh_seconds"))
    token = tokens.sign(runtime.meta, embed)
    if len(token) > tokens.MAX_TOKEN_CHARS:
        raise InvalidParameter("the query is too long to carry in a URL: shorten it",
                               parameter="query")
    request.state.audit_params = {"embed": embed.id, "chart": chart}
    url = f"{_root(request)}/embed/{token}"
    return JSONResponse({"id": embed.id, "url": url, "expires_at": utc_text(embed.expires_at)},
                        status_code=201, headers={"Cache-Control": "no-store",
                                                  "Location": url})


def _viewed(request: Request, runtime: Runtime, token: str) -> Embed:
    """The token's widget, if it still stands; its creator is charged and audited. A refused
    link spends the bucket of its sender's address (as a token request does), so guessing
    or replaying links from one address is rate limited without touching real viewers."""
    try:
        embed = tokens.verify(runtime.meta, token)
    except EmbedRefused:
        admit_token_source(request.client.host if request.client else "unknown")
        raise
    request.state.audit_params = {"embed": embed.id, "chart": embed.chart}
    principal = embed.principal()
    if isinstance(runtime.tokens, TokenService):  # a revoked creator's widgets go with it
        try:
            runtime.tokens.clients.check(principal.client_id, embed.issued_at)
        except InvalidToken:
            raise EmbedRefused("the embed's creator no longer has access") from None
    request.state.principal = principal  # the audit entry's actor
    admit_client(principal.client_id)  # the creator's rate limit
    return embed


@router.get("/embed/{token}", summary="An embedded widget's page (no bearer token)",
            response_class=HTMLResponse, responses={
                200: {"description": "The widget: HTML, its scripts and styles from Tally."},
                **_REFUSED, **problems(429, 500, 503)})
async def embed_view(token: str, request: Request, runtime: RuntimeDep) -> HTMLResponse:
    origins = runtime.settings.embed_origins
    try:
        embed = _viewed(request, runtime, token)
    except EmbedRefused as exc:
        return refused_page(exc.detail.rstrip("."), _root(request), origins)
    return page(embed, token, _root(request), origins)


@router.get("/embed/{token}/data", summary="What an embedded widget draws (its token only)",
            response_model=None, responses={
                200: {"model": answers.EmbedData},
                304: {"description": "Not modified: the If-None-Match ETag is current."},
                **problems(403, 422, 429, 500, 503)})
async def embed_data(token: str, request: Request, runtime: RuntimeDep) -> Response:
    embed = _viewed(request, runtime, token)
    plan = _plan(runtime, embed.principal(), embed.query)
    assert plan.table is not None  # every stored kind answers a table
    state = await answering(request, runtime, plan, f"embed|{embed.id}")
    if state.fresh:
        return respond(state.tag, None, DATA_MAX_AGE, state.watermark)
    answer = msgspec.json.decode(await json_answer(request, runtime, state, DATA_MAX_AGE))
    data = {"id": embed.id, "kind": embed.query["kind"], "chart": embed.chart,
            "title": embed.title, "refresh_seconds": embed.refresh_seconds,
            "expires_at": utc_text(embed.expires_at), "watermark": state.watermark,
            **shape(embed.query["kind"], plan.table, answer),
            "more": bool(answer.get("next_cursor"))}
    return respond(state.tag, msgspec.json.encode(data), DATA_MAX_AGE, state.watermark,
                   extra={"Referrer-Policy": "no-referrer"})
