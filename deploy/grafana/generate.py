"""Tally's Grafana dashboard, generated with grafana-foundation-sdk (a dev dependency): writes
deploy/grafana/tally.json, which is committed; tests/test_dashboard.py regenerates it and
compares, checks every query with promtool, and checks that every metric it reads is in the
/metrics of a real ``tally serve``. Dev-only: nothing under src/ imports it.

    .venv/bin/python deploy/grafana/generate.py          # or: make dashboard

Every query filters on ``job=~"$job"`` (the Tally deployments to show) and reads only what
``GET /metrics`` exposes (docs/api.md) or what deploy/prometheus/tally.rules.yml records.
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard, prometheus, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    Threshold,
    ThresholdsMode,
    VariableOption,
    VariableRefresh,
    VariableSort,
)

OUTPUT = Path(__file__).with_name("tally.json")
UID = "tally-operations"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
JOB = 'job=~"$job"'
RATE = "[$__rate_interval]"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


def panel(title: str, description: str, unit: str, *queries: Query,
          thresholds: tuple[tuple[float, str], ...] = (), stacked: bool = False,
          bars: bool = False, width: int = 12) -> timeseries.Panel:
    built = (timeseries.Panel().title(title).description(description).unit(unit)
             .datasource(DATASOURCE).height(8).span(width).min(0)
             .legend(common_builders.VizLegendOptions()
                     .display_mode(common.LegendDisplayMode.LIST)
                     .placement(common.LegendPlacement.BOTTOM).show_legend(True)))
    for ref, query in zip("ABCDEFGH", queries, strict=False):
        built = built.with_target(prometheus.Dataquery().expr(query.expr)
                                  .legend_format(query.legend).ref_id(ref)
                                  .datasource(DATASOURCE).range())
    if thresholds:
        steps = [Threshold(None, "green"), *(Threshold(v, c) for v, c in thresholds)]
        built = (built.thresholds(dashboard.ThresholdsConfig()
                                  .mode(ThresholdsMode.ABSOLUTE).steps(steps))
                 .thresholds_style(common_builders.GraphThresholdsStyleConfig()
                                   .mode(common.GraphTresholdsStyleMode.LINE)))
    if stacked:
        built = built.stacking(common_builders.StackingConfig()
                               .mode(common.StackingMode.NORMAL))
    if bars:
        built = built.draw_style(common.GraphDrawStyle.BARS).fill_opacity(60)
    return built


def objectives() -> list[timeseries.Panel]:
    burn = ("tally:slo_errors:ratio_rate{window}{{{job}}}"
            " / on (slo) group_left () tally:slo_error_budget:ratio")
    return [
        panel("Error budget burn rate, by objective",
              "The bad ratio of each CONTRACT §7 objective over its budget (1: the 30-day "
              "budget lasts exactly 30 days). Over 14.4 for an hour pages, over 6 for six hours "
              "opens a ticket (deploy/prometheus/tally.rules.yml).", "suffix:x",
              Query(burn.format(window="1h", job=JOB), "{{job}} {{slo}} (1h)"),
              Query(burn.format(window="6h", job=JOB), "{{job}} {{slo}} (6h)"),
              thresholds=((6, "orange"), (14.4, "red"))),
        panel("Bad ratio, by objective (5m)",
              "The share of bad events over the last 5 minutes: requests slower than their "
              "objective, 5xx answers, time the freshness lag was over 5 minutes.",
              "percentunit",
              Query(f"tally:slo_errors:ratio_rate5m{{{JOB}}}", "{{job}} {{slo}}")),
    ]


def requests() -> list[timeseries.Panel]:
    by_route = f'{JOB}, route=~"$route"'

    def latency(q: str) -> str:
        return (f"histogram_quantile({q}, sum by (route, le) "
                f"(rate(tally_http_request_duration_seconds_bucket{{{by_route}}}{RATE})))")

    return [
        panel("Request rate, by route", "Answers per second by route template.", "reqps",
              Query(f"sum by (route) (rate(tally_http_responses_total{{{by_route}}}{RATE}))",
                    "{{route}}"), stacked=True),
        panel("Errors, by route and status", "4xx and 5xx answers per second.", "reqps",
              Query("sum by (route, status) (rate(tally_http_responses_total"
                    f'{{{by_route}, status=~"5.."}}{RATE}))', "{{status}} {{route}}"),
              Query("sum by (route, status) (rate(tally_http_responses_total"
                    f'{{{by_route}, status=~"4.."}}{RATE}))', "{{status}} {{route}}")),
        panel("Latency p50 / p95 / p99, by route",
              "From the request histogram (buckets include the objectives 0.8, 2 and 5 s).",
              "s", Query(latency("0.5"), "p50 {{route}}"),
              Query(latency("0.95"), "p95 {{route}}"),
              Query(latency("0.99"), "p99 {{route}}"), width=24),
    ]


def data() -> list[timeseries.Panel]:
    return [
        panel("Freshness lag, by rollup",
              "Age of the oldest acknowledged events not yet in each rollup (the freshness "
              "objective: under 5 minutes).", "s",
              Query(f"max by (rollup) (tally_rollup_freshness_lag_seconds{{{JOB}}})",
                    "{{rollup}}"), thresholds=((300, "red"),)),
        panel("Ingestion outcomes", "Events received per second: accepted, duplicate "
              "(already stored) and rejected (quarantined).", "ops",
              Query(f"sum by (outcome) (rate(tally_ingest_events_total{{{JOB}}}{RATE}))",
                    "{{outcome}}"), stacked=True),
        panel("Applier backlog", "Acknowledged rows waiting for the store, by instance.",
              "short", Query(f"tally_applier_pending_rows{{{JOB}}}", "{{instance}}")),
        panel("Applier throughput", "Rows applied to the store, and rows it refused (set "
              "aside: quarantined or parked), per second.", "cps",
              Query(f"sum(rate(tally_applier_applied_rows_total{{{JOB}}}{RATE}))", "applied"),
              Query(f"sum(rate(tally_applier_set_aside_rows_total{{{JOB}}}{RATE}))",
                    "set aside")),
        panel("Answer cache hit ratio", "Answers served from the cache, of all cache "
              "lookups.", "percentunit",
              Query("sum(rate(tally_answer_cache_lookups_total"
                    f'{{{JOB}, result="hit"}}{RATE})) / '
                    f"sum(rate(tally_answer_cache_lookups_total{{{JOB}}}{RATE}))", "hit ratio")),
        panel("Rows scanned", "Rows read by analytics queries per second (the store's own "
              "count).", "cps",
              Query(f"sum(rate(tally_rows_scanned_total{{{JOB}}}{RATE}))", "rows scanned")),
    ]


def limits_and_deliveries() -> list[timeseries.Panel]:
    return [
        panel("Rate-limit refusals, by limit", "Requests refused with 429, by the limit that "
              "refused them (client, brand, region, token, token_source, rows_per_day).",
              "reqps",
              Query(f"sum by (limit) (rate(tally_rate_limit_refusals_total{{{JOB}}}{RATE}))",
                    "{{limit}}"), stacked=True, width=8),
        panel("Export jobs, by outcome", "Export jobs finished in each interval.", "short",
              Query("sum by (outcome) "
                    f"(increase(tally_export_jobs_total{{{JOB}}}{RATE}))", "{{outcome}}"),
              bars=True, stacked=True, width=8),
        panel("Webhook deliveries, by outcome", "Webhooks delivered or given up (after their "
              "retries) in each interval.", "short",
              Query("sum by (kind, outcome) "
                    f"(increase(tally_webhook_deliveries_total{{{JOB}}}{RATE}))",
                    "{{kind}} {{outcome}}"), bars=True, stacked=True, width=8),
    ]


def process() -> list[timeseries.Panel]:
    return [
        panel("CPU, by instance", "CPU seconds per second of each Tally process.", "percentunit",
              Query(f"rate(process_cpu_seconds_total{{{JOB}}}{RATE})", "{{instance}}")),
        panel("Memory, by instance", "Resident memory of each Tally process, and its version.",
              "bytes",
              Query(f"process_resident_memory_bytes{{{JOB}}}"
                    f" * on (job, instance) group_left (version) tally_build_info{{{JOB}}}",
                    "{{instance}} ({{version}})")),
    ]


def build() -> dashboard.Dashboard:
    board = (dashboard.Dashboard("Tally").uid(UID).tags(["tally"])
             .description("Tally's service-level objectives and operations (docs/operations.md)")
             .refresh("30s").time("now-6h", "now").timezone("browser").editable()
             .tooltip(DashboardCursorSync.CROSSHAIR)
             .with_variable(dashboard.DatasourceVariable("datasource").label("Data source")
                            .type("prometheus"))
             .with_variable(dashboard.QueryVariable("job").label("Job")
                            .datasource(DATASOURCE)
                            .query("label_values(tally_build_info, job)")
                            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
                            .sort(VariableSort.ALPHABETICAL_ASC).multi(True).include_all(True)
                            .all_value(".+")
                            .current(VariableOption(True, "All", "$__all")))
             .with_variable(dashboard.QueryVariable("route").label("Route")
                            .datasource(DATASOURCE)
                            .query('label_values(tally_http_responses_total{job=~"$job"}, route)')
                            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
                            .sort(VariableSort.ALPHABETICAL_ASC).multi(True).include_all(True)
                            .all_value(".+")
                            .current(VariableOption(True, "All", "$__all"))))
    ids = itertools.count(1)  # stable ids: links to a panel (viewPanel=N) keep working
    for title, panels in (("Objectives", objectives()), ("Requests", requests()),
                          ("Ingestion and data", data()),
                          ("Limits, exports and webhooks", limits_and_deliveries()),
                          ("Process", process())):
        board = board.with_row(dashboard.Row(title).id(next(ids)))
        for built in panels:
            board = board.with_panel(built.id(next(ids)))
    return board


def render() -> str:
    """The dashboard's JSON as committed: sorted keys, two-space indents, one final newline."""
    return json.dumps(build().build(), cls=JSONEncoder, indent=2, sort_keys=True,
                      ensure_ascii=False) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    args.output.write_text(render(), encoding="utf-8")


if __name__ == "__main__":
    main()
