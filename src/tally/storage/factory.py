"""The one place a store is chosen: ``TALLY_STORE`` (CONTRACT §10) → a :class:`Backend`.

``duckdb`` (the default) is the embedded DuckDB store under ``--data-dir``. ``chdb`` and a
ClickHouse URL (``http(s)://…``) are the contract's other stores, not implemented yet: they,
and any other value, fail at start with one line naming what is supported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path

from tally.errors import StoreUnavailable
from tally.storage.base import Backend, DerivedTable
from tally.storage.limits import QueryLimits

SUPPORTED = ("duckdb",)
PLANNED = ("chdb", "http://", "https://")  # CONTRACT §10; issue 11
SPILL_DIR = "query-spill"  # where a store spills what a query cannot hold in memory


def check_store(store: str) -> str:
    """The store's kind (``duckdb``), or ``StoreUnavailable`` with one line saying why not."""
    kind = store.strip().lower()
    if kind in SUPPORTED:
        return kind
    supported = ", ".join(SUPPORTED)
    if kind.startswith(PLANNED):  # a URL is not shown: it may hold a password
        shown = "a ClickHouse server URL" if "://" in kind else f"{store!r}"
        raise StoreUnavailable(f"TALLY_STORE: {shown} is not supported yet "
                               f"(supported: {supported})")
    raise StoreUnavailable(f"TALLY_STORE: {store!r} is not a store Tally knows "
                           f"(supported: {supported})")


def open_backend(store: str, data_dir: Path, *,
                 derived: Callable[[str], Sequence[DerivedTable]],
                 retired: Sequence[str] = (),
                 idempotency_ttl: timedelta = timedelta(hours=24),
                 limits: QueryLimits | None = None) -> Backend:
    """The store ``store`` names, opened for writing with the tables it keeps from the events
    (``derived``: built for the store's SQL dialect) and ``retired`` ones dropped."""
    check_store(store)
    from tally.storage.duckdb import DuckDBBackend  # the engine is loaded only when chosen

    return DuckDBBackend(data_dir, idempotency_ttl=idempotency_ttl,
                         derived=derived(DuckDBBackend.dialect), retired=retired,
                         limits=limits, spill_dir=data_dir / SPILL_DIR)

