"""``tally client …``: register, list, show, revoke and re-key OAuth2 clients (CONTRACT §1).

All work while ``tally serve`` runs (SQLite in WAL mode). ``create`` prints its JSON only
(the contract pins it) and may make a new store — registering clients is how a deployment is
provisioned before its first ``serve``; the other commands need an existing store and exit 1
for an unknown client id. A secret is printed by ``create`` and ``rotate-secret`` only, once.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

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
from tally.errors import StoreUnavailable, UserError

if TYPE_CHECKING:
    from tally.security.clients import ClientRecord

client_app = typer.Typer(help="Manage OAuth2 clients.", no_args_is_help=True)


def _complete_client_id(ctx: typer.Context, incomplete: str) -> list[str]:
    """Shell completion of a client id from the store at ``--data-dir`` (if given first)."""
    from tally.audit.checkpoints import connect_readonly

    data_dir = ctx.params.get("data_dir") or settings_for(None).data_dir
    try:
        con = connect_readonly(Path(data_dir))
        if con is None:
            return []
        try:
            ids = [r[0] for r in con.execute("SELECT client_id FROM clients")]
        finally:
            con.close()
    except sqlite3.Error:
        return []
    return sorted(i for i in ids if i.startswith(incomplete))


ClientId = Annotated[str, typer.Argument(metavar="ID", help="The client id (cl_…).",
                                         autocompletion=_complete_client_id)]


def _limit_option(what: str) -> Any:  # typer.Option is typed Any
    return typer.Option(metavar="LIST", help=f"Comma-separated {what}; omit for all (an empty "
                                             "value is an error).")


@client_app.command("create")
def client_create(
    name: Annotated[str, typer.Option(metavar="NAME", help="Human-readable client name.")],
    scopes: Annotated[str, typer.Option(
        metavar='"S1 S2"', help='Space-separated, e.g. "events:write admin".')],
    brands: Annotated[str | None, _limit_option("brand ids")] = None,
    regions: Annotated[str | None, _limit_option("regions, among TALLY_REGIONS")] = None,
    providers: Annotated[str | None, _limit_option(
        "game provider ids (a studio's partner token: only bets on their games)")] = None,
    metrics: Annotated[str | None, _limit_option(
        "metrics (GET /v1/metrics) and analyses (funnel, retention, ltv)")] = None,
    min_group_size: Annotated[int | None, typer.Option(
        metavar="K", help="Withhold distinct-player counts below K (dau, wau, mau); default "
                          "none.")] = None,
    cert_file: Annotated[Path | None, typer.Option(
        metavar="PEM", help="Bind the client to this certificate (PEM or DER): its tokens are "
                            "usable only over mutual TLS presenting it (RFC 8705).")] = None,
    cert_thumbprint: Annotated[str | None, typer.Option(
        metavar="X5T", help="Same, by the certificate's x5t#S256 (base64url SHA-256 of the "
                            "DER).")] = None,
    data_dir: DataDir = None,
    json_output: Json = False,  # noqa: ARG001 - the output is JSON either way (CONTRACT §1)
) -> None:
    """Register an OAuth2 client; prints {"client_id", "client_secret"} on stdout."""
    from tally import metadata
    from tally.security.clients import check_limits, create_client
    from tally.security.mtls import certificate_thumbprint, parse_thumbprint

    settings = settings_for(data_dir)
    try:
        if cert_file is not None and cert_thumbprint is not None:
            fail("give --cert-file or --cert-thumbprint, not both")
        check_limits(brands, regions, metrics, settings.served_regions, providers)
        try:
            bound = (certificate_thumbprint(cert_file.read_bytes()) if cert_file is not None
                     else parse_thumbprint(cert_thumbprint) if cert_thumbprint is not None
                     else None)
        except OSError as exc:
            fail(f"cannot read {cert_file}: {exc.strerror or exc}")
        con = metadata.connect(settings.data_dir)
        client_id, secret = create_client(con, name, scopes, brands, regions, metrics,
                                          min_group_size, bound, providers)
    except (StoreUnavailable, UserError) as exc:
        fail(str(exc))
    print_json({"client_id": client_id, "client_secret": secret})


def _limit_text(items: tuple[str, ...] | None) -> str:
    if items is None:
        return "all"
    return ",".join(items) if items else "(empty: gets no token)"


@client_app.command("list")
def client_list(data_dir: DataDir = None, json_output: Json = False) -> None:
    """Every client, oldest first: id, name, status, scopes and limits (never a secret)."""
    from tally.security.clients import client_records

    records = client_records(existing_metadata(data_dir))
    if json_output:
        print_json([r.public() for r in records])
        return
    if not records:
        typer.echo("no clients (register one with tally client create)")
        return
    print_table(("CLIENT ID", "NAME", "STATUS", "SCOPES", "BRANDS", "REGIONS", "PROVIDERS",
                 "METRICS", "CREATED"),
                [(r.client_id, r.name, r.status, " ".join(r.scopes), _limit_text(r.brands),
                  _limit_text(r.regions), _limit_text(r.providers), _limit_text(r.metrics),
                  r.created_at[:19] + "Z")
                 for r in records])


def _record(data_dir: Path | None, client_id: str) -> tuple[sqlite3.Connection, ClientRecord]:
    from tally.security.clients import UnknownClient, client_record

    con = existing_metadata(data_dir)
    try:
        return con, client_record(con, client_id)
    except UnknownClient as exc:
        fail(str(exc), REFUSED)


@client_app.command("show")
def client_show(client_id: ClientId, data_dir: DataDir = None, json_output: Json = False) -> None:
    """One client: its limits, status and the dates of its revocation and secret rotation."""
    _, record = _record(data_dir, client_id)
    if json_output:
        print_json(record.public())
        return
    print_fields([
        ("client_id", record.client_id), ("name", record.name),
        ("status", record.status + (f" since {record.revoked_at}" if record.revoked_at
                                    else "")),
        ("scopes", " ".join(record.scopes)), ("brands", _limit_text(record.brands)),
        ("regions", _limit_text(record.regions)),
        ("providers", _limit_text(record.providers)), ("metrics", _limit_text(record.metrics)),
        ("min_group_size", str(record.min_group_size or "none")),
        ("cert_thumbprint", record.cert_thumbprint or "none (not bound)"),
        ("created_at", record.created_at),
        ("secret_rotated_at", record.secret_rotated_at or "never"),
        ("tokens_not_before", "-" if record.tokens_not_before_at is None
         else f"{record.tokens_not_before_at} (tokens issued before it are refused)"),
    ])


@client_app.command("revoke")
def client_revoke(client_id: ClientId, data_dir: DataDir = None,
                  json_output: Json = False) -> None:
    """Revoke a client for good: no new token, and its tokens stop working within a second."""
    from tally.security.clients import revoke_client

    con, _ = _record(data_dir, client_id)
    record, changed = revoke_client(con, client_id)
    if json_output:
        print_json({"client_id": record.client_id, "status": record.status,
                    "revoked_at": record.revoked_at, "changed": changed})
    elif changed:
        typer.echo(f"revoked {record.client_id} ({record.name}) at {record.revoked_at}: it "
                   "gets no new token and its tokens stop working within a second")
    else:
        typer.echo(f"{record.client_id} ({record.name}) was already revoked"
                   + (f" at {record.revoked_at}" if record.revoked_at else ""))


@client_app.command("rotate-secret")
def client_rotate_secret(
    client_id: ClientId,
    revoke_tokens: Annotated[bool, typer.Option(
        "--revoke-tokens", help="Also refuse every token issued so far, within a second (a "
                                "leaked secret). Without it they live out their lifetime.")]
    = False,
    data_dir: DataDir = None,
    json_output: Json = False,
) -> None:
    """A new secret, printed once; the old one gets no token from now on."""
    from tally.security.clients import RevokedClient, rotate_secret

    con, _ = _record(data_dir, client_id)
    try:
        record, secret = rotate_secret(con, client_id, revoke_tokens)
    except RevokedClient as exc:
        fail(str(exc), REFUSED)
    if json_output:
        print_json({"client_id": record.client_id, "client_secret": secret})
        return
    print_fields([("client_id", record.client_id), ("client_secret", secret)])
    typer.echo("The secret above is shown once; the old one gets no token from now "
               "on; tokens already issued " + ("are refused within a second" if revoke_tokens
                                               else "stay valid until they expire"), err=True)
