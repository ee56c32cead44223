"""The ASGI middleware that puts every limited request under an :class:`Admission`.

Limited: every ``/v1`` route and ``POST /oauth/token``; never the health, readiness and
metrics endpoints. The middleware only opens the request's admission and writes its headers
(``RateLimit-Policy``, ``RateLimit`` and, on a 429, ``Retry-After``) into the response,
errors included; what is charged is decided where it becomes known (``security/admission.py``).
Pure ASGI, like the trace middleware: the admission must be the context of the endpoint and of
the threads it starts, which BaseHTTPMiddleware's separate task would not give.
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tally.security.admission import admitting


def limited(path: str) -> bool:
    """Every ``/v1`` route, token requests, and widgets' pages and data (charged to their
    creators: ``api/routes/embeds.py``)."""
    return path.startswith(("/v1/", "/embed/")) or path == "/oauth/token"


class LimitsMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        runtime = getattr(getattr(scope.get("app"), "state", None), "runtime", None)
        if scope["type"] != "http" or runtime is None or not limited(scope["path"]):
            await self.app(scope, receive, send)
            return
        admission = runtime.limits.admission()

        async def send_with_limits(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in admission.headers(int(message["status"])):
                    headers.append(name, value)
            await send(message)

        with admitting(admission):
            await self.app(scope, receive, send_with_limits)
