"""Events as columns: the bulk path (``tally load``, big demo stores), vectorised over Arrow.

A columnar batch has one column per envelope field and per typed payload field
(:data:`INPUT_SCHEMA`, documented in docs/ingestion.md), so a Parquet file or an Arrow stream
of events is validated without a Python object per event. The rules are the same definitions
the JSON path uses, evaluated per column:

- the types and constraints of the envelope and of each payload are read from the msgspec
  Structs the JSON decoder validates with (``events/envelope.py``, ``events/payloads.py``):
  required fields, string lengths, patterns, integer ranges, enumerations;
- the rules beyond types (residency and the caller's limits, schema version, instants, player,
  currency) are the functions :func:`tally.events.envelope.check` calls, applied once per
  distinct value (a few brands, regions, versions and currencies per batch) or, for instants,
  to the bounds they state.

An event that breaks a rule is rejected with the reason the JSON path gives and kept in the
quarantine as its JSON envelope; the rest become :data:`EVENTS_SCHEMA` rows with the same dedup
keys, then go to the same writer (dedup, journal, applier). A column this format does not know,
or a known one of the wrong type, refuses the whole batch (as a body that is not an array of
events is refused): nothing of it is stored.

The payload text of an event loaded this way is empty: its typed columns are its whole payload
(the format has no place for other fields), and an event rebuilt from the store
(:func:`tally.ingest.setaside.event_json`) takes its payload from them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec
import msgspec.inspect as mi
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tally.errors import InvalidBody
from tally.events.envelope import (
    EARLIEST,
    EVENT_CLASSES,
    ValidationContext,
    currency_problem,
    instant_problem,
    latest_instant,
    player_problem,
    version_problem,
)
from tally.events.registry import REGISTRY
from tally.ingest.batch import PreparedBatch, Rejection
from tally.ingest.dedup import KeyHasher
from tally.security import policy
from tally.security.pseudonym import Pseudonymiser
from tally.storage.schema import EVENTS_SCHEMA, PAYLOAD_COLUMNS

UTC_US = pa.timestamp("us", tz="UTC")
# No field of the contract holds more than 128 characters (512 bytes of UTF-8); a value far
# beyond that refuses the batch, so a rejected event kept in the quarantine stays small
MAX_VALUE_BYTES = 64 * 1024
_STORED_ONLY = ("ingest_seq", "id_hi", "id_lo", "received_at", "payload")
_INSTANTS = ("occurred_at", "ingested_at")
INPUT_SCHEMA = pa.schema([
    pa.field(f.name, UTC_US if f.name in _INSTANTS else f.type)
    for f in EVENTS_SCHEMA if f.name not in _STORED_ONLY
])
def _fields(struct: type[msgspec.Struct]) -> tuple[mi.Field, ...]:
    info = mi.type_info(struct)
    assert isinstance(info, mi.StructType)
    return info.fields


_PAYLOAD_FIELDS = {name: _fields(spec.payload_type) for name, spec in REGISTRY.items()}
# the envelope's fields, as every event class has them (any class: they differ in payload only)
_ENVELOPE_FIELDS = tuple(f for f in _fields(next(iter(EVENT_CLASSES.values())))
                         if f.name != "payload")
Mask = Any  # a boolean pa.Array or pa.ChunkedArray (pyarrow has no type hints)


def conform(table: pa.Table) -> pa.Table:
    """``table`` in :data:`INPUT_SCHEMA` (columns in order, absent nullable ones null), or
    ``InvalidBody`` for an unknown column, a missing required one or one of another type.
    Strings may come dictionary-encoded or large, integers narrower, instants in any unit
    with any time zone (they are converted to UTC); naive instants are refused: the format
    cannot tell their offset."""
    unknown = sorted(set(table.column_names) - set(INPUT_SCHEMA.names))
    if unknown:
        raise InvalidBody(f"unknown column(s) {unknown}: the columns are "
                          f"{INPUT_SCHEMA.names} (docs/ingestion.md)")
    columns = []
    for f in INPUT_SCHEMA:
        if f.name not in table.column_names:
            if f.name in ("event_id", "event_type"):
                raise InvalidBody(f"column {f.name!r} is required")
            columns.append(pa.nulls(table.num_rows, f.type))
            continue
        columns.append(_conform_column(f, table.column(f.name)))
    return pa.Table.from_arrays(columns, schema=INPUT_SCHEMA)


def _conform_column(f: pa.Field, column: pa.ChunkedArray) -> pa.ChunkedArray:
    t = column.type
    if pa.types.is_dictionary(t):
        column, t = column.cast(t.value_type), t.value_type
    ok = (
        (f.type == pa.string() and (pa.types.is_string(t) or pa.types.is_large_string(t)))
        or (f.type == pa.int64() and pa.types.is_integer(t)
            and not (pa.types.is_uint64(t)))
        or (f.type == pa.bool_() and pa.types.is_boolean(t))
        or (f.type == UTC_US and pa.types.is_timestamp(t) and t.tz is not None)
        or pa.types.is_null(t)
    )
    if not ok:
        raise InvalidBody(f"column {f.name!r} is {t}; it must be {f.type}"
                          + (" (an instant with a time zone)" if f.type == UTC_US else ""))
    try:
        column = column.cast(f.type)
        if f.type == pa.string():
            column.validate(full=True)  # UTF-8: a file may hold any bytes in a string
            longest = pc.max(pc.binary_length(column)).as_py() or 0
            if longest > MAX_VALUE_BYTES:
                raise InvalidBody(f"column {f.name!r} holds a value of {longest:,} bytes; "
                                  f"the limit is {MAX_VALUE_BYTES:,}")
        return column
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise InvalidBody(f"column {f.name!r}: {exc}") from None


def prepare_table(table: pa.Table, ctx: ValidationContext, client_id: str, hasher: KeyHasher,
                  pseudonymiser: Pseudonymiser | None = None) -> PreparedBatch:
    """The columnar twin of :func:`tally.ingest.batch.prepare`: every event of ``table``
    accepted (as stored rows) or rejected with its reason; ``InvalidBody`` for a table that
    is not in the format."""
    table = conform(table)
    n = table.num_rows
    reasons = _Reasons(n)
    _check_types(table, reasons)
    _check_rules(table, ctx, reasons)
    received = ctx.received_at.astimezone(UTC).replace(tzinfo=None)
    rejected = reasons.rejected()
    rejections = [Rejection(int(i), event_id, reason, raw=_event_json(row), residency=residency)
                  for i, event_id, reason, residency, row in reasons.rows(table, rejected)]
    valid = table.filter(pc.invert(pa.array(rejected))) if rejected.any() else table
    return PreparedBatch(received, client_id, stored_rows(valid, received, hasher, pseudonymiser),
                         rejections)


class _Reasons:
    """The first broken rule of each event, in the order the rules are checked."""

    def __init__(self, n: int) -> None:
        self.reason: list[str | None] = [None] * n
        self.residency = np.zeros(n, dtype=np.bool_)
        self.open = np.ones(n, dtype=np.bool_)  # no rule broken yet

    def add(self, mask: Mask | np.ndarray[Any, Any], reason: str | Callable[[int], str],
            residency: bool = False) -> None:
        """Events where ``mask`` is true (null counts as false) break the rule ``reason``
        (or ``reason(index)``), unless they broke an earlier one."""
        m = mask if isinstance(mask, np.ndarray) else _numpy_mask(mask)
        hit = np.flatnonzero(m & self.open)
        if not len(hit):
            return
        for i in hit.tolist():
            self.reason[i] = reason if isinstance(reason, str) else reason(i)
        self.residency[hit] = residency
        self.open[hit] = False

    def rejected(self) -> np.ndarray[Any, np.dtype[np.bool_]]:
        return ~self.open

    def rows(self, table: pa.Table, rejected: np.ndarray[Any, Any]
             ) -> list[tuple[int, str | None, str, bool, dict[str, Any]]]:
        where = np.flatnonzero(rejected)
        rows = table.take(pa.array(where)).to_pylist() if len(where) else []
        return [(int(i), row["event_id"], self.reason[i] or "", bool(self.residency[i]), row)
                for i, row in zip(where.tolist(), rows, strict=True)]


def _numpy_mask(mask: Mask) -> np.ndarray[Any, np.dtype[np.bool_]]:
    filled = mask.fill_null(False)
    if isinstance(filled, pa.ChunkedArray):
        filled = filled.combine_chunks() if filled.num_chunks else pa.array([], pa.bool_())
    return np.asarray(filled.to_numpy(zero_copy_only=False), dtype=np.bool_)


# -- types: what the JSON decoder checks, read from the same Structs ---------------------------
def _check_types(table: pa.Table, reasons: _Reasons) -> None:
    types = table.column("event_type")
    reasons.add(pc.is_null(types), "Object missing required field `event_type`")
    known = pc.is_in(types, value_set=pa.array(sorted(REGISTRY)))
    def unknown(i: int) -> str:
        return f"unknown event_type {types[i].as_py()!r} (see GET /v1/schemas)"

    reasons.add(pc.invert(known), unknown)
    for f in _ENVELOPE_FIELDS:
        if f.name not in _INSTANTS:
            _check_field(table.column(f.name), f, f"$.{f.name}", reasons)
        elif f.required:
            reasons.add(pc.is_null(table.column(f.name)),
                        f"Object missing required field `{f.name}`")
    present = set(_distinct_values(types))
    for name, (owners, required, kinds) in _PAYLOAD_RULES.items():
        column = table.column(name)
        if column.null_count == len(column) and not (required & present):
            continue  # nothing to check: no value, and no type here requires one
        stray = pc.and_(pc.is_valid(column),
                        pc.invert(pc.is_in(types, value_set=pa.array(sorted(owners)))))
        def stray_field(i: int, n: str = name) -> str:
            return (f"payload.{n} is not a field of {types[i].as_py()} "
                    "(columnar events carry only their type's fields)")

        reasons.add(stray, stray_field)
        if required & present:
            reasons.add(pc.and_(pc.is_null(column),
                                pc.is_in(types, value_set=pa.array(sorted(required)))),
                        f"Object missing required field `{name}` - at `$.payload`")
        for f, of_types in kinds:
            rows = None if of_types == owners else _numpy_mask(
                pc.is_in(types, value_set=pa.array(sorted(of_types))))
            _check_field(column, f, f"$.payload.{name}", reasons, rows, payload=True)


def _payload_rules() -> dict[str, tuple[frozenset[str], frozenset[str],
                                         list[tuple[Any, frozenset[str]]]]]:
    """Per payload column: the types that have the field, those that require it, and each
    distinct constraint with the types it applies to (read from the payload Structs)."""
    rules: dict[str, tuple[set[str], set[str], dict[str, tuple[Any, set[str]]]]] = {}
    for event_type, fields in _PAYLOAD_FIELDS.items():
        for f in fields:
            owners, required, kinds = rules.setdefault(f.name, (set(), set(), {}))
            owners.add(event_type)
            if f.required:
                required.add(event_type)
            kinds.setdefault(repr(f.type), (f, set()))[1].add(event_type)
    return {name: (frozenset(owners), frozenset(required),
                   [(f, frozenset(types)) for f, types in kinds.values()])
            for name, (owners, required, kinds) in rules.items()}


_PAYLOAD_RULES = _payload_rules()


def _check_field(column: pa.ChunkedArray, f: Any, at: str, reasons: _Reasons,
                 rows: np.ndarray[Any, Any] | None = None, payload: bool = False) -> None:
    if f.required and not payload:
        reasons.add(pc.is_null(column), f"Object missing required field `{f.name}`")
    kind = f.type
    if isinstance(kind, mi.UnionType):  # optional: T | None
        kind = next(t for t in kind.types if not isinstance(t, mi.NoneType))

    def add(mask: Mask, reason: str) -> None:
        reasons.add(_numpy_mask(mask) if rows is None else rows & _numpy_mask(mask), reason)

    if isinstance(kind, mi.StrType):
        if kind.min_length is not None or kind.max_length is not None:
            length = pc.utf8_length(column)
            if kind.min_length is not None:
                add(pc.less(length, kind.min_length),
                    f"Expected `str` of length >= {kind.min_length} - at `{at}`")
            if kind.max_length is not None:
                add(pc.greater(length, kind.max_length),
                    f"Expected `str` of length <= {kind.max_length} - at `{at}`")
        if kind.pattern is not None:
            add(pc.invert(pc.match_substring_regex(column, kind.pattern)),
                f"Expected `str` matching regex {kind.pattern!r} - at `{at}`")
    elif isinstance(kind, mi.IntType):
        for bound, compare, sign in ((kind.ge, pc.less, ">="), (kind.le, pc.greater, "<="),
                                     (kind.gt, pc.less_equal, ">"),
                                     (kind.lt, pc.greater_equal, "<")):
            if bound is not None:
                add(compare(column, bound), f"Expected `int` {sign} {bound} - at `{at}`")
    elif isinstance(kind, mi.LiteralType):
        bad = pc.and_(pc.is_valid(column),
                      pc.invert(pc.is_in(column, value_set=pa.array(list(kind.values)))))
        mask = _numpy_mask(bad) if rows is None else rows & _numpy_mask(bad)
        values = column
        reasons.add(mask, lambda i: f"Invalid enum value {values[i].as_py()!r} - at `{at}`")


# -- the rules beyond types: the functions Checker calls -------------------------------------------
def _check_rules(table: pa.Table, ctx: ValidationContext, reasons: _Reasons) -> None:
    tenants, regions = table.column("tenant_id"), table.column("region")
    providers = ctx.allowed_providers
    keys = ["tenant_id", "region"] + (["provider_id"] if providers is not None else [])
    for combo in _distinct(table, keys):
        if combo["tenant_id"] is None or combo["region"] is None:
            continue  # rejected by type already
        refusal = policy.check_event(
            combo["tenant_id"], combo["region"], ctx.served_regions, ctx.allowed_brands,
            ctx.allowed_regions, providers=providers, provider_id=combo.get("provider_id"))
        if refusal is not None:
            mask = pc.and_(pc.equal(tenants, combo["tenant_id"]),
                           pc.equal(regions, combo["region"]))
            if providers is not None:
                mask = pc.and_(mask, _equal_or_null(table.column("provider_id"),
                                                    combo["provider_id"]))
            reasons.add(mask, refusal.reason, residency=refusal.residency)
    types, versions = table.column("event_type"), table.column("schema_version")
    for combo in _distinct(table, ["event_type", "schema_version"]):
        if combo["event_type"] not in REGISTRY or combo["schema_version"] is None:
            continue  # rejected by type already
        problem = version_problem(combo["event_type"], combo["schema_version"])
        if problem is not None:
            reasons.add(pc.and_(pc.equal(types, combo["event_type"]),
                                pc.equal(versions, combo["schema_version"])), problem)
    earliest, latest = EARLIEST, latest_instant(ctx)
    for name in _INSTANTS:
        column = table.column(name)
        outside = pc.or_(pc.less(column, pa.scalar(earliest, UTC_US)),
                         pc.greater(column, pa.scalar(latest, UTC_US)))
        def outside_problem(i: int, c: pa.ChunkedArray = column, n: str = name) -> str:
            return instant_problem(n, c[i].as_py(), ctx) or ""

        reasons.add(outside, outside_problem)
    missing_player = pc.is_null(table.column("player_id"))
    for event_type in _distinct_values(pc.filter(types, missing_player)):
        problem = player_problem(event_type)
        if problem is not None:
            reasons.add(pc.and_(missing_player, pc.equal(types, event_type)), problem)
    currencies = table.column("currency")
    for currency in _distinct_values(currencies):
        problem = currency_problem(currency)
        if problem is not None:
            reasons.add(pc.equal(currencies, currency), problem)


def _distinct(table: pa.Table, keys: Sequence[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = table.select(list(keys)).group_by(list(keys)).aggregate(
        []).to_pylist()
    return rows


def _distinct_values(column: pa.ChunkedArray) -> list[Any]:
    return [v for v in pc.unique(column).to_pylist() if v is not None]


def _equal_or_null(column: pa.ChunkedArray, value: str | None) -> Mask:
    return pc.is_null(column) if value is None else pc.equal(column, value)


# -- rows -------------------------------------------------------------------------------------
def stored_rows(valid: pa.Table, received_at: datetime, hasher: KeyHasher,
                pseudonymiser: Pseudonymiser | None = None) -> pa.Table:
    """EVENTS_SCHEMA rows of valid columnar events (``ingest_seq`` 0 for the writer)."""
    n = valid.num_rows
    hi, lo = hasher.columns(valid.column("tenant_id").to_pylist(),
                            valid.column("event_id").to_pylist())
    received = pa.array(np.full(n, np.datetime64(received_at, "us")), pa.timestamp("us"))
    naive = {name: valid.column(name).cast(pa.timestamp("us")) for name in _INSTANTS}
    cols: dict[str, Any] = {
        "ingest_seq": pa.array(np.zeros(n, dtype=np.int64)),
        "id_hi": pa.array(hi), "id_lo": pa.array(lo),
        "occurred_at": naive["occurred_at"],
        "ingested_at": pc.coalesce(naive["ingested_at"], received),
        "received_at": received,
        "payload": pa.array([""] * n, pa.string()) if n else pa.array([], pa.string()),
    }
    if pseudonymiser is not None:
        cols["player_id"] = pa.array(pseudonymiser.column(
            valid.column("tenant_id").to_pylist(), valid.column("player_id").to_pylist()),
            pa.string())
    return pa.Table.from_arrays(
        [cols[f.name] if f.name in cols else valid.column(f.name) for f in EVENTS_SCHEMA],
        schema=EVENTS_SCHEMA)


def typed_payload(row: dict[str, Any]) -> dict[str, Any]:
    """The payload of a stored row whose payload text is empty (loaded from columns): its
    type's fields that have a value."""
    return {name: row[name] for name in REGISTRY[row["event_type"]].field_names
            if row.get(name) is not None}


def _event_json(row: dict[str, Any]) -> bytes:
    """A rejected columnar event as the JSON envelope it stands for (what the quarantine
    keeps): envelope fields and the payload fields it has."""
    def value(v: Any) -> Any:
        if isinstance(v, datetime):
            return v.astimezone(UTC).isoformat().replace("+00:00", "Z")
        return v

    event = {k: value(row[k]) for k in INPUT_SCHEMA.names
             if k not in PAYLOAD_COLUMNS and row[k] is not None}
    event["payload"] = {k: row[k] for k in PAYLOAD_COLUMNS if row[k] is not None}
    return msgspec.json.encode(event)
