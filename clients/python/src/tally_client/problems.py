"""Errors: every non-success answer of Tally becomes a :class:`TallyProblem`.

Tally answers every error as RFC 9457 ``application/problem+json``. The exception class is
chosen by the HTTP status alone (``BadRequest`` for any 400, ``RateLimited`` for any 429…):
the problem ``type`` URI is exposed as a string but never used to pick a class, so a server
that refines its problem types does not change which ``except`` clause catches an error.
Members beyond the five standard ones (``limit``, ``key``, ``error``, ``endpoints``…) are in
:attr:`TallyProblem.extra`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar

import httpx
import msgspec

STANDARD_MEMBERS = frozenset({"type", "title", "status", "detail", "instance", "trace_id"})


class TallyError(Exception):
    """Base of every error this package raises on purpose."""


class UnexpectedResponse(TallyError):
    """A success answer whose body is not what the route promises (a proxy's page, a server
    of another version): the client cannot give a typed result."""

    def __init__(self, message: str, response: httpx.Response) -> None:
        super().__init__(message)
        self.response = response


class TallyProblem(TallyError):
    """An error answer. ``status``, ``type``, ``title``, ``detail``, ``instance`` and
    ``trace_id`` are the problem's members (``trace_id`` also from ``X-Trace-Id``); ``extra``
    holds the others; ``response`` is the HTTP response."""

    status_code: ClassVar[int | None] = None  # the status a subclass stands for

    def __init__(self, status: int, body: dict[str, Any], response: httpx.Response) -> None:
        self.status = status
        self.type = str(body.get("type") or "about:blank")
        self.title = str(body.get("title") or response.reason_phrase or f"HTTP {status}")
        self.detail = str(body.get("detail") or "")
        self.instance = _optional_str(body.get("instance"))
        self.trace_id = (_optional_str(body.get("trace_id"))
                         or response.headers.get("x-trace-id"))
        self.extra: dict[str, Any] = {k: v for k, v in body.items()
                                      if k not in STANDARD_MEMBERS}
        self.response = response
        super().__init__(f"{status} {self.title}: {self.detail}" if self.detail
                         else f"{status} {self.title}")


class BadRequest(TallyProblem):
    status_code = 400


class Unauthorized(TallyProblem):
    """No valid token, or (from ``POST /oauth/token``) a wrong client id or secret: the
    OAuth error code is ``extra["error"]``."""

    status_code = 401


class Forbidden(TallyProblem):
    status_code = 403


class NotFound(TallyProblem):
    status_code = 404


class MethodNotAllowed(TallyProblem):
    status_code = 405


class NotAcceptable(TallyProblem):
    status_code = 406


class RequestTimeout(TallyProblem):
    status_code = 408


class Conflict(TallyProblem):
    status_code = 409


class PayloadTooLarge(TallyProblem):
    status_code = 413


class UnsupportedMediaType(TallyProblem):
    status_code = 415


class MisdirectedRequest(TallyProblem):
    """The region belongs to another deployment: ``extra["endpoints"]`` says where."""

    status_code = 421


class Unprocessable(TallyProblem):
    status_code = 422


class _RetryLater(TallyProblem):
    """A problem that says when to come back (``Retry-After``)."""

    def __init__(self, status: int, body: dict[str, Any], response: httpx.Response) -> None:
        super().__init__(status, body, response)
        self.retry_after: float | None = retry_after(response)


class RateLimited(_RetryLater):
    """A rate limit or a row quota: ``retry_after`` seconds, ``extra["limit"]`` names it."""

    status_code = 429


class HeadersTooLarge(TallyProblem):
    status_code = 431


class ServerError(TallyProblem):
    """A 5xx other than 503 (a bug on the server, or a proxy in front of it)."""


class ServiceUnavailable(_RetryLater):
    """Tally cannot take the request now (backlog, a full disk, a query bound); nothing was
    stored. ``retry_after`` is the server's advice in seconds."""

    status_code = 503


_BY_STATUS: dict[int, type[TallyProblem]] = {
    cls.status_code: cls
    for cls in (BadRequest, Unauthorized, Forbidden, NotFound, MethodNotAllowed,
                NotAcceptable, RequestTimeout, Conflict, PayloadTooLarge, UnsupportedMediaType,
                MisdirectedRequest, Unprocessable, RateLimited, HeadersTooLarge,
                ServiceUnavailable)
    if cls.status_code is not None
}


def problem_from(response: httpx.Response) -> TallyProblem:
    """The exception for an error response: its problem+json body, or for a body that is not
    one (a proxy's HTML page) the status and the start of the text as ``detail``."""
    status = response.status_code
    body: dict[str, Any] = {}
    try:
        decoded = msgspec.json.decode(response.content)
    except (msgspec.DecodeError, ValueError):
        decoded = None
    if isinstance(decoded, dict):
        body = decoded
    elif response.content:
        body = {"detail": response.text[:500]}
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else TallyProblem)
    return cls(status, body, response)


def retry_after(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds (RFC 9110 §10.2.3: delay-seconds or an HTTP-date), or
    ``None`` when absent or unreadable."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)
