"""The storage seam (issue 11): only ``storage/`` knows which engine holds the events, and
``TALLY_STORE`` chooses it through one factory that refuses what it cannot run, at start."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tally.errors import StoreUnavailable
from tally.storage.factory import CHDB_DIR, SUPPORTED, check_store, own_folder

SRC = Path(__file__).resolve().parent.parent / "src" / "tally"
ENGINE_MODULES = ("duckdb", "chdb", "clickhouse_connect", "tally.storage.duckdb")
ENGINE_NAMES = ("DuckDBBackend",)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, what) for every import of an engine module or backend class in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names
                      if a.name.split(".")[0] in ENGINE_MODULES or a.name in ENGINE_MODULES]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module in ENGINE_MODULES or module.split(".")[0] in ENGINE_MODULES[:3]:
                found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{a.name}") for a in node.names
                      if a.name in ENGINE_NAMES or f"{module}.{a.name}" in ENGINE_MODULES]
    return found


def test_no_module_above_storage_imports_an_engine() -> None:
    offenders = [f"{path.relative_to(SRC)}:{line}: {what}"
                 for path in sorted(SRC.rglob("*.py"))
                 if path.relative_to(SRC).parts[0] != "storage"
                 for line, what in _imports(path)]
    assert offenders == []


def test_the_scan_finds_an_engine_import(tmp_path: Path) -> None:
    """The scan is not vacuous: each way of importing an engine is caught."""
    for text in ("import duckdb", "from duckdb import connect",
                 "from tally.storage.duckdb import DuckDBBackend",
                 "from tally.storage import duckdb", "import chdb.session"):
        module = tmp_path / "m.py"
        module.write_text(text + "\n")
        assert _imports(module), text


@pytest.mark.parametrize(("store", "kind"), [
    ("duckdb", "duckdb"), ("DuckDB", "duckdb"), (" duckdb ", "duckdb"), ("chdb", "chdb"),
    ("https://user:secret@ch.example:8443/db", "clickhouse"),
    ("http://ch.example:8123/tally?cluster=analytics", "clickhouse"),
])
def test_the_contracts_stores_are_supported(store: str, kind: str) -> None:
    assert check_store(store) == kind


@pytest.mark.parametrize(("store", "says"), [
    ("postgres", "'postgres' is not a store Tally knows"),
    ("ftp://user:secret@ch.example/db", "a URL is not a store Tally knows"),
    ("https://user:secret@ch.example/db?cluster=no%20way", "is not a cluster name"),
    ("https://user:secret@ch.example/db?cluster=a&cluster=b", "more than one cluster"),
    ("https://user:secret@ch.example/bad.db", "is not a database name"),
    ("https://:8123", "a ClickHouse server URL must be"),
])
def test_other_stores_are_refused_in_one_line(store: str, says: str) -> None:
    with pytest.raises(StoreUnavailable) as caught:
        check_store(store)
    message = str(caught.value)
    assert says in message
    assert "\n" not in message and "secret" not in message


def _serve(data: Path, store: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tally.cli", "serve", "--data-dir", str(data)],
        env={"TALLY_STORE": store, "PATH": "/usr/bin:/bin"}, capture_output=True,
        text=True, timeout=60, check=False)


def test_serve_refuses_an_unknown_store_at_start(tmp_path: Path) -> None:
    """One line on stderr, no traceback, nothing created in the data dir."""
    data = tmp_path / "data"
    done = _serve(data, "ftp://user:secret@host/db")
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        f"tally: TALLY_STORE: a URL is not a store Tally knows (supported: {SUPPORTED})"]
    assert not data.exists()


def test_serve_refuses_an_embedded_clickhouse_another_process_owns(tmp_path: Path) -> None:
    """chDB keeps no lock of its own: a second process on the folder is refused in one line
    while the first holds it, and may open it once the first has let go."""
    data = tmp_path / "data"
    owner = own_folder(data / CHDB_DIR)
    try:
        done = _serve(data, "chdb")
        assert done.returncode != 0
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "is in use by another process" in lines[0], lines
    finally:
        os.close(owner)
    os.close(own_folder(data / CHDB_DIR))  # free again
