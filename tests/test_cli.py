"""The operator's command line, through the real ``tally`` executable (issue 10 item 5).

``--version``, completion and help; ``client list | show | revoke | rotate-secret`` in text and
``--json``; limits checked against the catalog and the served regions; commands that read a
store refusing a directory that holds none; a busy port refused before anything is opened or
printed (``tally serve`` and ``make run``); and, against a real ``tally serve``, revocation and
secret rotation taking effect within a second. Every error: one line on stderr, exit 2 (the
command cannot run as given) or 1 (it ran, and the answer is no).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

import httpx2 as httpx
import pytest

import tally
from tally.cli import app as cli_app
from tests.server import TALLY, Server, cli, new_client, token

ROOT = Path(__file__).resolve().parents[1]
WITHIN_A_SECOND = 1.0 + 0.5  # the server's refresh period, plus a loaded machine's latency


def tally_run(*args: str, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``tally ARGS`` without an implicit ``--data-dir``."""
    return subprocess.run([TALLY, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})}, cwd=cwd)


def assert_one_line_error(out: subprocess.CompletedProcess[str], code: int, *names: str) -> None:
    assert out.returncode == code, (out.returncode, out.stdout, out.stderr)
    assert out.stdout == ""
    assert out.stderr.startswith("tally: ") and out.stderr.count("\n") == 1, out.stderr
    for name in names:
        assert name in out.stderr, (name, out.stderr)


def created(data: Path, *args: str) -> dict[str, str]:
    out = cli("client", "create", "--name", "bi", "--scopes", "analytics:read", *args,
              data_dir=data)
    assert out.returncode == 0, out.stderr
    creds: dict[str, str] = json.loads(out.stdout)
    return creds


# ------------------------------------------------------------------ version, help, completion


def test_version_is_the_package_version():
    out = tally_run("--version")
    assert out.returncode == 0 and out.stderr == ""
    assert out.stdout == f"tally {version('tally')}\n" == f"tally {tally.__version__}\n"


def _command_paths() -> list[tuple[str, ...]]:
    def name(command: object) -> str:
        info = command  # a typer CommandInfo
        return info.name or info.callback.__name__.replace("_", "-")  # type: ignore[attr-defined]

    paths: list[tuple[str, ...]] = [()]
    paths += [(name(c),) for c in cli_app.registered_commands]
    for group in cli_app.registered_groups:
        assert group.name is not None and group.typer_instance is not None
        paths.append((group.name,))
        paths += [(group.name, name(c)) for c in group.typer_instance.registered_commands]
    return paths


def test_every_help_renders_cleanly():
    """Plain help for every command and group: no ``<bool>`` after a flag, no box drawing, and
    ``--json`` on every command that prints a result (all but ``serve``)."""
    paths = _command_paths()
    assert ("client", "rotate-secret") in paths and ("keys", "list") in paths
    with ThreadPoolExecutor(4) as pool:
        helps = dict(zip(paths, pool.map(lambda p: tally_run(*p, "--help"), paths),
                         strict=True))
    groups = {(g.name,) for g in cli_app.registered_groups} | {()}
    for path, out in helps.items():
        assert out.returncode == 0, (path, out.stderr)
        text = out.stdout
        assert text.startswith(f"Usage: tally {' '.join(path)}".rstrip()), (path, text)
        assert "<bool>" not in text and "╭" not in text and "│" not in text, (path, text)
        if path not in groups and path != ("serve",):
            assert "--json" in text, path
    assert "--version" in helps[()].stdout and "--install-completion" in helps[()].stdout


