"""The stored layout of events and quarantine, defined once as Arrow schemas.

Typed columns hold every payload field of the registry so analytics never parse JSON;
``payload`` keeps the producer's payload text verbatim when it holds fields this version does
not know (so they are not lost), and is empty when the typed columns are the whole payload.
"""

from __future__ import annotations

import pyarrow as pa

TIMESTAMP = pa.timestamp("us")  # naive, always UTC

PAYLOAD_TEXT_FIELDS = (
    "session_id", "bet_id", "payment_id", "bonus_id", "game_id", "provider_id", "currency",
    "method", "reason", "device", "country", "limit_type", "reference_id",
)
PAYLOAD_INT_FIELDS = (
    "stake_minor", "win_minor", "amount_minor", "jackpot_contribution_minor",
    "commission_minor", "duration_sec",
)
PAYLOAD_BOOL_FIELDS = ("in_bonus",)
PAYLOAD_COLUMNS = (*PAYLOAD_TEXT_FIELDS, *PAYLOAD_INT_FIELDS, *PAYLOAD_BOOL_FIELDS)

EVENTS_SCHEMA = pa.schema(
    [
        pa.field("ingest_seq", pa.int64(), nullable=False),
        pa.field("id_hi", pa.int64(), nullable=False),
        pa.field("id_lo", pa.int64(), nullable=False),
        pa.field("event_id", pa.string(), nullable=False),
        pa.field("event_type", pa.string(), nullable=False),
        pa.field("occurred_at", TIMESTAMP, nullable=False),
        pa.field("ingested_at", TIMESTAMP, nullable=False),
        pa.field("received_at", TIMESTAMP, nullable=False),
        pa.field("tenant_id", pa.string(), nullable=False),
        pa.field("region", pa.string(), nullable=False),
        pa.field("player_id", pa.string()),
        pa.field("trace_id", pa.string()),
        pa.field("schema_version", pa.string(), nullable=False),
        *(pa.field(name, pa.string()) for name in PAYLOAD_TEXT_FIELDS),
        *(pa.field(name, pa.int64()) for name in PAYLOAD_INT_FIELDS),
        *(pa.field(name, pa.bool_()) for name in PAYLOAD_BOOL_FIELDS),
        pa.field("payload", pa.string(), nullable=False),
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("received_at", TIMESTAMP, nullable=False),
        pa.field("client_id", pa.string(), nullable=False),
        pa.field("batch_index", pa.int32(), nullable=False),
        pa.field("event_id", pa.string()),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("event", pa.string(), nullable=False),
        # the brand and region the rejected event names (when it names them as strings): what
        # the operator routes confine the quarantine by; last, as a migrated table has them
        pa.field("tenant_id", pa.string()),
        pa.field("region", pa.string()),
    ]
)

_DUCKDB_TYPES = {
    pa.int64(): "BIGINT",
    pa.int32(): "INTEGER",
    pa.string(): "VARCHAR",
    pa.bool_(): "BOOLEAN",
    TIMESTAMP: "TIMESTAMP",
}


def duckdb_columns(schema: pa.Schema) -> str:
    """Column definitions of ``schema`` in DuckDB DDL."""
    return ",\n  ".join(
        f"{f.name} {_DUCKDB_TYPES[f.type]}{'' if f.nullable else ' NOT NULL'}" for f in schema
    )
