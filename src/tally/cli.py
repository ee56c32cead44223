"""The ``tally`` command (CONTRACT §1); its rules of output and exit codes are in
:mod:`tally.commands.common`, the client commands in :mod:`tally.commands.clients`."""

from __future__ import annotations

import logging
import sqlite3
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from tally import __version__
from tally.commands.clients import client_app
from tally.commands.common import (
    REFUSED,
    DataDir,
    Json,
    existing_metadata,
    fail,
    print_fields,
    print_json,
    print_table,
    settings_for,
)
from tally.commands.listen import listen_error
from tally.errors import StoreUnavailable

# plain help (no boxes, no ``<bool>`` after flags); completion via --install-completion
app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                  pretty_exceptions_enable=False)  # never print locals (secrets) on a crash
app.add_typer(client_app, name="client")
audit_app = typer.Typer(help="The tamper-evident audit log.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")
keys_app = typer.Typer(help="Token signing keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"tally {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True,
        help="Print the version and exit.")] = False,
) -> None:
    """Tally: analytics API for online gaming operators."""


@app.command()
def serve(
    host: Annotated[str, typer.Option(metavar="H", help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(metavar="P", help="TCP port.", min=0, max=65535)] = 8000,
    data_dir: DataDir = None,
    ssl_certfile: Annotated[Path | None, typer.Option(
        metavar="PEM",
        help="Server certificate (PEM): serve HTTPS. Default $TALLY_SSL_CERTFILE.")] = None,
    ssl_keyfile: Annotated[Path | None, typer.Option(
        metavar="PEM", help="Server private key (PEM). Default $TALLY_SSL_KEYFILE.")] = None,
    ssl_client_ca: Annotated[Path | None, typer.Option(
        metavar="PEM",
        help="CA certificates (PEM) of client certificates: require mutual TLS. "
             "Default $TALLY_SSL_CLIENT_CA.")] = None,
) -> None:
    """Run the API on the embedded store (HTTPS and mutual TLS with the --ssl-* options)."""
    if (busy := listen_error(host, port)) is not None:  # before the store, logs, anything
        fail(busy)
    import uvicorn

    from tally.api.app import create_app
    from tally.api.connections import server_options as edge_options
    from tally.observability.logs import configure_logging
    from tally.runtime import Runtime, serving, tune_gc
    from tally.security.mtls import server_options

    settings = settings_for(data_dir)
    configure_logging(settings.log_level)
    try:
        tls = server_options(ssl_certfile or settings.ssl_certfile,
                             ssl_keyfile or settings.ssl_keyfile,
                             ssl_client_ca or settings.ssl_client_ca)
        edge = edge_options(settings)  # timeouts, connection limit, trusted proxies
    except ValueError as exc:
        fail(str(exc))
    try:
        settings = serving(settings)  # an unknown TALLY_STORE: one line, as below
        runtime = Runtime.open(settings)
    except StoreUnavailable as exc:
        fail(str(exc))
    tune_gc()
    uvicorn.run(create_app(settings, runtime), host=host, port=port, log_config=None,
                access_log=False, timeout_graceful_shutdown=5, **{**tls, **edge})


@app.command()
def demo(
    events: Annotated[int, typer.Option("--events", metavar="N", min=1,
                                        help="How many events.")] = 200_000,
    days: Annotated[int, typer.Option("--days", metavar="D", min=1, max=3650,
                                      help="Days of history.")] = 30,
    seed: Annotated[int, typer.Option(metavar="S",
                                      help="Random seed (same seed, same data).")] = 7,
    data_dir: DataDir = None,
    url: Annotated[str | None, typer.Option(
        "--url", metavar="URL",
        help="Send the events to the server at URL through tally-client (as a producer "
             "would) instead of into --data-dir.")] = None,
    client_id: Annotated[str | None, typer.Option(
        "--client-id", metavar="ID", envvar="TALLY_CLIENT_ID",
        help="With --url: a client with scope events:write (and admin, to set the demo's FX "
             "rates).")] = None,
    client_secret: Annotated[str | None, typer.Option(
        "--client-secret", metavar="SECRET", envvar="TALLY_CLIENT_SECRET",
        help="With --url: its secret (better in the environment than on the command "
             "line).")] = None,
    bulk: Annotated[bool, typer.Option(
        "--bulk", help="Generate vectorised and load through the columnar path (big stores "
                       "in minutes; the same operator, simulated a day at a time).")] = False,
    json_output: Json = False,
) -> None:
    """Fill the store with a realistic synthetic casino event stream (--url: send it to a
    running server)."""
    if url is not None and bulk:
        fail("--bulk loads a local store; --url sends JSON batches to a server: give one")
    if url is not None:
        summary = _demo_to_url(url, client_id, client_secret, data_dir, events, days, seed)
        where = summary["url"]
    else:
        from tally.demo.load import load_demo

        settings = settings_for(data_dir)
        try:
            summary = load_demo(settings, events=events, days=days, seed=seed, bulk=bulk)
        except StoreUnavailable as exc:
            fail(str(exc))
        where = summary["data_dir"]
    if json_output:
        print_json(summary)
    else:  # on stderr, below the progress bar: a shell that captures stdout gets nothing
        typer.echo(f"loaded {summary['accepted']:,} events into {where} in "
                   f"{summary['seconds']} s ({summary['events_generated']:,} generated, "
                   f"{summary['duplicates']:,} duplicates, {summary['rejected']:,} rejected)"
                   + (f"; FX rates {summary['fx_rates']}" if "fx_rates" in summary else ""),
                   err=True)


@app.command()
def load(
    files: Annotated[list[Path], typer.Argument(
        metavar="FILE...", help="Parquet files of events in the columnar format "
                                "(docs/ingestion.md).")],
    data_dir: DataDir = None,
    json_output: Json = False,
) -> None:
    """Load events from Parquet files into the store, with every ingestion rule (validation,
    quarantine, residency, pseudonymisation, dedup): a backfill of history."""
    from tally.demo.load import load_files
    from tally.errors import InvalidBody

    try:
        summary = load_files(settings_for(data_dir), files)
    except (StoreUnavailable, InvalidBody) as exc:
        fail(str(exc))
    if json_output:
        print_json(summary)
    else:
        typer.echo(f"loaded {summary['accepted']:,} events into {summary['data_dir']} in "
                   f"{summary['seconds']} s ({summary['events_generated']:,} read, "
                   f"{summary['duplicates']:,} duplicates, {summary['rejected']:,} rejected)",
                   err=True)


def _demo_to_url(url: str, client_id: str | None, client_secret: str | None,
                 data_dir: Path | None, events: int, days: int, seed: int) -> dict[str, Any]:
    """``tally demo --url``: checks its options, sends, and turns failures into one line."""
    if data_dir is not None:
        fail("--url sends to a server, --data-dir loads a local store: give one of them")
    if not client_id or not client_secret:
        fail("--url needs --client-id and --client-secret (or $TALLY_CLIENT_ID and "
             "$TALLY_CLIENT_SECRET)")
    try:
        import httpx

        from tally_client import TallyProblem
    except ImportError:
        fail("--url needs the tally-client package (pip install clients/python)")
    from tally.demo.remote import send_demo

    logging.getLogger("tally_client").setLevel(logging.ERROR)  # retries: not on the CLI's stderr
    try:
        return send_demo(url, client_id, client_secret, settings_for(None), events=events,
                         days=days, seed=seed)
    except TallyProblem as exc:
        fail(f"{url} answered {exc}")
    except httpx.TransportError as exc:
        fail(f"cannot reach {url}: {exc or type(exc).__name__}")
    except ValueError as exc:
        fail(str(exc))


@app.command()
def consume(
    source: Annotated[str, typer.Option(
        "--from", metavar="URL",
        help="The topic: kafka://HOST:PORT[,HOST:PORT…]/TOPIC (one JSON event a message).")],
    group: Annotated[str, typer.Option(
        "--group", metavar="G", help="Consumer group: its committed offsets are where a "
                                     "restart resumes.")],
    data_dir: DataDir = None,
    metrics_port: Annotated[int | None, typer.Option(
        "--metrics-port", metavar="P", min=0, max=65535,
        help="Serve Prometheus metrics (lag per partition) on 127.0.0.1:P/metrics.")] = None,
    json_output: Json = False,
) -> None:
    """Ingest an operator's Kafka topic with every rule of ingestion; offsets are committed
    only once the events are durable. Runs until SIGTERM or SIGINT."""
    if metrics_port is not None and (busy := listen_error("127.0.0.1", metrics_port)):
        fail(busy)
    from tally.commands.consume import consume as run

    summary = run(source, group, data_dir,
                  None if metrics_port is None else ("127.0.0.1", metrics_port))
    if json_output:
        print_json(summary)
    else:
        typer.echo(f"consumed {summary['messages']:,} messages from {summary['from']} "
                   f"(group {summary['group']}): {summary['accepted']:,} accepted, "
                   f"{summary['duplicates']:,} duplicates, {summary['rejected']:,} rejected "
                   f"({summary['poison']:,} unreadable messages)", err=True)


@app.command()
def status(
    data_dir: DataDir = None,
    url: Annotated[str | None, typer.Option(
        "--url", metavar="URL",
        help="Ask the running server at URL (its GET /status) instead of reading a stopped "
             "store in --data-dir.")] = None,
    token: Annotated[str | None, typer.Option(
        "--token", metavar="TOKEN", envvar="TALLY_METRICS_TOKEN",
        help="With --url: the server's scrape token, if it has one (default "
             "$TALLY_METRICS_TOKEN).")] = None,
    json_output: Json = False,
) -> None:
    """Health, freshness per rollup, backlog and SLO compliance: of a running server (--url),
    or of a stopped store read in place (--data-dir, read-only). Exit 1 when the server
    reports itself unavailable."""
    from tally.commands.status import run

    code = run(url, data_dir, token, json_output)
    if code:
        raise typer.Exit(code)


@app.command()
def openapi(
    output: Annotated[Path | None, typer.Option(
        "--output", metavar="FILE",
        help="Write the document to FILE (replaced whole) instead of printing it.")] = None,
    json_output: Json = False,
) -> None:
    """Print the OpenAPI 3.1 document of the API (sorted, indented: the committed
    openapi.json, `make openapi`); opens no store."""
    from tally.api.app import create_app
    from tally.api.compat import operations
    from tally.api.docs import openapi_text

    document = create_app(settings_for(None)).openapi()  # the lifespan (the store) never runs
    text = openapi_text(document)
    if output is None:
        sys.stdout.write(text)
        return
    partial = output.with_name(f".{output.name}.partial")
    try:
        partial.write_text(text, encoding="utf-8")
        partial.replace(output)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        fail(f"cannot write {output}: {exc.strerror or exc}")
    paths, count = len(document["paths"]), len(list(operations(document)))
    if json_output:
        print_json({"output": str(output), "paths": paths, "operations": count,
                    "bytes": len(text.encode())})
    else:
        typer.echo(f"wrote {output}: {paths} paths, {count} operations")


@audit_app.command("verify")
def audit_verify(data_dir: DataDir = None, json_output: Json = False) -> None:
    """Verify the audit log (works while serving): exit 0 if intact, 1 with the first bad
    entry."""
    from tally import metadata
    from tally.audit.verify import verify_data_dir

    settings = settings_for(data_dir)
    try:
        verdict = verify_data_dir(metadata.require_store(settings.data_dir))
    except (StoreUnavailable, OSError, sqlite3.Error) as exc:
        fail(str(exc))
    if json_output:
        print_json(verdict.public())
        if not verdict.intact:
            raise typer.Exit(REFUSED)
    elif not verdict.intact:
        fail(f"audit log is not intact: {verdict.summary()}", REFUSED)
    else:
        typer.echo(verdict.summary())


def _signing_keys(data_dir: Path | None) -> sqlite3.Connection:
    if settings_for(data_dir).jwks_url:
        fail("TALLY_JWKS_URL is set: the identity provider signs tokens, not this deployment")
    return existing_metadata(data_dir)


@keys_app.command("rotate")
def keys_rotate(
    revoke: Annotated[bool, typer.Option(
        "--revoke", help="Retire the old keys with no grace: their tokens fail at once "
                         "(a leaked key).")] = False,
    data_dir: DataDir = None,
    json_output: Json = False,
) -> None:
    """Make a new signing key; old keys keep verifying until their tokens expire."""
    from tally.security.keys import rotate

    done = rotate(_signing_keys(data_dir), revoke=revoke)
    if json_output:
        print_json(done)
        return
    until = (f" (they verify until {done['verifies_until']})" if done["verifies_until"]
             else "")
    print_fields([("active", f"{done['active']} (new; a running server signs with it "
                             "within a second)"),
                  ("retired", _kids(done["retired"]) + (until if done["retired"] else "")),
                  ("deleted", _kids(done["deleted"]) + (" (their tokens fail now)"
                                                        if revoke and done["deleted"] else ""))])


def _kids(value: object) -> str:
    return ", ".join(map(str, value)) if isinstance(value, list) and value else "none"


def _rotate_deployment_key(data_dir: Path | None, name: str, json_output: bool,
                           said: str) -> None:
    from tally.metadata import rotate_deployment_key

    rotate_deployment_key(existing_metadata(data_dir), name)
    if json_output:
        print_json({"rotated": name})
        return
    typer.echo(said)


@keys_app.command("rotate-link-key")
def keys_rotate_link_key(data_dir: DataDir = None, json_output: Json = False) -> None:
    """Replace the key that signs export download links: every link made before stops
    working (403); a job's next GET signs a fresh one."""
    from tally.exports.links import KEY_NAME

    _rotate_deployment_key(data_dir, KEY_NAME, json_output,
                           "export link key replaced: earlier download links now answer 403 "
                           "(GET /v1/exports/{id} signs a fresh one)")


@keys_app.command("rotate-embed-key")
def keys_rotate_embed_key(data_dir: DataDir = None, json_output: Json = False) -> None:
    """Replace the key that signs embedded widgets' URLs: every widget made before stops
    working (403); POST /v1/embeds makes new ones."""
    from tally.embeds.tokens import KEY_NAME

    _rotate_deployment_key(data_dir, KEY_NAME, json_output,
                           "embed key replaced: earlier widget URLs now answer 403 "
                           "(POST /v1/embeds makes new ones)")


@keys_app.command("list")
def keys_list(data_dir: DataDir = None, json_output: Json = False) -> None:
    """The signing keys: kid, created, active / retired (still verifying) / expired."""
    from tally.security.keys import list_keys

    keys = list_keys(_signing_keys(data_dir))
    if json_output:
        print_json(keys)
        return
    if not keys:
        typer.echo("no signing keys yet (tally serve makes the first)")
        return
    print_table(("KID", "STATE", "CREATED", "RETIRED"),
                [(str(k["kid"]), str(k["state"]), str(k["created_at"]),
                  str(k["retired_at"] or "-")) for k in keys])


if __name__ == "__main__":  # pragma: no cover
    app()
