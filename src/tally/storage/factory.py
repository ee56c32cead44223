"""The one place a store is chosen: ``TALLY_STORE`` (CONTRACT §10) → a :class:`Backend`.

- ``duckdb`` (the default): the embedded DuckDB store, ``events.duckdb`` under ``--data-dir``;
- ``chdb``: the ClickHouse engine in this process, its files under ``--data-dir``/``clickhouse``
  (one process owns the folder: a lock file says which);
- ``http(s)://user:pass@host:8123/db[?cluster=NAME]``: a ClickHouse server (or a cluster's
  ``Distributed`` tables, ``storage/clickhouse_cluster.py``).

Anything else fails at start with one line naming what is supported. The engines are imported
only when chosen.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path

from tally.errors import StoreUnavailable
from tally.metadata import exclusive_file
from tally.storage.base import Backend, DerivedTable
from tally.storage.limits import QueryLimits

# chDB runs ClickHouse's allocator (its own jemalloc) in this process, and by default it
# keeps the pages a statement freed: the server's RSS climbs towards its largest statements'
# sum (6.4 GB peak at 100M events over HTTP). Returned after a second instead: 4.0 GB peak,
# ~10% more CPU on the largest statements (docs/benchmarks.md). The allocator reads it when
# chDB's library loads, so it is set before the first chDB store of the process opens; an
# operator's own JE_MALLOC_CONF wins.
CHDB_MALLOC_CONF = "dirty_decay_ms:1000,muzzy_decay_ms:0"
SUPPORTED = "duckdb, chdb, or a ClickHouse URL http(s)://[user:pass@]host[:port][/db]"
SPILL_DIR = "query-spill"  # where a store spills what a query cannot hold in memory
CHDB_DIR = "clickhouse"  # the embedded ClickHouse's files, under the data dir
LOCK_FILE = ".tally-lock"


def check_store(store: str) -> str:
    """The store's kind (``duckdb``, ``chdb`` or ``clickhouse``), or ``StoreUnavailable``
    with one line saying why not (a URL is never shown: it may hold a password)."""
    kind = store.strip().lower()
    if kind in ("duckdb", "chdb"):
        return kind
    if kind.startswith(("http://", "https://")):
        from tally.storage.clickhouse_cluster import parse_store

        parse_store(store)
        return "clickhouse"
    shown = "a URL" if "://" in kind else repr(store[:64])
    raise StoreUnavailable(f"TALLY_STORE: {shown} is not a store Tally knows "
                           f"(supported: {SUPPORTED})")


def open_read_only(data_dir: Path) -> Backend:
    """The embedded DuckDB store under ``data_dir``, read only, to inspect a stopped store
    (``tally status --data-dir``); ``StoreUnavailable`` when a writer holds it."""
    from tally.storage.duckdb import DuckDBBackend

    return DuckDBBackend(data_dir, read_only=True)


def open_backend(store: str, data_dir: Path, *,
                 derived: Callable[[str], Sequence[DerivedTable]],
                 retired: Sequence[str] = (),
                 idempotency_ttl: timedelta = timedelta(hours=24),
                 limits: QueryLimits | None = None) -> Backend:
    """The store ``store`` names, opened for writing with the tables it keeps from the events
    (``derived``: built for the store's SQL dialect) and ``retired`` ones dropped."""
    kind = check_store(store)
    if kind == "duckdb":
        from tally.storage.duckdb import DuckDBBackend

        return DuckDBBackend(data_dir, idempotency_ttl=idempotency_ttl,
                             derived=derived(DuckDBBackend.dialect), retired=retired,
                             limits=limits, spill_dir=data_dir / SPILL_DIR)
    if kind == "chdb":  # before anything loads the engine
        os.environ.setdefault("JE_MALLOC_CONF", CHDB_MALLOC_CONF)
    from tally.storage.clickhouse import ClickHouseBackend, chdb_dsn
    from tally.storage.clickhouse_cluster import parse_store

    owner: int | None = None
    if kind == "chdb":
        folder = data_dir / CHDB_DIR
        owner = own_folder(folder)
        dsn, database, cluster = chdb_dsn(folder), "default", None
    else:
        url = parse_store(store)
        dsn, database, cluster = url.dsn, url.database, url.cluster
    # the backend owns the lock from here: its close (also when it fails to open) gives it up
    return ClickHouseBackend(dsn, database=database, cluster=cluster,
                             idempotency_ttl=idempotency_ttl,
                             derived=derived(ClickHouseBackend.dialect), retired=retired,
                             limits=limits, owner=owner)


def own_folder(folder: Path) -> int:
    """Make this process the one that uses ``folder`` (chDB keeps no lock of its own: two
    processes on one folder would corrupt it): an exclusive ``flock`` on a file in it, held
    by the returned descriptor until it is closed (or the process ends)."""
    fd = exclusive_file(folder / LOCK_FILE, os.O_RDWR, "store lock",
                        " (is `tally serve` running on this data dir?)")
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd
