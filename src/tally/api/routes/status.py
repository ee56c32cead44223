"""``GET /status``: the status page (HTML) or its document (``Accept: application/json``).

Who may read it: whoever may read ``/metrics`` — anyone when ``TALLY_METRICS_TOKEN`` is unset,
else only with that token (as a bearer token, or as the password of HTTP Basic so that a
browser can ask for it). It shows operational facts only (no brand, region, client or player:
``observability/status.py``), and answers ``200`` whatever the state it reports (a monitor
reads ``status``; ``/readyz`` is the probe that answers ``503``), so reading it never spends
the ``errors`` objective.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from tally.api import answers
from tally.api.answers import COMMON, problems
from tally.api.deps import RuntimeDep, operations_token_given
from tally.api.status_page import page
from tally.api.strict import quality
from tally.errors import Unauthorized
from tally.observability.status import server_status

router = APIRouter()
JSON, HTML = "application/json", "text/html"


class StatusUnauthorized(Unauthorized):
    def challenge(self) -> str:  # a browser asks for the token as the password
        return 'Bearer realm="tally", Basic realm="tally status", charset="UTF-8"'


def wants_json(request: Request) -> bool:
    """JSON when ``Accept`` prefers it to HTML (no ``Accept``, or a tie: the page)."""
    accept = request.headers.get("accept")
    return bool(accept) and quality(accept or "", JSON) > quality(accept or "", HTML)


@router.get("/status", tags=["operations"],
            summary="Status: health, freshness per rollup, backlog, objectives over the hour",
            response_model=None,
            openapi_extra={"security": [{}, {"metricsToken": []}]},
            responses={200: {"model": answers.Open,
                             "description": "The status document (`Accept: application/json`)"
                                            " or the page (HTML, the default).",
                             "content": {HTML: {"schema": {"type": "string"}}}},
                       **problems(*COMMON, 401)})
async def status(request: Request, runtime: RuntimeDep) -> Response:
    if not operations_token_given(request, runtime, basic=True):
        raise StatusUnauthorized("GET /status needs the scrape token (TALLY_METRICS_TOKEN): "
                                 "as a bearer token, or as the password of HTTP Basic")
    started_at = request.app.state.started_at
    document: dict[str, Any] = await asyncio.to_thread(  # asks the store and Redis
        server_status, runtime, request.app.state.metrics.slo, started_at)
    if wants_json(request):
        return JSONResponse(document, headers={"Cache-Control": "no-store"})
    root = str(request.scope.get("root_path", "")).rstrip("/")
    return page(document, root)

