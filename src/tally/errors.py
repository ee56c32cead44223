"""Error taxonomy: user errors carry an HTTP status and render as RFC 9457 problem+json.

Every problem ``type`` is one stable URI per error class, ``PROBLEM_BASE`` + a kebab-case code
(docs/api.md#problem-types lists them all: :data:`PROBLEM_TYPES`, checked by a test). Clients
branch on ``type``, never on ``detail`` (prose, which may change).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_BASE = "https://tally.dev/problems/"


@dataclass(frozen=True)
class ProblemType:
    code: str
    status: int
    title: str
    description: str

    @property
    def uri(self) -> str:
        return PROBLEM_BASE + self.code


PROBLEM_TYPES: dict[str, ProblemType] = {}


def problem_type(code: str, status: int, title: str, description: str) -> str:
    """Register a problem type (once per code) and return its code."""
    known = PROBLEM_TYPES.setdefault(code, ProblemType(code, status, title, description))
    if known != ProblemType(code, status, title, description):
        raise ValueError(f"problem type {code!r} registered twice, differently")
    return code


# problems answered outside a UserError (the framework's, the middleware's, the store's)
NOT_FOUND = problem_type("not-found", 404, "Not Found", "No route or resource at this URL.")
METHOD_NOT_ALLOWED = problem_type("method-not-allowed", 405, "Method Not Allowed",
                                  "The route exists but not with this method (see `Allow`).")
INTERNAL = problem_type("internal-error", 500, "Internal Server Error",
                        "A bug: nothing the client sent; quote the `trace_id` when reporting.")
STORE_UNAVAILABLE = problem_type("store-unavailable", 503, "Service Unavailable",
                                 "The store cannot answer now; retry after `Retry-After`.")
AUDIT_UNAVAILABLE = problem_type("audit-unavailable", 503, "Service Unavailable",
                                 "The audit log cannot be written, so the call was not "
                                 "answered (every query is audited); retry later.")


class TallyError(Exception):
    """Base of every error Tally raises on purpose."""


class UserError(TallyError):
    """The caller did something wrong; safe to show them ``detail``.

    A subclass names its problem type with ``code`` and ``doc`` (registered on definition)."""

    status: int = 400
    title: str = "Bad Request"
    code: str = "invalid-request"
    doc: str = "The request is malformed in a way no more specific type describes."
    headers: dict[str, str] | None = None  # extra response headers (e.g. ``Link``)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "code" in cls.__dict__:
            problem_type(cls.code, cls.status, cls.title, cls.doc)

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra

    def problem(self, instance: str | None = None) -> dict[str, Any]:
        return problem(self.status, self.title, self.detail, self.code, instance, **self.extra)


problem_type(UserError.code, UserError.status, UserError.title, UserError.doc)


class BadRequest(UserError):
    pass


class UnknownParameter(BadRequest):
    code = "unknown-parameter"
    doc = ("A query parameter, or a field of a JSON body at any depth, that the route does not "
           "define (a typo such as `fitlers=` never gives an unfiltered answer); "
           "`parameters` names them.")


class InvalidParameter(BadRequest):
    code = "invalid-parameter"
    doc = ("A parameter or body field has the wrong type, format or range, is missing, or is "
           "given more than once; `parameter` or `errors` names it.")


class UnknownMetric(BadRequest):
    code = "unknown-metric"
    doc = "The metric is not in the catalog (`GET /v1/metrics`)."


class InvalidFilter(BadRequest):
    code = "invalid-filter"
    doc = ("A filter, `group_by` or `dim` is malformed, names an unknown key, or a key that "
           "does not apply to the metric.")


class InvalidCursor(BadRequest):
    code = "invalid-cursor"
    doc = "The cursor was not issued by this API for this same query."


class InvalidBody(BadRequest):
    code = "invalid-body"
    doc = ("The body is not JSON (or not UTF-8), or not of the shape the route takes (e.g. "
           "not a JSON array of event objects).")


class Unauthorized(UserError):
    status, title, code = 401, "Unauthorized", "unauthorized"
    doc = ("No credentials: send `Authorization: Bearer <token>` (from `POST /oauth/token`). "
           "`WWW-Authenticate` says so (RFC 6750 §3).")

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail, **extra)
        self.headers = {"WWW-Authenticate": self.challenge()}

    def challenge(self) -> str:
        return 'Bearer realm="tally"'


def _quoted(text: str) -> str:
    """``text`` as an RFC 6750 §3 quoted value: printable ASCII without ``"`` and ``\\``."""
    return "".join(c if " " <= c <= "~" and c not in '"\\' else "?" for c in text)[:200]


class InvalidToken(Unauthorized):
    code = "invalid-token"
    doc = ("The bearer token is malformed, expired, revoked, or not signed by a key this "
           "server trusts; get a new one. `WWW-Authenticate` carries `error=\"invalid_token\"`.")

    def challenge(self) -> str:
        return (f'Bearer realm="tally", error="invalid_token", '
                f'error_description="{_quoted(self.detail)}"')


class OAuthError(BadRequest):
    """An error of ``POST /oauth/token`` (RFC 6749 §5.2): the problem carries the RFC's
    ``error`` code and ``error_description`` (= ``detail``) beside the problem members."""

    error = "invalid_request"
    code = "oauth-invalid-request"
    doc = ("OAuth (RFC 6749 §5.2 `invalid_request`): the token request is malformed (a "
           "parameter missing or repeated, the wrong content type).")

    def __init__(self, detail: str) -> None:
        super().__init__(detail, error=self.error, error_description=detail)


class UnsupportedGrantType(OAuthError):
    error = "unsupported_grant_type"
    code = "oauth-unsupported-grant-type"
    doc = ("OAuth `unsupported_grant_type`: only `client_credentials` is issued (and none when "
           "an identity provider issues the tokens).")


