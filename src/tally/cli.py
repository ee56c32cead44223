"""The ``tally`` command (CONTRACT §1)."""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from pydantic import ValidationError

from tally.config import Settings, get_settings
from tally.errors import StoreUnavailable, UserError

app = typer.Typer(help="Tally: analytics API for online gaming operators.",
                  no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False)  # never print locals (secrets) on a crash
client_app = typer.Typer(help="Manage OAuth2 clients.", no_args_is_help=True)
app.add_typer(client_app, name="client")
audit_app = typer.Typer(help="The tamper-evident audit log.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")
keys_app = typer.Typer(help="Token signing keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")

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
    except ValidationError as exc:  # a bad TALLY_* value: one line naming it, no traceback
        error = exc.errors()[0]
        name = "_".join(str(part) for part in error["loc"]).upper()
        fail(f"invalid configuration: TALLY_{name}: {error['msg']}")
    except Exception as exc:
        fail(f"invalid configuration: {exc}".splitlines()[0])
    return base.model_copy(update={"data_dir": data_dir}) if data_dir else base


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.", min=0, max=65535)] = 8000,
    data_dir: DataDir = None,
    ssl_certfile: Annotated[Path | None, typer.Option(
        help="Server certificate (PEM): serve HTTPS. Default $TALLY_SSL_CERTFILE.")] = None,
    ssl_keyfile: Annotated[Path | None, typer.Option(
        help="Server private key (PEM). Default $TALLY_SSL_KEYFILE.")] = None,
    ssl_client_ca: Annotated[Path | None, typer.Option(
        help="CA certificates (PEM) of client certificates: require mutual TLS. "
             "Default $TALLY_SSL_CLIENT_CA.")] = None,
) -> None:
    """Run the API on the embedded store (HTTPS and mutual TLS with the --ssl-* options)."""
    import uvicorn

    from tally.api.app import create_app
    from tally.api.connections import server_options as edge_options
    from tally.observability.logs import configure_logging
    from tally.runtime import Runtime, tune_gc
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
        runtime = Runtime.open(settings)
    except StoreUnavailable as exc:
        fail(str(exc))
    tune_gc()
    uvicorn.run(create_app(settings, runtime), host=host, port=port, log_config=None,
                access_log=False, timeout_graceful_shutdown=5, **{**tls, **edge})


@client_app.command("create")
def client_create(
    name: Annotated[str, typer.Option(help="Human-readable client name.")],
    scopes: Annotated[str, typer.Option(help='Space-separated, e.g. "events:write admin".')],
    brands: Annotated[str | None, typer.Option(
        help="Comma-separated brands; omit for all (an empty value is an error).")]
    = None,
    regions: Annotated[str | None, typer.Option(
        help="Comma-separated regions; omit for all (an empty value is an error).")]
    = None,
    metrics: Annotated[str | None, typer.Option(
        help="Comma-separated metrics; omit for all (an empty value is an error).")]
    = None,
    min_group_size: Annotated[int | None, typer.Option(
        help="Withhold distinct-player counts below this (dau, wau, mau); default none.")]
    = None,
    cert_file: Annotated[Path | None, typer.Option(
        help="Bind the client to this certificate (PEM or DER): its tokens are usable only "
             "over mutual TLS presenting it (RFC 8705).")] = None,
    cert_thumbprint: Annotated[str | None, typer.Option(
        help="Same, by the certificate's x5t#S256 (base64url SHA-256 of the DER).")] = None,
    data_dir: DataDir = None,
) -> None:
    """Register an OAuth2 client; prints {"client_id", "client_secret"} on stdout."""
    from tally import metadata
    from tally.security.clients import create_client
    from tally.security.mtls import certificate_thumbprint, parse_thumbprint

    settings = settings_for(data_dir)
    try:
        if cert_file is not None and cert_thumbprint is not None:
            fail("give --cert-file or --cert-thumbprint, not both")
        try:
            bound = (certificate_thumbprint(cert_file.read_bytes()) if cert_file is not None
                     else parse_thumbprint(cert_thumbprint) if cert_thumbprint is not None
                     else None)
        except OSError as exc:
            fail(f"cannot read {cert_file}: {exc.strerror or exc}")
        con = metadata.connect(settings.data_dir)
        client_id, secret = create_client(con, name, scopes, brands, regions, metrics,
                                          min_group_size, bound)
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


@audit_app.command("verify")
def audit_verify(data_dir: DataDir = None) -> None:
    """Verify the audit log (works while serving): exit 0 if intact, 1 with the first bad
    entry."""
    import sqlite3

    from tally.audit.verify import verify_data_dir

    settings = settings_for(data_dir)
    try:
        verdict = verify_data_dir(settings.data_dir)
    except (StoreUnavailable, OSError, sqlite3.Error) as exc:
        fail(str(exc))
    if not verdict.intact:
        fail(f"audit log is not intact: {verdict.summary()}", 1)
    typer.echo(verdict.summary())


def _signing_keys(data_dir: Path | None) -> sqlite3.Connection:
    from tally import metadata

    settings = settings_for(data_dir)
    if settings.jwks_url:
        fail("TALLY_JWKS_URL is set: the identity provider signs tokens, not this deployment")
    try:
        return metadata.connect(settings.data_dir)
    except StoreUnavailable as exc:
        fail(str(exc))


@keys_app.command("rotate")
def keys_rotate(
    revoke: Annotated[bool, typer.Option(
        "--revoke", help="Retire the old keys with no grace: their tokens fail at once "
                         "(a leaked key).")] = False,
    data_dir: DataDir = None,
) -> None:
    """Make a new signing key; old keys keep verifying until their tokens expire."""
    from tally.security.keys import rotate

    con = _signing_keys(data_dir)
    sys.stdout.write(json.dumps(rotate(con, revoke=revoke)) + "\n")


@keys_app.command("list")
def keys_list(data_dir: DataDir = None) -> None:
    """The signing keys: kid, created, active / retired (still verifying) / expired."""
    from tally.security.keys import list_keys

    con = _signing_keys(data_dir)
    sys.stdout.write(json.dumps(list_keys(con)) + "\n")


if __name__ == "__main__":  # pragma: no cover
    app()