def test_shell_completion_of_commands_and_client_ids(tmp_path: Path):
    # the shell named, not detected from the parent processes (none is a shell under make/xdist)
    script = tally_run("--show-completion", "bash",
                       env={"_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"})
    assert script.returncode == 0 and "_TALLY_COMPLETE" in script.stdout
    assert "complete" in script.stdout
    data = tmp_path / "data"
    ids = sorted(created(data)["client_id"] for _ in range(2))

    def complete(words: str) -> list[str]:
        env = {"_TALLY_COMPLETE": "complete_bash", "COMP_WORDS": words,
               "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1))}
        out = tally_run(env=env)
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    assert complete("tally client re") == ["revoke"]
    assert complete("tally client ro") == ["rotate-secret"]
    assert complete(f"tally client show --data-dir {data} cl_") == ids
    assert complete(f"tally client revoke --data-dir {data} {ids[1][:-2]}") == [ids[1]]


# ------------------------------------------------------------------ client create: limits


@pytest.mark.parametrize(("args", "env", "names"), [
    (("--regions", "EU,MARS"), {}, ("--regions", "'MARS'", "EU, LATAM, NA, UK")),
    (("--regions", "NA"), {"TALLY_REGIONS": "EU,UK"}, ("'NA'", "serves EU, UK")),
    (("--metrics", "ggr,revenue,fun"), {}, ("--metrics", "'fun'", "'revenue'")),
    (("--metrics", "Funnel"), {}, ("'Funnel'",)),
    (("--brands", "brand-1," + "b" * 129), {}, ("--brands", "not a brand id", "1-128")),
], ids=["unknown-region", "unserved-region", "unknown-metrics", "metric-case",
        "brand-too-long"])
def test_create_refuses_an_unknown_limit(tmp_path: Path, args: tuple[str, ...],
                                         env: dict[str, str], names: tuple[str, ...]):
    data = tmp_path / "data"
    out = cli("client", "create", "--name", "bi", "--scopes", "analytics:read", *args,
              data_dir=data, env=env)
    assert_one_line_error(out, 2, *names)
    assert not data.exists()  # refused before anything was written


def test_create_accepts_catalog_metrics_analyses_served_regions_and_brand_ids(tmp_path: Path):
    """The control: every name that exists is accepted and stored as given; a new directory
    becomes a store (registering clients provisions a deployment before its first serve)."""
    data = tmp_path / "new" / "data"
    brand = "b" * 128
    creds = created(data, "--metrics", "ggr,rtp,funnel,retention,ltv", "--regions", "EU,APAC",
                    "--brands", f"brand-1,{brand}", "--json")
    assert set(creds) == {"client_id", "client_secret"}
    shown = json.loads(cli("client", "show", creds["client_id"], "--json", data_dir=data).stdout)
    assert shown["metrics"] == ["funnel", "ggr", "ltv", "retention", "rtp"]
    assert shown["regions"] == ["APAC", "EU"] and shown["brands"] == [brand, "brand-1"]


# ------------------------------------------------------------------ no store, no answer


READERS = [("client", "list"), ("client", "show", "cl_0000000000000000"),
           ("client", "revoke", "cl_0000000000000000"),
           ("client", "rotate-secret", "cl_0000000000000000"), ("keys", "list"),
           ("keys", "rotate"), ("audit", "verify"), ("client", "list", "--json")]


@pytest.mark.parametrize("args", READERS, ids=" ".join)
def test_reading_commands_refuse_a_directory_without_a_store(tmp_path: Path,
                                                             args: tuple[str, ...]):
    typo = tmp_path / "typo"
    assert_one_line_error(cli(*args, data_dir=typo), 2, f"no Tally store at {typo}")
    assert not typo.exists()  # and none was made
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(cli(*args, data_dir=empty), 2, "no Tally store")
    assert list(empty.iterdir()) == []


# ------------------------------------------------------------------ list and show


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, str]]]:
    data = tmp_path_factory.mktemp("clients") / "data"
    first = created(data)
    second = created(data, "--brands", "brand-2,brand-1", "--regions", "UK",
                     "--metrics", "ggr,funnel", "--min-group-size", "10")
    return data, [first, second]


