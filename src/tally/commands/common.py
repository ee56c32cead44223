"""What every ``tally`` command shares: options, errors, output.

The rules of the command line: results go to stdout — readable text, or one JSON document
with ``--json`` — and nothing else does; an error is one line ``tally: …`` on stderr with a
non-zero exit: 2 when the command cannot run as given (a bad option or value, no store at
``--data-dir``, a busy port), 1 when it ran and the answer is "no" (an unknown client id, a
tampered audit log). A command that reads or changes an existing deployment never creates a
store: only ``serve``, ``demo`` and ``client create`` may (:func:`existing_metadata`).
"""

from __future__ import annotations

import json
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from tally.errors import StoreUnavailable

if TYPE_CHECKING:  # imported when used: it loads the web stack (seconds on a busy machine),
    from tally.config import Settings  # and --version, --help or a busy port need none of it

USAGE, REFUSED = 2, 1  # exit codes: cannot run as given / ran, and the answer is no

DataDir = Annotated[
    Path | None,
    typer.Option("--data-dir", metavar="DIR",
                 help="Store directory (default $TALLY_DATA_DIR or ./data)."),
]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON document (for machines).")]


def fail(message: str, code: int = USAGE) -> NoReturn:
    typer.echo(f"tally: {message}", err=True)
    raise typer.Exit(code)


def settings_for(data_dir: Path | None) -> Settings:
    from pydantic import ValidationError

    from tally.config import get_settings

    try:
        base = get_settings()
    except ValidationError as exc:  # a bad TALLY_* value: one line naming it, no traceback
        error = exc.errors()[0]
        name = "_".join(str(part) for part in error["loc"]).upper()
        fail(f"invalid configuration: TALLY_{name}: {error['msg']}")
    except Exception as exc:
        fail(f"invalid configuration: {exc}".splitlines()[0])
    return base.model_copy(update={"data_dir": data_dir}) if data_dir else base


def existing_metadata(data_dir: Path | None) -> sqlite3.Connection:
    """``meta.sqlite3`` of the store at ``--data-dir``; a directory holding no store is an
    error (exit 2), never created."""
    from tally import metadata

    try:
        return metadata.connect_existing(settings_for(data_dir).data_dir)
    except StoreUnavailable as exc:
        fail(str(exc))


def print_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document) + "\n")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Columns padded to their widest cell, two spaces apart (greppable, no box drawing)."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows,
                                                                      strict=False)]
    for row in (headers, *rows):
        line = "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths,
                                                                       strict=True))
        typer.echo(line.rstrip())


def print_fields(fields: Sequence[tuple[str, str]]) -> None:
    """``name: value`` lines, values aligned."""
    width = max(len(name) for name, _ in fields) + 1
    for name, value in fields:
        typer.echo(f"{name + ':':<{width}} {value}")
