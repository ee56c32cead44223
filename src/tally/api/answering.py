"""How every analysis is answered, whatever it is answered as (the route's JSON, its CSV, an
embedded widget's chart): read-your-writes (bounded), the validator of the data it reads,
``304`` when the caller holds it, the JSON answer from the answer cache or the store.

A representation other than the JSON answer (``variant``) has its own ETag, and is made from
the JSON answer, so every representation of one query says the same thing.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import msgspec
from fastapi import Request

from tally.api.caching import etag_for, format_watermark, not_modified
from tally.audit.record import count_rows
from tally.insights.series import Plan
from tally.runtime import Runtime


@dataclass(frozen=True)
class Answering:
    plan: Plan
    etag: str  # of the JSON answer
    tag: str  # of the representation asked for (the JSON's, or a variant's)
    watermark: str  # X-Data-Watermark
    fresh: bool  # the caller's If-None-Match holds ``tag``: answer 304


async def answering(request: Request, runtime: Runtime, plan: Plan,
                    variant: str | None = None) -> Answering:
    versions = runtime.ingest.versions
    # read-your-writes, bounded: an answer includes the events acknowledged before the request
    # if the applier gets them in within TALLY_READ_YOUR_WRITES_MS; else it answers now, and
    # its watermark says which events it holds
    if not runtime.ingest.caught_up():
        await asyncio.to_thread(runtime.ingest.read_your_writes,
                                runtime.settings.read_your_writes_ms / 1000)
    version = versions.version(plan.brands, plan.reads)
    etag = etag_for(plan.fingerprint, version, runtime.fx.version)
    tag = etag if variant is None else \
        etag_for(f"{plan.fingerprint}|{variant}", version, runtime.fx.version)
    mark = format_watermark(versions.complete_before(plan.brands),
                            runtime.settings.allowed_lateness)
    return Answering(plan, etag, tag, mark, not_modified(request, tag))


async def json_answer(request: Request, runtime: Runtime, answering: Answering,
                      max_age: int) -> bytes:
    """The JSON answer (cached under its ETag), its rows counted for the audit log."""
    content = runtime.answers.get(answering.etag)
    if content is None:
        content = msgspec.json.encode(await asyncio.to_thread(answering.plan.run))
        runtime.answers.put(answering.etag, content, max_age)
    request.state.audit_rows = count_rows(content)
    return content
