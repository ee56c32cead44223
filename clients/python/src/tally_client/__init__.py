"""tally-client: a typed Python client of the Tally analytics API (sync and async).

>>> from tally_client import TallyClient
>>> with TallyClient.from_env() as tally:        # TALLY_URL, TALLY_CLIENT_ID, TALLY_CLIENT_SECRET
...     tally.ingest(events)                      # batched, idempotent, retried safely
...     tally.timeseries("ggr", "1d", "2025-10-01", "2025-11-01", group_by="brand_id")

See README.md beside this package.
"""

from tally_client._routes import Day, Filters, Instant
from tally_client._version import __version__
from tally_client.aio import AsyncTallyClient
from tally_client.client import TallyClient
from tally_client.models import (
    AuditEntry,
    AuditKey,
    AuditPage,
    AuditVerification,
    BadEntry,
    Embed,
    EventTypeSchema,
    ExportJob,
    ExportJobs,
    Funnel,
    FunnelStep,
    FxRate,
    FxRates,
    FxRatesAdded,
    IngestResult,
    Ltv,
    LtvCohort,
    MetricInfo,
    MetricsCatalog,
    NotModified,
    Point,
    QuarantineItem,
    QuarantinePage,
    Receipt,
    RejectedEvent,
    Retention,
    RetentionRow,
    SchemaRegistry,
    SchemaVersion,
    Slice,
    SliceItem,
    Timeseries,
    Token,
    WebhookDelivery,
    WebhookSecret,
)
from tally_client.problems import (
    BadRequest,
    Conflict,
    Forbidden,
    HeadersTooLarge,
    MethodNotAllowed,
    MisdirectedRequest,
    NotAcceptable,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    RequestTimeout,
    ServerError,
    ServiceUnavailable,
    TallyError,
    TallyProblem,
    Unauthorized,
    UnexpectedResponse,
    Unprocessable,
    UnsupportedMediaType,
)
from tally_client.retry import NO_RETRY, RetryPolicy

__all__ = [
    "NO_RETRY", "AsyncTallyClient", "AuditEntry", "AuditKey", "AuditPage",
    "AuditVerification", "BadEntry", "BadRequest", "Conflict", "Day", "Embed",
    "EventTypeSchema", "ExportJob", "ExportJobs",
    "Filters", "Forbidden", "Funnel", "FunnelStep", "FxRate", "FxRates", "FxRatesAdded",
    "HeadersTooLarge", "IngestResult", "Instant", "Ltv", "LtvCohort", "MethodNotAllowed",
    "MetricInfo", "MetricsCatalog", "MisdirectedRequest", "NotAcceptable", "NotFound",
    "NotModified", "PayloadTooLarge", "Point", "QuarantineItem", "QuarantinePage",
    "RateLimited", "Receipt", "RejectedEvent", "RequestTimeout", "Retention", "RetentionRow",
    "RetryPolicy", "SchemaRegistry", "SchemaVersion", "ServerError", "ServiceUnavailable",
    "Slice", "SliceItem", "TallyClient", "TallyError", "TallyProblem", "Timeseries", "Token",
    "Unauthorized", "UnexpectedResponse", "Unprocessable", "UnsupportedMediaType",
    "WebhookDelivery", "WebhookSecret", "__version__",
]
