"""Error taxonomy: user errors carry an HTTP status and render as RFC 9457 problem+json."""

from __future__ import annotations

from typing import Any

PROBLEM_MEDIA_TYPE = "application/problem+json"


class TallyError(Exception):
    """Base of every error Tally raises on purpose."""


class UserError(TallyError):
    """The caller did something wrong; safe to show them ``detail``."""

    status: int = 400
    title: str = "Bad Request"
    code: str = "bad_request"
    headers: dict[str, str] | None = None  # extra response headers (e.g. ``Link``)

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra

    def problem(self, instance: str | None = None) -> dict[str, Any]:
        return problem(self.status, self.title, self.detail, self.code, instance, **self.extra)


class BadRequest(UserError):
    pass


class Unauthorized(UserError):
    status, title, code = 401, "Unauthorized", "unauthorized"


class Forbidden(UserError):
    status, title, code = 403, "Forbidden", "forbidden"


class MisdirectedRequest(UserError):
    """The request belongs to another deployment (RFC 9110 §15.5.20): residency."""

    status, title, code = 421, "Misdirected Request", "misdirected_request"


class RequestTimeout(UserError):
    """The client stopped sending its request (``api/bodies.py``); the connection is closed."""

    status, title, code = 408, "Request Timeout", "request_timeout"


class Conflict(UserError):
    status, title, code = 409, "Conflict", "conflict"


class PayloadTooLarge(UserError):
    status, title, code = 413, "Content Too Large", "payload_too_large"


class UnsupportedMediaType(UserError):
    status, title, code = 415, "Unsupported Media Type", "unsupported_media_type"


class Unprocessable(UserError):
    status, title, code = 422, "Unprocessable Content", "unprocessable"


class TooManyRequests(UserError):
    """A rate limit or quota (``Retry-After`` is added by ``api/limiting.py``)."""

    status, title, code = 429, "Too Many Requests", "too_many_requests"


class HeadersTooLarge(UserError):
    """A request head over its limit (``api/connections.py``); the connection is closed."""

    status, title, code = 431, "Request Header Fields Too Large", "headers_too_large"


class ServiceUnavailable(UserError):
    """Tally cannot take this request now (the journal or store cannot be written, the
    ingestion backlog is over its bound, a query limit was hit under load); the client should
    retry after ``retry_after`` seconds (sent as ``Retry-After``). Nothing was stored."""

    status, title, code = 503, "Service Unavailable", "service_unavailable"

    def __init__(self, detail: str, retry_after: int = 1, **extra: Any) -> None:
        super().__init__(detail, retry_after=retry_after, **extra)
        self.headers = {"Retry-After": str(retry_after)}


class DependencyUnavailable(ServiceUnavailable):
    """A service Tally depends on (an identity provider) cannot answer now; retry later."""


class QueryTimeout(ServiceUnavailable):
    """A query statement ran past ``TALLY_QUERY_TIMEOUT_SECONDS`` and was stopped."""

    code = "query_timeout"


class QueryMemoryExceeded(ServiceUnavailable):
    """A query statement needed more than the engine's memory and spill limits."""

    code = "query_memory_exceeded"


class StoreUnavailable(TallyError):
    """The store cannot be opened or written (wrong directory, locked by another process, a
    full or read-only disk): a condition of the store, not of the data; retrying later may
    succeed."""


class WriteRejected(TallyError):
    """The store refused the rows themselves (a conversion, range or constraint error): the
    same rows will fail again however often they are retried."""


class InternalError(TallyError):
    """A bug or an unexpected failure; clients see a generic 500 without details."""


def problem(
    status: int,
    title: str,
    detail: str,
    code: str,
    instance: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": f"https://tally.dev/problems/{code}",
        "title": title,
        "status": status,
        "detail": detail,
    }
    if instance:
        body["instance"] = instance
    body.update(extra)
    return body
