"""The objectives of CONTRACT §7 as shipped Prometheus rules (deploy/prometheus/): valid for
promtool, their unit tests pass, every alert is shown both firing and silent, and every
latency objective is a bucket bound of the histogram the rules read (docs/operations.md)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.utils import floatToGoString

from tally.observability.metrics import LATENCY_BUCKETS
from tests.promtool import promtool

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "tally.rules.yml"
RULE_TESTS = sorted((ROOT / "deploy" / "prometheus" / "tests").glob("*.test.yml"))
# CONTRACT §7: the objective of each slo label, as the budget of bad events it leaves
OBJECTIVES = {"timeseries-latency": 0.05, "slice-latency": 0.05, "retention-latency": 0.05,
              "errors": 0.001, "freshness": 0.05}


def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"]
            for rule in group["rules"]]


def test_the_rules_pass_promtool_check_rules():
    checked = promtool("check", "rules", RULES)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rules())} rules found" in checked.stdout


def test_the_rules_pass_their_promtool_unit_tests():
    assert len(RULE_TESTS) >= 3
    tested = promtool("test", "rules", *RULE_TESTS)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert tested.stdout.count("SUCCESS") == len(RULE_TESTS), tested.stdout


def test_every_alert_and_objective_is_tested_firing_and_silent():
    alerts = {r["alert"] for r in rules() if "alert" in r}
    assert alerts == {"TallyErrorBudgetBurnFast", "TallyErrorBudgetBurnSlow",
                      "TallyMetricsAbsent"}
    fired: set[tuple[str, str]] = set()
    silent: set[str] = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                expected = check.get("exp_alerts") or []
                if not expected:
                    silent.add(check["alertname"])
                for alert in expected:
                    fired.add((check["alertname"], alert["exp_labels"].get("slo", "")))
    assert silent == alerts
    assert {name for name, _ in fired} == alerts
    assert {slo for name, slo in fired if name == "TallyErrorBudgetBurnFast"} == set(OBJECTIVES)
    assert {slo for name, slo in fired if name == "TallyErrorBudgetBurnSlow"} >= {
        "timeseries-latency", "errors", "freshness"}


def test_the_budgets_are_the_contracts_objectives():
    budgets = {r["labels"]["slo"]: float(re.fullmatch(r"vector\((.*)\)", r["expr"])[1])
               for r in rules() if r.get("record") == "tally:slo_error_budget:ratio"}
    assert budgets == OBJECTIVES
    windows = {r["record"].removeprefix("tally:slo_errors:ratio_rate") for r in rules()
               if r.get("record", "").startswith("tally:slo_errors:")}
    assert windows == {"5m", "30m", "1h", "6h"}  # the SRE workbook's two pairs
    for window in windows:
        assert {r["labels"]["slo"] for r in rules()
                if r.get("record") == f"tally:slo_errors:ratio_rate{window}"} == set(OBJECTIVES)


def test_latency_objectives_are_bucket_bounds_of_the_histogram():
    """A rule reads the bucket at its objective (``le="0.8"``): the bound must be one of the
    histogram's, written as prometheus_client writes it, or the rule reads nothing."""
    bounds = {floatToGoString(b) for b in LATENCY_BUCKETS}
    objectives = {"/v1/analytics/timeseries": "0.8", "/v1/analytics/slice": "2.0",
                  "/v1/analytics/retention": "5.0"}
    used = set()
    for rule in rules():
        for route, le in re.findall(r'_bucket\{route="([^"]+)", le="([^"]+)"\}',
                                    rule.get("expr", "")):
            assert le in bounds, (route, le)
            used.add((route, le))
    assert used == set(objectives.items())


def test_docs_operations_names_every_objective_and_alert():
    documented = (ROOT / "docs" / "operations.md").read_text()
    for name in [*OBJECTIVES, *(r["alert"] for r in rules() if "alert" in r)]:
        assert f"`{name}`" in documented, name
    for rule in rules():  # the alerts' runbook link lands on a heading of that page
        runbook = rule.get("annotations", {}).get("runbook")
        if runbook:
            assert runbook == "docs/operations.md#when-an-alert-fires"
    assert "\n### When an alert fires\n" in documented
