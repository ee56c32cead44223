"""Fails when a setting, route or CLI command is not documented."""

from __future__ import annotations

from pathlib import Path

from tally.api.app import create_app
from tally.cli import app as cli_app
from tally.config import Settings

ROOT = Path(__file__).resolve().parents[1]


def test_every_setting_is_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    for name in Settings.model_fields:
        assert f"TALLY_{name.upper()}" in readme, name


def test_every_route_is_in_docs_api():
    api_doc = (ROOT / "docs" / "api.md").read_text()
    paths = create_app(Settings()).openapi()["paths"]
    routes = [f"{method.upper()} {path}" for path, ops in paths.items() for method in ops]
    assert "POST /v1/events:batch" in routes and len(routes) >= 8
    missing = [route for route in routes if f"`{route}`" not in api_doc]
    assert missing == []


def test_every_cli_command_is_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    def name(command) -> str:
        return command.name or command.callback.__name__.replace("_", "-")

    names = [name(c) for c in cli_app.registered_commands]
    names += [f"{g.name} {name(c)}" for g in cli_app.registered_groups
              for c in g.typer_instance.registered_commands]
    assert "serve" in names and "client create" in names
    for name in names:
        assert f"`tally {name}" in readme, name


def test_readme_quick_start_has_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert "make run" in readme and "make test" in readme