def test_list_and_show_in_text_and_json_never_print_a_secret(registered):
    data, (first, second) = registered
    listed = json.loads(cli("client", "list", "--json", data_dir=data).stdout)
    assert [c["client_id"] for c in listed] == [first["client_id"], second["client_id"]]
    now = datetime.now(UTC)
    assert listed[1] == {
        "client_id": second["client_id"], "name": "bi", "status": "active", "revoked": False,
        "scopes": ["analytics:read"], "brands": ["brand-1", "brand-2"], "regions": ["UK"],
        "metrics": ["funnel", "ggr"], "providers": None, "min_group_size": 10,
        "cert_thumbprint": None,
        "created_at": listed[1]["created_at"], "revoked_at": None, "secret_rotated_at": None,
        "tokens_not_before": None,
    }
    assert abs((now - datetime.fromisoformat(listed[1]["created_at"])).total_seconds()) < 120
    assert listed[0]["brands"] is None and listed[0]["metrics"] is None

    table = cli("client", "list", data_dir=data)
    assert table.returncode == 0 and table.stderr == ""
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["CLIENT", "ID", "NAME", "STATUS", "SCOPES", "BRANDS", "REGIONS",
                              "PROVIDERS", "METRICS", "CREATED"]
    assert rows[0].split()[:8] == [first["client_id"], "bi", "active", "analytics:read", "all",
                                   "all", "all", "all"]
    assert rows[1].split()[:8] == [second["client_id"], "bi", "active", "analytics:read",
                                   "brand-1,brand-2", "UK", "all", "funnel,ggr"]

    shown = cli("client", "show", second["client_id"], "--json", data_dir=data)
    assert json.loads(shown.stdout) == listed[1]
    text = cli("client", "show", second["client_id"], data_dir=data).stdout
    fields = dict(line.split(":", 1) for line in text.splitlines())
    assert fields["status"].strip() == "active" and fields["regions"].strip() == "UK"
    assert fields["min_group_size"].strip() == "10"
    assert fields["secret_rotated_at"].strip() == "never"
    for out in (json.dumps(listed), table.stdout, shown.stdout, text):
        assert first["client_secret"] not in out and second["client_secret"] not in out
        assert "secret_hash" not in out and "salt" not in out


def test_unknown_client_id_is_exit_1(registered):
    data, _ = registered
    for command in ("show", "revoke", "rotate-secret"):
        out = cli("client", command, "cl_ffffffffffffffff", "--json", data_dir=data)
        assert_one_line_error(out, 1, "no client 'cl_ffffffffffffffff'")


def test_a_store_without_clients_lists_none(tmp_path: Path):
    data = tmp_path / "data"
    created(data)
    (data / "meta.sqlite3").unlink()
    for name in ("meta.sqlite3-wal", "meta.sqlite3-shm"):
        (data / name).unlink(missing_ok=True)
    (data / "events.duckdb").write_bytes(b"")  # a store of events only (after tally demo)
    out = cli("client", "list", data_dir=data)
    assert out.returncode == 0 and out.stdout.startswith("no clients")
    assert json.loads(cli("client", "list", "--json", data_dir=data).stdout) == []


# ------------------------------------------------------------------ revoke, rotate (real server)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data = tmp_path_factory.mktemp("served") / "data"
    new_client(data)  # the store exists before the server
    running = Server(data)
    yield running
    running.stop()


def _get(url: str, headers: dict[str, str]) -> httpx.Response:
    return httpx.get(f"{url}/v1/metrics", headers=headers, timeout=10)


def _token_status(url: str, client_id: str, secret: str) -> httpx.Response:
    return httpx.post(f"{url}/oauth/token", auth=(client_id, secret),
                      data={"grant_type": "client_credentials"}, timeout=10)


def _seconds_until_refused(url: str, headers: dict[str, str], since: float) -> float:
    """Poll until the token is 401; the time from ``since`` (the command's return)."""
    while True:
        r = _get(url, headers)
        elapsed = time.monotonic() - since
        if r.status_code == 401:
            return elapsed
        assert r.status_code == 200, r.text
        assert elapsed < 5, "the token still works 5 s later"
        time.sleep(0.02)


