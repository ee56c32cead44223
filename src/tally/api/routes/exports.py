"""Export jobs (CONTRACT §8): ``POST /v1/exports``, ``GET /v1/exports``,
``GET /v1/exports/{id}`` and the signed download ``GET /v1/exports/{id}/file``.

A job's query is validated and confined when the job is made, exactly as its route would do
it (the same request model, the same plan, the creator's principal): a job can never see
more than its creator, and a bad query is the route's problem now, not a failed job later.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, JSONResponse

from tally.api import answers
from tally.api.answers import AUTHED, problems
from tally.api.cursors import decode_cursor, encode_cursor
from tally.api.deps import AnyToken, ExportsWriter, RuntimeDep
from tally.api.models import ExportBody, validated
from tally.api.queries import stored_query
from tally.errors import Forbidden, InsufficientScope, InvalidParameter, NotFound
from tally.exports import jobs, links
from tally.exports.runner import file_of, view
from tally.insights.kinds import plan_for
from tally.insights.request import parse_bounded_int
from tally.json_input import ANY, decode
from tally.runtime import Runtime
from tally.security.tokens import Principal
from tally.webhooks.delivery import UnsafeDestination, check_url

router = APIRouter(tags=["exports"])
NO_STORE = {"Cache-Control": "no-store"}
CURSOR_KIND = "exports"


def _export_reader(principal: Principal) -> None:
    """Making an export needs ``exports:write`` (the route's scope) and, since it reads
    analytics, ``analytics:read`` too."""
    if "analytics:read" not in principal.scopes:
        raise InsufficientScope("analytics:read")


def _job_for(runtime: Runtime, principal: Principal, job_id: str) -> jobs.Job:
    """The job, if the caller may see it (its creator, or an admin without limits); else
    404, as for a job that does not exist."""
    job = jobs.get(runtime.meta, job_id) if len(job_id) <= 64 else None
    unlimited_admin = "admin" in principal.scopes and principal.brands is None \
        and principal.regions is None
    if job is None or (job.client_id != principal.client_id and not unlimited_admin):
        raise NotFound(f"no export {job_id[:64]!r}")
    return job


def _shown(runtime: Runtime, job: jobs.Job) -> dict[str, Any]:
    url = None
    if job.status == "succeeded" and job.expires_at is not None:
        expires = min(jobs.now() + timedelta(seconds=runtime.settings.export_link_ttl_seconds),
                      jobs.parse(job.expires_at))
        if expires > jobs.now():
            url = links.link(runtime.meta, job.id, expires)
    return view(job, url)


@router.post("/v1/exports", summary="Start an export job (CSV or Parquet)", status_code=202,
             response_model=None,
             responses={202: {"model": answers.ExportJob},
                        **problems(*AUTHED, 413, 415, 422)},
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                 "schema": {"$ref": "#/components/schemas/ExportBody"}}}}})
async def create_export(request: Request, principal: ExportsWriter,
                        runtime: RuntimeDep) -> JSONResponse:
    _export_reader(principal)
    body = validated(ExportBody, decode(await request.body(), "the body", ANY))
    job_query = stored_query(body["query"], ("limit", "cursor"))
    # the route's validation and confinement, now, with the creator's token
    ctx = runtime.context_for(principal)
    plan_for(job_query, ctx)
    webhook = body.get("webhook_url")
    if webhook is not None:
        try:
            check_url(webhook, runtime.settings.webhook_allow_loopback)
        except UnsafeDestination as exc:
            raise InvalidParameter(str(exc), parameter="webhook_url") from None
    job = await asyncio.to_thread(jobs.create, runtime.meta, principal, job_query,
                                  body["format"], webhook)
    runtime.exports.wake()
    return JSONResponse({"id": job.id, "status": job.status,
                         "links": {"self": f"/v1/exports/{job.id}"}}, status_code=202,
                        headers={**NO_STORE, "Location": f"/v1/exports/{job.id}"})


@router.get("/v1/exports/{job_id}", summary="An export job", response_model=None,
            responses={200: {"model": answers.ExportJob}, **problems(*AUTHED, 404)})
async def get_export(job_id: str, principal: AnyToken, runtime: RuntimeDep) -> JSONResponse:
    job = _job_for(runtime, principal, job_id)
    return JSONResponse(_shown(runtime, job), headers=NO_STORE)


@router.get("/v1/exports", summary="This client's export jobs, oldest first",
            response_model=None,
            responses={200: {"model": answers.ExportJobs}, **problems(*AUTHED)})
async def list_exports(principal: AnyToken, runtime: RuntimeDep,
                       limit: Annotated[str | None, Query(description="1–100, default 20")] = None,
                       cursor: Annotated[str | None, Query()] = None) -> JSONResponse:
    size = parse_bounded_int(limit, "limit", 1, 100, default=20)
    after = decode_cursor(CURSOR_KIND, cursor) if cursor else 0
    found = jobs.listing(runtime.meta, principal.client_id, after, size + 1)
    page = found[:size]
    nxt = encode_cursor(CURSOR_KIND, page[-1][0]) if len(found) > size else None
    return JSONResponse({"items": [_shown(runtime, job) for _, job in page],
                         "next_cursor": nxt}, headers=NO_STORE)


@router.get("/v1/exports/{job_id}/file", summary="Download an export's file (signed link)",
            response_model=None,
            responses={200: {"content": {"text/csv": {"schema": {"type": "string"}},
                                         "application/vnd.apache.parquet": {
                                             "schema": {"type": "string",
                                                        "format": "binary"}}},
                             "description": "The file (HTTP range requests allowed)."},
                       206: {"description": "A range of the file."},
                       **problems(400, 403, 404, 406, 429, 500, 503)})
async def download_export(job_id: str, runtime: RuntimeDep,
                          expires: Annotated[str, Query()],
                          signature: Annotated[str, Query(max_length=128)]) -> FileResponse:
    moment = parse_bounded_int(expires, "expires", 0, 2**40, default=0)
    why = links.valid(runtime.meta, job_id, moment, signature) if len(job_id) <= 64 else \
        "no such link"
    if why is not None:
        raise Forbidden(why)
    job = jobs.get(runtime.meta, job_id)
    path = file_of(runtime.exports.directory, job) if job is not None else None
    if job is None or path is None or not path.exists():
        raise NotFound("the export's file is gone (expired)")
    media = "text/csv; charset=utf-8; header=present" if job.format == "csv" \
        else "application/vnd.apache.parquet"
    return FileResponse(path, media_type=media, filename=f"{job.id}.{job.extension}",
                        headers={"Cache-Control": "private, no-store"})
