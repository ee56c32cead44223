"""The Grafana dashboard (deploy/grafana/tally.json) is what deploy/grafana/generate.py makes,
has the panels issue 15 asks for, and every query in it is PromQL that promtool accepts."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from tests.promql import DASHBOARD, ROOT, as_promql, dashboard_queries, metric_names
from tests.promtool import promtool


def test_the_committed_dashboard_is_what_the_generator_makes(tmp_path):
    out = tmp_path / "tally.json"
    subprocess.run([sys.executable, str(ROOT / "deploy" / "grafana" / "generate.py"),
                    "--output", str(out)], check=True, timeout=120)
    assert out.read_text() == DASHBOARD.read_text(), "run `make dashboard` and commit it"


def test_the_dashboard_has_a_panel_for_each_concern():
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] == "tally-operations" and board["title"] == "Tally"
    panels = {p["title"]: p for p in board["panels"] if p["type"] != "row"}
    exprs = {title: " ".join(t["expr"] for t in p["targets"]) for title, p in panels.items()}
    wanted = {  # a concern → a metric its panel must read
        "Request rate, by route": "tally_http_responses_total",
        "Errors, by route and status": "tally_http_responses_total",
        "Latency p50 / p95 / p99, by route": "tally_http_request_duration_seconds_bucket",
        "Freshness lag, by rollup": "tally_rollup_freshness_lag_seconds",
        "Ingestion outcomes": "tally_ingest_events_total",
        "Applier backlog": "tally_applier_pending_rows",
        "Answer cache hit ratio": "tally_answer_cache_lookups_total",
        "Rows scanned": "tally_rows_scanned_total",
        "Rate-limit refusals, by limit": "tally_rate_limit_refusals_total",
        "Export jobs, by outcome": "tally_export_jobs_total",
        "Webhook deliveries, by outcome": "tally_webhook_deliveries_total",
        "Error budget burn rate, by objective": "tally:slo_errors:ratio_rate1h",
    }
    for title, metric in wanted.items():
        assert metric in metric_names(as_promql(exprs[title])), title
    quantiles = [t["expr"].split(",")[0] for t in
                 panels["Latency p50 / p95 / p99, by route"]["targets"]]
    assert quantiles == ["histogram_quantile(0.5", "histogram_quantile(0.95",
                         "histogram_quantile(0.99"]
    for title, panel in panels.items():  # every query on the chosen data source and jobs
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, title
        for target in panel["targets"]:
            assert 'job=~"$job"' in target["expr"], (title, target["expr"])
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))


def test_every_dashboard_query_passes_promtool(tmp_path):
    queries = dashboard_queries()
    assert len(queries) >= 20
    rule_file = tmp_path / "dashboard.rules.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{n}", "expr": expr}
        for n, expr in enumerate(queries.values())]}]}))
    checked = promtool("check", "rules", rule_file)
    assert checked.returncode == 0, checked.stdout + checked.stderr + "\n".join(queries)
    assert f"SUCCESS: {len(queries)} rules found" in checked.stdout


def test_promtool_does_reject_a_broken_query(tmp_path):
    """The check above can fail: a query with a stray Grafana variable is refused."""
    rule_file = tmp_path / "broken.rules.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "broken", "rules": [
        {"record": "dashboard:broken", "expr": "rate(tally_rows_scanned_total[$x])"}]}]}))
    assert promtool("check", "rules", rule_file).returncode != 0


def test_metric_names_are_read_from_expressions():
    expr = ('histogram_quantile(0.95, sum by (route, le) (rate(a_seconds_bucket{job=~".+", '
            'route="x"}[5m]))) / on (slo) group_left (version) b:c:ratio offset 1h '
            '> bool 1e5 and absent(up{job="rate"}) unless vector(1)')
    assert metric_names(expr) == {"a_seconds_bucket", "b:c:ratio", "up"}