@pytest.mark.slow
def test_revoked_client_gets_no_token_and_its_tokens_stop_within_a_second(server: Server):
    victim, bystander = new_client(server.data_dir), new_client(server.data_dir)
    victim_h, bystander_h = token(server.url, *victim), token(server.url, *bystander)
    assert _get(server.url, victim_h).status_code == 200  # the control

    out = cli("client", "revoke", victim[0], data_dir=server.data_dir)
    returned = time.monotonic()
    assert out.returncode == 0 and out.stdout.startswith(f"revoked {victim[0]} (e2e) at ")
    assert _seconds_until_refused(server.url, victim_h, returned) <= WITHIN_A_SECOND
    refused = _get(server.url, victim_h)
    assert refused.status_code == 401 and "revoked" in refused.json()["detail"]
    assert refused.headers["content-type"].startswith("application/problem+json")
    assert _token_status(server.url, *victim).status_code == 401  # no new token either
    assert _get(server.url, bystander_h).status_code == 200  # nobody else is touched

    shown = json.loads(cli("client", "show", victim[0], "--json",
                           data_dir=server.data_dir).stdout)
    assert shown["status"] == "revoked" and shown["revoked"] is True
    revoked_at = datetime.fromisoformat(shown["revoked_at"])
    assert abs((datetime.now(UTC) - revoked_at).total_seconds()) < 60
    again = cli("client", "revoke", victim[0], "--json", data_dir=server.data_dir)
    assert again.returncode == 0
    assert json.loads(again.stdout) == {"client_id": victim[0], "status": "revoked",
                                        "revoked_at": shown["revoked_at"], "changed": False}
    text = cli("client", "revoke", victim[0], data_dir=server.data_dir)
    assert text.returncode == 0 and "already revoked" in text.stdout
    assert_one_line_error(cli("client", "rotate-secret", victim[0], data_dir=server.data_dir),
                          1, "is revoked")


@pytest.mark.slow
def test_rotate_secret_refuses_the_old_secret_at_once_and_keeps_issued_tokens(server: Server):
    client_id, old_secret = new_client(server.data_dir)
    old_h = token(server.url, client_id, old_secret)
    out = cli("client", "rotate-secret", client_id, "--json", data_dir=server.data_dir)
    assert out.returncode == 0 and out.stdout.count("\n") == 1
    rotated = json.loads(out.stdout)
    assert set(rotated) == {"client_id", "client_secret"} and rotated["client_id"] == client_id
    assert rotated["client_secret"] != old_secret
    assert _token_status(server.url, client_id, old_secret).status_code == 401
    new_h = token(server.url, client_id, rotated["client_secret"])
    assert _get(server.url, new_h).status_code == 200
    time.sleep(WITHIN_A_SECOND)  # the server has seen the change by now
    assert _get(server.url, old_h).status_code == 200  # issued tokens live out their life
    shown = cli("client", "show", client_id, data_dir=server.data_dir).stdout
    assert rotated["client_secret"] not in shown and "secret_rotated_at: never" not in shown


@pytest.mark.slow
def test_rotate_secret_with_revoke_tokens_refuses_issued_tokens_within_a_second(server: Server):
    client_id, old_secret = new_client(server.data_dir)
    old_h = token(server.url, client_id, old_secret)
    out = cli("client", "rotate-secret", client_id, "--revoke-tokens",
              data_dir=server.data_dir)
    returned = time.monotonic()
    assert out.returncode == 0, out.stderr
    fields = {k: v.strip() for k, v in (line.split(":", 1) for line in out.stdout.splitlines())}
    assert set(fields) == {"client_id", "client_secret"} and fields["client_id"] == client_id
    assert "shown once" in out.stderr and "refused within a second" in out.stderr
    assert _seconds_until_refused(server.url, old_h, returned) <= WITHIN_A_SECOND
    assert "rotated" in _get(server.url, old_h).json()["detail"]

    shown = json.loads(cli("client", "show", client_id, "--json",
                           data_dir=server.data_dir).stdout)
    not_before = datetime.fromisoformat(shown["tokens_not_before"]).timestamp()
    time.sleep(max(0.0, not_before - time.time()))  # a token of the rotation's second is old
    new_h = token(server.url, client_id, fields["client_secret"])
    assert _get(server.url, new_h).status_code == 200
    assert _get(server.url, old_h).status_code == 401


