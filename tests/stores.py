"""The store the suite runs on (``TALLY_TEST_STORE``, tests/conftest.py), opened the one way
Tally opens it, for tests that read what was stored once the app or server that wrote it has
stopped — on DuckDB and on the embedded ClickHouse alike."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tally.rollups import activity
from tally.rollups.spec import derived_tables
from tally.storage.base import Backend
from tally.storage.factory import open_backend
from tests.conftest import STORE


def open_test_store(data_dir: Path, *, derived: bool = True) -> Backend:
    """The store under ``data_dir`` (with its derived tables, or as a store made before
    any existed), for writing."""
    return open_backend(STORE, data_dir,
                        derived=derived_tables if derived else lambda dialect: [],
                        retired=activity.RETIRED)


@contextmanager
def stored(data_dir: Path) -> Iterator[Backend]:
    """The store under ``data_dir``, closed after the block."""
    store = open_test_store(data_dir)
    try:
        yield store
    finally:
        store.close()


def rows(data_dir: Path, sql: str) -> list[tuple[Any, ...]]:
    """The rows of ``sql`` (SQL both engines read alike) over the store under ``data_dir``."""
    with stored(data_dir) as store:
        return [tuple(row.values()) for row in store.query(sql).to_pylist()]
