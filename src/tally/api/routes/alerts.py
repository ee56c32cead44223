"""Metric alerts (CONTRACT §11): ``POST /v1/alerts``, ``GET /v1/alerts``,
``GET /v1/alerts/{id}``, ``GET /v1/alerts/{id}/events`` and ``DELETE /v1/alerts/{id}``.

A rule's query is checked and confined when it is made, exactly as its route would do it with
the creator's token (``api/queries.py``, ``insights/kinds.py``), and its webhook URL as an
export's is (``webhooks/delivery.py``): a bad rule is the caller's ``400``/``403`` now, not a
failed evaluation later. Evaluation and delivery run off the request path
(``alerts/service.py``, ``alerts/outbox.py``).
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse

from tally.alerts import conditions, store
from tally.alerts.store import Alert, Event
from tally.api import answers
from tally.api.answers import AUTHED, problems
from tally.api.cursors import decode_cursor, encode_cursor
from tally.api.deps import AnalyticsReader, RuntimeDep
from tally.api.models import AlertBody, validated
from tally.api.queries import stored_query
from tally.errors import InvalidParameter, NotFound, Unprocessable
from tally.insights.request import parse_bounded_int
from tally.json_input import ANY, decode
from tally.runtime import Runtime
from tally.security.tokens import Principal
from tally.webhooks.delivery import UnsafeDestination, check_url

router = APIRouter(tags=["alerts"])
NO_STORE = {"Cache-Control": "no-store"}
LIMIT = Annotated[str | None, Query(description="1–100, default 20")]


def view(alert: Alert) -> dict[str, Any]:
    """A rule as the API shows it."""
    return {"id": alert.id, "name": alert.name,
            "query": alert.query["params"] | {"kind": alert.query["kind"]},
            "condition": alert.condition, "webhook_url": alert.webhook_url,
            "every_seconds": alert.every_seconds, "created_at": alert.created_at,
            "evaluated_at": alert.evaluated_at, "breaching": alert.breaching,
            "error": alert.error,
            "links": {"self": f"/v1/alerts/{alert.id}",
                      "events": f"/v1/alerts/{alert.id}/events"}}


def event_view(event: Event) -> dict[str, Any]:
    return {"id": event.id, "type": event.type, "at": event.at, "data": event.body["data"],
            "delivery": {"status": event.status, "attempts": event.attempts,
                         "last_status": event.last_status, "last_error": event.last_error,
                         "delivered_at": event.delivered_at}}


def _alert_for(runtime: Runtime, principal: Principal, alert_id: str,
               request: Request) -> Alert:
    """The rule, if the caller may see it (its creator, or an admin without limits); else
    404, as for a rule that does not exist."""
    alert = store.get(runtime.meta, alert_id) if len(alert_id) <= 64 else None
    unlimited_admin = "admin" in principal.scopes and principal.brands is None \
        and principal.regions is None and principal.providers is None
    if alert is None or (alert.client_id != principal.client_id and not unlimited_admin):
        raise NotFound(f"no alert {alert_id[:64]!r}")
    request.state.audit_params = {"alert": alert.id}
    return alert


def _page(cursor_kind: str, cursor: str | None, limit: str | None) -> tuple[int, int]:
    size = parse_bounded_int(limit, "limit", 1, 100, default=20)
    return (decode_cursor(cursor_kind, cursor) if cursor else 0), size


@router.post("/v1/alerts", summary="Make an alert rule on a timeseries or slice",
             status_code=201, response_model=None,
             responses={201: {"model": answers.Alert}, **problems(*AUTHED, 413, 415, 422)},
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                 "schema": {"$ref": "#/components/schemas/AlertBody"}}}}})
async def create_alert(request: Request, principal: AnalyticsReader,
                       runtime: RuntimeDep) -> JSONResponse:
    body = validated(AlertBody, decode(await request.body(), "the body", ANY))
    condition: dict[str, Any] = body["condition"]
    conditions.check_kind(body["query"])
    query = stored_query(body["query"], ("limit", "cursor"))
    conditions.check(query, condition)
    # the route's validation and confinement, now, with the creator's token
    conditions.plan(query, runtime.context_for(principal))
    try:
        check_url(body["webhook_url"], runtime.settings.webhook_allow_loopback)
    except UnsafeDestination as exc:
        raise InvalidParameter(str(exc), parameter="webhook_url") from None
    at_most = runtime.settings.alerts_max_per_client
    alert = await asyncio.to_thread(store.create, runtime.meta, principal, body["name"], query,
                                    condition, body["webhook_url"],
                                    body.get("every_seconds", 60), at_most)
    if alert is None:
        raise Unprocessable(f"this client holds {at_most} alerts already "
                            "(TALLY_ALERTS_MAX_PER_CLIENT): delete one first",
                            limit="alerts_max_per_client")
    request.state.audit_params = {"alert": alert.id, **query["params"]}
    runtime.alerts.wake()  # evaluated at once: its first state
    return JSONResponse(view(alert), status_code=201,
                        headers={**NO_STORE, "Location": f"/v1/alerts/{alert.id}"})


@router.get("/v1/alerts", summary="This client's alert rules, oldest first",
            response_model=None,
            responses={200: {"model": answers.Alerts}, **problems(*AUTHED)})
async def list_alerts(principal: AnalyticsReader, runtime: RuntimeDep, limit: LIMIT = None,
                      cursor: Annotated[str | None, Query()] = None) -> JSONResponse:
    after, size = _page("alerts", cursor, limit)
    found = await asyncio.to_thread(store.listing, runtime.meta, principal.client_id, after,
                                    size + 1)
    page = found[:size]
    nxt = encode_cursor("alerts", page[-1][0]) if len(found) > size else None
    return JSONResponse({"items": [view(alert) for _, alert in page], "next_cursor": nxt},
                        headers=NO_STORE)


@router.get("/v1/alerts/{alert_id}", summary="An alert rule and its last evaluation",
            response_model=None,
            responses={200: {"model": answers.Alert}, **problems(*AUTHED, 404)})
async def get_alert(alert_id: str, request: Request, principal: AnalyticsReader,
                    runtime: RuntimeDep) -> JSONResponse:
    return JSONResponse(view(_alert_for(runtime, principal, alert_id, request)),
                        headers=NO_STORE)


@router.get("/v1/alerts/{alert_id}/events",
            summary="An alert's firings and resolutions, oldest first, with their delivery",
            response_model=None,
            responses={200: {"model": answers.AlertEvents}, **problems(*AUTHED, 404)})
async def alert_events(alert_id: str, request: Request, principal: AnalyticsReader,
                       runtime: RuntimeDep, limit: LIMIT = None,
                       cursor: Annotated[str | None, Query()] = None) -> JSONResponse:
    alert = _alert_for(runtime, principal, alert_id, request)
    after, size = _page("alert-events", cursor, limit)
    found = await asyncio.to_thread(store.events, runtime.meta, alert.id, after, size + 1)
    page = found[:size]
    nxt = encode_cursor("alert-events", page[-1][0]) if len(found) > size else None
    return JSONResponse({"items": [event_view(event) for _, event in page],
                         "next_cursor": nxt}, headers=NO_STORE)


@router.delete("/v1/alerts/{alert_id}", summary="Delete an alert rule", status_code=204,
               response_model=None,
               responses={204: {"description": "Deleted: its events not yet delivered are "
                                               "never sent."}, **problems(*AUTHED, 404)})
async def delete_alert(alert_id: str, request: Request, principal: AnalyticsReader,
                       runtime: RuntimeDep) -> Response:
    alert = _alert_for(runtime, principal, alert_id, request)
    await asyncio.to_thread(store.delete, runtime.meta, alert.id)
    runtime.alerts.forget(alert.id)
    return Response(status_code=204, headers=NO_STORE)
