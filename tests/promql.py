"""The PromQL Tally ships (deploy/prometheus/tally.rules.yml, deploy/grafana/tally.json) as
plain expressions, and the metric names they read."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "tally.rules.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "tally.json"
# Grafana's interval variables stand for a duration; the dashboard's own ($job, $route) are
# regular expressions inside label matchers
DURATIONS = re.compile(r"\$__(rate_interval|interval|range)\b")
VARIABLE = re.compile(r"\$\{?[A-Za-z_]\w*\}?")
LABEL_VALUES = re.compile(r"label_values\((.+),\s*(\w+)\)")
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
            "unless", "bool", "offset", "inf", "nan"}
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
IDENTIFIER = re.compile(r"(?<![\w.:])[A-Za-z_:][A-Za-z0-9_:]*")


def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"]
            for rule in group["rules"]]


def recorded() -> set[str]:
    return {rule["record"] for rule in rules() if "record" in rule}


def as_promql(grafana_expr: str) -> str:
    """A dashboard query as Prometheus would get it, with ``$job`` = ``.+`` (All) and
    ``$__rate_interval`` = ``5m``."""
    return VARIABLE.sub(".+", DURATIONS.sub("5m", grafana_expr))


def dashboard_queries() -> dict[str, str]:
    """Every query of the dashboard, as PromQL, by where it is (panel title / refId, or the
    variable's name); a variable's ``label_values(selector, label)`` gives its selector."""
    board = json.loads(DASHBOARD.read_text())
    out = {}
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            out[f"{panel['title']} / {target['refId']}"] = as_promql(target["expr"])
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            match = LABEL_VALUES.fullmatch(variable["query"])
            assert match, variable["query"]
            out[f"${variable['name']}"] = as_promql(match[1])
    return out


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: identifiers that are not functions (followed
    by ``(``), keywords, label names (inside ``{}`` or a grouping) or durations."""
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)  # strings first: they may hold anything
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = GROUPING.sub(" ", text)
    names = set()
    for match in IDENTIFIER.finditer(text):
        after = text[match.end():].lstrip()
        if match[0] not in KEYWORDS and not after.startswith("("):
            names.add(match[0])
    return names
