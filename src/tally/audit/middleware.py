"""One mechanism appends every audited call: a pure-ASGI middleware inside the trace middleware.

The entry is appended when the route has finished and its response is about to start — after
the route decided the status and put its notes in ``request.state``, before a byte of the answer
leaves. So no answer reaches a caller without its entry on disk: if the log cannot take the
entry, the caller gets ``503`` problem+json instead of the answer (fail closed). A request that
dies with an exception is recorded with status 500 before the exception goes on.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tally.audit import record
from tally.errors import AUDIT_UNAVAILABLE, PROBLEM_MEDIA_TYPE, problem

log = logging.getLogger(__name__)


class AuditMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = record.kind_of(scope["path"]) if scope["type"] == "http" else None
        if kind is None:
            await self.app(scope, receive, send)
            return
        recorded = refused = False

        async def send_audited(message: Message) -> None:
            nonlocal recorded, refused
            if message["type"] == "http.response.start" and not recorded:
                recorded = True
                if not await self._append(scope, kind, int(message["status"])):
                    refused = True
                    await _unavailable(scope, send)
            if not refused:
                await send(message)

        try:
            await self.app(scope, receive, send_audited)
        except Exception:
            if not recorded:
                recorded = True
                await self._append(scope, kind, 500)
            raise

    async def _append(self, scope: Scope, kind: str, status: int) -> bool:
        runtime = getattr(scope["app"].state, "runtime", None)
        audit = getattr(runtime, "audit", None)
        if audit is None:  # no runtime yet (start-up failed): nothing is served either
            return True
        entry = record.build(scope, kind, status)
        try:
            await audit.append_async(entry)
        except Exception:
            log.exception("audit append failed; the answer is withheld",
                          extra={"trace_id": entry["trace_id"]})
            return False
        return True


async def _unavailable(scope: Scope, send: Send) -> None:
    state: dict[str, Any] = scope.get("state") or {}
    body = problem(503, "Service Unavailable",
                   "the audit log cannot record this request, so it is not answered",
                   AUDIT_UNAVAILABLE, scope.get("path"), trace_id=state.get("trace_id"))
    content = msgspec.json.encode(body)
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", PROBLEM_MEDIA_TYPE.encode()),
                            (b"content-length", str(len(content)).encode()),
                            (b"retry-after", b"5")]})
    await send({"type": "http.response.body", "body": content})