@pytest.mark.slow
def test_audit_verify_json_while_serving(server: Server):
    out = cli("audit", "verify", "--json", data_dir=server.data_dir)
    assert out.returncode == 0, out.stderr
    verdict = json.loads(out.stdout)
    assert verdict["intact"] is True and verdict["first_bad"] is None
    assert verdict["entries"] >= 1  # the token requests above
    text = cli("audit", "verify", data_dir=server.data_dir)
    assert text.stdout.startswith("intact: ")


def test_audit_verify_json_names_the_first_bad_entry(tmp_path: Path):
    data = tmp_path / "data"
    created(data)
    (data / "audit").mkdir()
    (data / "audit" / "audit.log").write_bytes(b'{"seq":1,"not":"an entry"}\n')
    out = cli("audit", "verify", "--json", data_dir=data)
    assert out.returncode == 1 and out.stderr == ""
    verdict = json.loads(out.stdout)
    assert verdict["intact"] is False and verdict["first_bad"]["seq"] == 1


# ------------------------------------------------------------------ keys


def test_keys_list_and_rotate_in_text_and_json(tmp_path: Path):
    data = tmp_path / "data"
    created(data)
    empty = cli("keys", "list", data_dir=data)
    assert empty.returncode == 0 and empty.stdout.startswith("no signing keys yet")
    first = cli("keys", "rotate", data_dir=data)
    assert first.returncode == 0, first.stderr
    fields = {k: v.strip() for k, v in (line.split(":", 1)
                                        for line in first.stdout.splitlines())}
    kid = fields["active"].split()[0]
    assert fields["retired"] == "none" and fields["deleted"] == "none"
    second = json.loads(cli("keys", "rotate", "--json", data_dir=data).stdout)
    assert second["retired"] == [kid] and second["deleted"] == []
    listed = json.loads(cli("keys", "list", "--json", data_dir=data).stdout)
    assert {k["kid"]: k["state"] for k in listed} == {kid: "retired",
                                                        second["active"]: "active"}
    header, *rows = cli("keys", "list", data_dir=data).stdout.splitlines()
    assert header.split() == ["KID", "STATE", "CREATED", "RETIRED"]
    assert sorted(row.split()[:2] for row in rows) == sorted([[kid, "retired"],
                                                              [second["active"], "active"]])


# ------------------------------------------------------------------ a busy port


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_serve_on_a_busy_port_is_one_line_before_anything_else(tmp_path: Path,
                                                               busy_port: int):
    data = tmp_path / "data"
    started = time.monotonic()
    out = cli("serve", "--port", str(busy_port), data_dir=data)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == f"tally: port {busy_port} on 127.0.0.1 is in use\n"
    assert not data.exists()  # no store opened, no log line written
    assert time.monotonic() - started < 10


def test_make_run_checks_the_port_before_its_banner(tmp_path: Path, busy_port: int):
    data = tmp_path / "data"
    out = subprocess.run(["bash", "scripts/run.sh", str(data), "127.0.0.1", str(busy_port),
                          "10", "1"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 2 and out.stdout == ""  # no banner, no demo load
    assert out.stderr == f"tally: port {busy_port} on 127.0.0.1 is in use\n"
    assert not data.exists()


# ------------------------------------------------------------------ demo


@pytest.mark.slow
def test_demo_summary_readable_or_json(tmp_path: Path):
    data = tmp_path / "data"
    text = cli("demo", "--events", "20", "--days", "1", data_dir=data)
    assert text.returncode == 0 and text.stdout == ""  # stdout stays clean
    assert text.stderr.splitlines()[-1].startswith(f"loaded 20 events into {data} in ")
    again = cli("demo", "--events", "20", "--days", "1", "--json", data_dir=data)
    assert again.returncode == 0
    summary = json.loads(again.stdout)  # same seed, same events: all duplicates now
    assert summary["events_generated"] == 20 and summary["accepted"] == 0
    assert summary["duplicates"] == 20 and summary["rejected"] == 0
