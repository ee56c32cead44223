"""The ``tally`` command (CONTRACT §1)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from tally.config import Settings, get_settings
from tally.errors import StoreUnavailable, UserError

app = typer.Typer(help="Tally: analytics API for online gaming operators.",
                  no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False)  # never print locals (secrets) on a crash
client_app = typer.Typer(help="Manage OAuth2 clients.", no_args_is_help=True)
app.add_typer(client_app, name="client")

DataDir = Annotated[
    Path | None,
    typer.Option("--data-dir", help="Store directory (default $TALLY_DATA_DIR or ./data)."),
]


def fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"tally: {message}", err=True)
    raise typer.Exit(code)


def settings_for(data_dir: Path | None) -> Settings:
    try:
        base = get_settings()
    except Exception as exc:  # a bad TALLY_* value: one line, not a traceback
        fail(f"invalid configuration: {exc}".splitlines()[0])
    return base.model_copy(update={"data_dir": data_dir}) if data_dir else base


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.", min=0, max=65535)] = 8000,
    data_dir: DataDir = None,
) -> None:
    """Run the API on the embedded store."""
    import uvicorn

    from tally.api.app import create_app
    from tally.observability.logs import configure_logging
    from tally.runtime import Runtime, tune_gc

    settings = settings_for(data_dir)
    configure_logging(settings.log_level)
    try:
        runtime = Runtime.open(settings)
    except StoreUnavailable as exc:
        fail(str(exc))
    tune_gc()
    uvicorn.run(create_app(settings, runtime), host=host, port=port, log_config=None,
                access_log=False, timeout_graceful_shutdown=5)


@client_app.command("create")
def client_create(
    name: Annotated[str, typer.Option(help="Human-readable client name.")],
    scopes: Annotated[str, typer.Option(help='Space-separated, e.g. "events:write admin".')],
    brands: Annotated[str | None, typer.Option(help="Comma-separated brands (default all).")]
    = None,
    regions: Annotated[str | None, typer.Option(help="Comma-separated regions (default all).")]
    = None,
    metrics: Annotated[str | None, typer.Option(help="Comma-separated metrics (default all).")]
    = None,
    data_dir: DataDir = None,
) -> None:
    """Register an OAuth2 client; prints {"client_id", "client_secret"} on stdout."""
    from tally import metadata
    from tally.security.clients import create_client

    settings = settings_for(data_dir)
    try:
        con = metadata.connect(settings.data_dir)
        client_id, secret = create_client(con, name, scopes, brands, regions, metrics)
    except (StoreUnavailable, UserError) as exc:
        fail(str(exc))
    sys.stdout.write(json.dumps({"client_id": client_id, "client_secret": secret}) + "\n")


@app.command()
def demo(
    events: Annotated[int, typer.Option("--events", min=1, help="How many events.")] = 200_000,
    days: Annotated[int, typer.Option("--days", min=1, max=3650, help="Days of history.")] = 30,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same data).")] = 7,
    data_dir: DataDir = None,
) -> None:
    """Fill the store with a realistic synthetic casino event stream."""
    from tally.demo.load import load_demo

    settings = settings_for(data_dir)
    try:
        summary = load_demo(settings, events=events, days=days, seed=seed)
    except StoreUnavailable as exc:
        fail(str(exc))
    typer.echo(json.dumps(summary), err=True)


if __name__ == "__main__":  # pragma: no cover
    app()