class InvalidScope(OAuthError):
    error = "invalid_scope"
    code = "oauth-invalid-scope"
    doc = "OAuth `invalid_scope`: a scope the client was not registered with."


class InvalidClient(Unauthorized):
    code = "oauth-invalid-client"
    doc = ("OAuth `invalid_client` (401): unknown client, wrong secret, revoked client or "
           "malformed client authentication.")

    def __init__(self, detail: str = "unknown client or wrong secret") -> None:
        super().__init__(detail, error="invalid_client", error_description=detail)

    def challenge(self) -> str:
        return 'Basic realm="tally"'  # RFC 6749 §5.2: the scheme the client authenticates by


class Forbidden(UserError):
    status, title, code = 403, "Forbidden", "forbidden"
    doc = ("Outside the token's limits: a brand, region, provider, metric or analysis the "
           "client may not see, or an operation that needs an admin without limits.")


class InsufficientScope(Forbidden):
    code = "insufficient-scope"
    doc = ("The token lacks the scope this route needs (`missing_scope`); "
           "`WWW-Authenticate` carries `error=\"insufficient_scope\"` (RFC 6750 §3.1).")

    def __init__(self, scope: str) -> None:
        super().__init__(f"this route needs the {scope!r} scope", missing_scope=scope)
        self.headers = {"WWW-Authenticate": f'Bearer realm="tally", error="insufficient_scope", '
                                            f'scope="{scope}"'}


class MisdirectedRequest(UserError):
    """The request belongs to another deployment (RFC 9110 §15.5.20): residency."""

    status, title, code = 421, "Misdirected Request", "misdirected-request"
    doc = "Residency: a region this deployment does not serve; send it to the one that does."


class NotAcceptable(UserError):
    status, title, code = 406, "Not Acceptable", "not-acceptable"
    doc = "The `Accept` header names no media type this route can produce (`available`)."


class RequestTimeout(UserError):
    """The client stopped sending its request (``api/bodies.py``); the connection is closed."""

    status, title, code = 408, "Request Timeout", "request-timeout"
    doc = "The request body or head arrived too slowly; the connection is closed."


class NotFound(UserError):
    status, title, code = 404, "Not Found", "not-found"
    doc = "No route or resource at this URL."


class Conflict(UserError):
    status, title, code = 409, "Conflict", "conflict"
    doc = "The request conflicts with the current state of the resource."


class PayloadTooLarge(UserError):
    status, title, code = 413, "Content Too Large", "payload-too-large"
    doc = "The body is over the route's byte limit, or a batch over its event limit."


class UnsupportedMediaType(UserError):
    status, title, code = 415, "Unsupported Media Type", "unsupported-media-type"
    doc = "The body's `Content-Type` is not one the route takes (JSON, or a form for tokens)."


class Unprocessable(UserError):
    status, title, code = 422, "Unprocessable Content", "unprocessable"
    doc = "Well-formed, but cannot be answered as asked."


class IdempotencyKeyReused(Unprocessable):
    code = "idempotency-key-reused"
    doc = "This `X-Idempotency-Key` was used by this client with a different body."


class QueryTooLarge(Unprocessable):
    code = "query-too-large"
    doc = ("The answer would exceed a size limit (groups, cohort cells, rows per request); "
           "`limit` names it. Narrow the query.")


class MissingFxRate(Unprocessable):
    code = "missing-fx-rate"
    doc = "Money in a currency with no FX rate on or before the day: add rates first."


class TooManyRequests(UserError):
    """A rate limit or quota (``Retry-After`` is added by ``api/limiting.py``)."""

    status, title, code = 429, "Too Many Requests", "rate-limited"
    doc = "A rate limit (per client, brand, region or address) is spent: wait `Retry-After`."


class HeadersTooLarge(UserError):
    """A request head over its limit (``api/connections.py``); the connection is closed."""

    status, title, code = 431, "Request Header Fields Too Large", "headers-too-large"
    doc = "The request head is over its limit; the connection is closed."


class ServiceUnavailable(UserError):
    """Tally cannot take this request now (the journal or store cannot be written, the
    ingestion backlog is over its bound, a query limit was hit under load); the client should
    retry after ``retry_after`` seconds (sent as ``Retry-After``). Nothing was stored."""

    status, title, code = 503, "Service Unavailable", "service-unavailable"
    doc = "Tally cannot take this request now; nothing was stored; retry after `Retry-After`."

    def __init__(self, detail: str, retry_after: int = 1, **extra: Any) -> None:
        super().__init__(detail, retry_after=retry_after, **extra)
        self.headers = {"Retry-After": str(retry_after)}


class DependencyUnavailable(ServiceUnavailable):
    """A service Tally depends on (an identity provider) cannot answer now; retry later."""

    code = "dependency-unavailable"
    doc = "A service Tally depends on (the identity provider's keys) cannot answer now."


class QueryTimeout(ServiceUnavailable):
    """A query statement ran past ``TALLY_QUERY_TIMEOUT_SECONDS`` and was stopped."""

    code = "query-timeout"
    doc = "The query ran past the server's time limit and was stopped; narrow it or retry."


class QueryMemoryExceeded(ServiceUnavailable):
    """A query statement needed more than the engine's memory and spill limits."""

    code = "query-memory-exceeded"
    doc = "The query needed more than the engine's memory and spill limits."


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
    if code not in PROBLEM_TYPES:
        raise ValueError(f"unregistered problem type {code!r}")
    body: dict[str, Any] = {
        "type": PROBLEM_BASE + code,
        "title": title,
        "status": status,
        "detail": detail,
    }
    if instance:
        body["instance"] = instance
    body.update(extra)
    return body
