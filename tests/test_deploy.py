"""The deployable topology (issue 15 item 5): ``Dockerfile`` and ``deploy/compose.yaml``.

No container engine runs here, so this checks what can be checked without one
(docs/operations.md#deployable-topology says what was and was not run):

- ``docker-compose config`` (Debian's, ``make compose``: it validates against the Compose
  schema and resolves the file offline, no daemon) accepts the file, and refuses it without
  its secrets; its resolved form is then checked: every image pinned by a version tag, every
  bind-mounted file in the repository, the services, health checks, ports and the mounts of
  the rules and the dashboard;
- ``promtool check config`` accepts Prometheus' configuration (with the rules it loads);
- the Dockerfile's structure (no linter is installable here: hadolint is neither on PyPI nor in
  Debian 12), and its install steps run for real: its build stage's ``COPY`` and ``uv sync``
  lines, replayed in a scratch directory with this machine's uv, give an environment whose
  ``tally`` runs and that holds no development tool.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.promtool import promtool

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = Path(os.environ.get("TALLY_TEST_COMPOSE", "/usr/bin/docker-compose"))
SECRETS = {"CLICKHOUSE_PASSWORD": "ch-secret", "TALLY_METRICS_TOKEN": "scrape-token-0123456789",
           "GRAFANA_ADMIN_PASSWORD": "gf-secret"}
SERVICES = {"clickhouse", "redpanda", "redpanda-topic", "redis", "tally-1", "tally-2", "proxy",
            "prometheus", "grafana"}
UV = ROOT / ".tools" / "bin" / "uv"


def compose_config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    if not COMPOSE.exists():
        subprocess.run(["bash", str(ROOT / "scripts" / "install-compose.sh")], check=True)
    clean = {k: v for k, v in os.environ.items() if k not in SECRETS and k != "DOCKER_HOST"}
    return subprocess.run(
        [str(COMPOSE), "--project-directory", str(DEPLOY), "-f", str(DEPLOY / "compose.yaml"),
         "config"], capture_output=True, text=True, timeout=60, cwd=DEPLOY,
        env={**clean, "DOCKER_HOST": "unix:///nonexistent/docker.sock", **env})


@pytest.fixture(scope="module")
def resolved() -> dict[str, Any]:
    out = compose_config(SECRETS)
    assert out.returncode == 0, out.stderr
    config: dict[str, Any] = yaml.safe_load(out.stdout)
    return config


def test_compose_config_accepts_the_file_and_refuses_it_without_its_secrets():
    for missing in SECRETS:
        out = compose_config({k: v for k, v in SECRETS.items() if k != missing})
        assert out.returncode != 0 and missing in out.stderr, (missing, out.stderr)


def test_the_topology_has_every_service_with_a_health_check(resolved: dict[str, Any]):
    services = resolved["services"]
    assert set(services) == SERVICES
    for name, service in services.items():
        if name != "redpanda-topic":  # a one-shot job: it exits when the topic exists
            assert service.get("healthcheck", {}).get("test"), name
            assert service.get("restart") == "unless-stopped", name
    assert services["redpanda-topic"]["restart"] == "no"


def test_every_image_is_pinned_by_a_version_tag(resolved: dict[str, Any]):
    for name, service in resolved["services"].items():
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and "/" not in tag, (name, image)
        assert tag != "latest" and re.search(r"\d+\.\d+", tag), (name, image)


def _binds(service: dict[str, Any]) -> list[tuple[Path, str]]:
    out = []
    for volume in service.get("volumes", []):
        source, target = (volume.split(":")[:2] if isinstance(volume, str)
                          else (volume["source"], volume["target"]))
        if source.startswith("/"):
            out.append((Path(source), target))
    return out


def test_every_bind_mount_is_a_file_of_the_repository(resolved: dict[str, Any]):
    mounted = {}
    for name, service in resolved["services"].items():
        for source, target in _binds(service):
            assert source.exists(), (name, source)
            assert source.resolve().is_relative_to(DEPLOY), (name, source)
            assert source.resolve().is_relative_to(ROOT)
            mounted[(name, target)] = source.resolve()
    assert mounted[("prometheus", "/etc/prometheus/tally.rules.yml")] \
        == DEPLOY / "prometheus" / "tally.rules.yml"
    assert mounted[("prometheus", "/etc/prometheus/prometheus.yml")] \
        == DEPLOY / "prometheus" / "prometheus.yml"
    assert mounted[("grafana", "/var/lib/grafana/dashboards/tally/tally.json")] \
        == DEPLOY / "grafana" / "tally.json"
    assert mounted[("proxy", "/etc/nginx/nginx.conf")] == DEPLOY / "nginx" / "nginx.conf"
    provisioning = DEPLOY / "grafana" / "provisioning"
    assert mounted[("grafana", "/etc/grafana/provisioning/dashboards")] \
        == provisioning / "dashboards"
    provider = yaml.safe_load((provisioning / "dashboards" / "tally.yaml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards/tally"
    source = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())
    assert source["datasources"][0]["url"] == "http://prometheus:9090"
    for replica in ("tally-1", "tally-2"):  # each its own data dir (journal, audit, keys)
        assert [v.split(":")[1] for v in resolved["services"][replica]["volumes"]] \
            == ["/var/lib/tally"]


def test_the_replicas_use_only_settings_that_exist(resolved: dict[str, Any]):
    from tally.config import Settings

    known = {f"TALLY_{name.upper()}" for name in Settings.model_fields}
    one, two = (resolved["services"][r]["environment"] for r in ("tally-1", "tally-2"))
    for env in (one, two):
        assert {k for k in env if k.startswith("TALLY_")} <= known
        assert env["TALLY_STORE"].startswith("http://tally:ch-secret@clickhouse:8123/")
        assert env["TALLY_REDIS_URL"] == "redis://redis:6379/0"
        assert env["TALLY_METRICS_TOKEN"] == SECRETS["TALLY_METRICS_TOKEN"]
        Settings(**{k.removeprefix("TALLY_").lower(): v for k, v in env.items()
                    if k.startswith("TALLY_")})  # every value valid
    assert one["TALLY_CONSUME_FROM"] == "kafka://redpanda:9092/tally-events"
    assert "TALLY_CONSUME_FROM" not in two  # one consumer: docs/operations.md says why
    proxy_ip = resolved["services"]["proxy"]["networks"]["tally"]["ipv4_address"]
    assert one["TALLY_FORWARDED_ALLOW_IPS"] == proxy_ip
    topic = resolved["services"]["redpanda-topic"]["entrypoint"]
    assert "tally-events" in topic
    for name in ("tally-1", "tally-2"):
        assert resolved["services"][name]["build"]["context"] == str(ROOT)
        assert resolved["services"][name]["depends_on"]["clickhouse"]["condition"] \
            == "service_healthy"


def test_ports_published_are_the_proxy_and_local_dashboards(resolved: dict[str, Any]):
    published = {name: service.get("ports", []) for name, service in
                 resolved["services"].items() if service.get("ports")}
    assert set(published) == {"proxy", "prometheus", "grafana"}

    def parts(port: str | dict[str, Any]) -> tuple[str, int]:  # (host address, target)
        if isinstance(port, dict):
            return port.get("host_ip", ""), int(port["target"])
        *host, _published, target = port.split(":")
        return (host[0] if host else ""), int(target.removesuffix("/tcp"))

    assert parts(published["proxy"][0]) == ("", 8080)  # the API, on every interface
    assert parts(published["prometheus"][0]) == ("127.0.0.1", 9090)  # loopback only
    assert parts(published["grafana"][0]) == ("127.0.0.1", 3000)


def test_the_proxy_sends_ingestion_to_the_writer_only():
    conf = (DEPLOY / "nginx" / "nginx.conf").read_text()
    upstreams = dict(re.findall(r"upstream (\w+) \{(.*?)\}", conf, re.DOTALL))
    assert re.findall(r"server (\S+)", upstreams["tally_write"]) == ["tally-1:8000"]
    assert re.findall(r"server (\S+?)[ ;]", upstreams["tally_read"]) \
        == ["tally-1:8000", "tally-2:8000"]
    assert "tally-2:8000 backup" in upstreams["tally_read"]
    ingest = re.search(r"location = /v1/events:batch \{(.*?)\}", conf, re.DOTALL)
    assert ingest and "proxy_pass http://tally_write;" in ingest[1]
    assert "proxy_next_upstream off;" in ingest[1]
    assert "listen 8080;" in conf and "location = /proxy-health" in conf
    assert conf.count("{") == conf.count("}")


def test_prometheus_configuration_and_its_rules_pass_promtool(tmp_path: Path):
    token = tmp_path / "token"
    token.write_text("scrape-token-0123456789")
    text = (DEPLOY / "prometheus" / "prometheus.yml").read_text()
    config = yaml.safe_load(text)
    assert config["rule_files"] == ["tally.rules.yml"]
    job = config["scrape_configs"][0]
    assert job["static_configs"][0]["targets"] == ["tally-1:8000", "tally-2:8000"]
    # the token file is written by the container's entrypoint: here, a scratch one
    shutil.copy(DEPLOY / "prometheus" / "tally.rules.yml", tmp_path / "tally.rules.yml")
    (tmp_path / "prometheus.yml").write_text(
        text.replace(job["authorization"]["credentials_file"], str(token)))
    out = promtool("check", "config", tmp_path / "prometheus.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 rule files found" in out.stdout and "SUCCESS" in out.stdout


# ------------------------------------------------------------------ the Dockerfile


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: comments dropped, continuations joined."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip().removesuffix("\\") + " " if line.rstrip().endswith("\\") \
            else line
        if not line.rstrip().endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
            pending = ""
    assert not pending, "a continuation at the end of the file"
    return out


def stages(steps: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = []
    for step in steps:
        if step[0] == "FROM":
            out.append([])
        out[-1].append(step)
    return out


def test_the_dockerfile_is_slim_pinned_unprivileged_and_locked():
    steps = instructions(ROOT / "Dockerfile")
    build, final = stages(steps)
    for stage in (build, final):
        image = stage[0][1].split()[0]
        assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", image), image
    runs = [args for kind, args in build if kind == "RUN"]
    assert any(re.search(r"pip install .*uv==\d+\.\d+\.\d+", r) for r in runs)
    syncs = [r for r in runs if r.startswith("uv sync")]
    assert syncs and all("--frozen" in r and "--no-dev" in r for r in syncs)
    final_kinds = dict(final)
    assert final_kinds["USER"].split(":")[0] == "tally"
    assert [k for k, _ in final].index("USER") > max(
        i for i, (k, _) in enumerate(final) if k in ("RUN", "COPY"))  # nothing runs as root after
    assert final_kinds["EXPOSE"] == "8000"
    assert "/healthz" in final_kinds["HEALTHCHECK"]
    assert "/var/lib/tally" in final_kinds["VOLUME"]
    assert "TALLY_DATA_DIR=/var/lib/tally" in final_kinds["ENV"]
    command = final_kinds["CMD"]
    assert '"serve"' in command and '"0.0.0.0"' in command and '"8000"' in command
    assert all(k not in ("ADD",) for k, _ in steps)  # COPY only: nothing fetched by ADD
    assert not any("latest" in args for k, args in steps if k == "FROM")
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "tests", "data"} <= set(ignored)


def test_the_dockerfile_install_steps_give_a_working_tally_without_dev_tools(tmp_path: Path):
    """The build stage's COPY and uv sync lines, replayed here (this machine's Python and uv,
    not the image's): the lock installs, the project builds, nothing of the dev group comes."""
    build = stages(instructions(ROOT / "Dockerfile"))[0]
    work, env_dir = tmp_path / "src", tmp_path / "env"
    work.mkdir()
    env = {**os.environ, "UV_PROJECT_ENVIRONMENT": str(env_dir), "UV_PYTHON_DOWNLOADS": "never",
           "UV_PYTHON": sys.executable}
    env.pop("VIRTUAL_ENV", None)
    for kind, args in build:
        if kind == "COPY":
            *sources, _target = shlex.split(args)
            for source in sources:
                origin = ROOT / source
                if origin.is_dir():
                    shutil.copytree(origin, work / source, dirs_exist_ok=True)
                else:
                    shutil.copy(origin, work / source)
        elif kind == "RUN" and args.startswith("uv sync"):
            out = subprocess.run([str(UV), *shlex.split(args)[1:]], cwd=work, env=env,
                                 capture_output=True, text=True, timeout=600)
            assert out.returncode == 0, out.stderr[-3000:]
    version = subprocess.run([str(env_dir / "bin" / "tally"), "--version"],
                             capture_output=True, text=True, timeout=120)
    assert version.returncode == 0 and version.stdout.startswith("tally "), version.stderr
    site = next(env_dir.glob("lib/python*/site-packages"))
    installed = {p.name.split("-")[0].lower() for p in site.glob("*.dist-info")}
    assert "tally" in installed and "fastapi" in installed
    assert not installed & {"pytest", "mypy", "ruff", "hypothesis", "schemathesis",
                            "tally_client"}
    assert not (site / "tally.pth").exists() and (site / "tally" / "cli.py").exists()
