# Two set-up commands: `make run` and `make test`. Everything else is installed from here.
SHELL := /bin/bash
PY ?= python3
UV := $(shell command -v uv 2>/dev/null || echo .tools/bin/uv)
VENV := .venv
TALLY := $(VENV)/bin/tally
DATA_DIR ?= ./data
HOST ?= 127.0.0.1
PORT ?= 8000
DEMO_EVENTS ?= 300000
DEMO_DAYS ?= 30
BENCH_STORED ?= 10000000

.PHONY: install run test test-chdb lint openapi bench bench-quick reliability clean browser \
	promtool dashboard compose

.tools/bin/uv:
	$(PY) -m venv .tools
	.tools/bin/pip install --quiet --disable-pip-version-check uv

$(VENV)/.installed: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --quiet
	touch $@

install: $(VENV)/.installed  ## create .venv with the `tally` command

run: install  ## demo data into an empty store, a demo client, then the API
	@bash scripts/run.sh "$(DATA_DIR)" "$(HOST)" "$(PORT)" "$(DEMO_EVENTS)" "$(DEMO_DAYS)"

lint: install  ## ruff and mypy --strict
	$(VENV)/bin/ruff check src tests bench reliability clients deploy
	$(VENV)/bin/mypy

# the API suite again on the embedded ClickHouse (TALLY_STORE=chdb): answers, rollups, cohorts,
# security (every route under a confined token), ETags, ingestion, restart, kill -9 and replay,
# durability, audit, CSV, exports, widgets and alerts; a gap is a strict xfail naming it.
# `make test-chdb` runs the whole suite there (the HTTP edge, parsers and CLI too).
STORE_SUITE := tests/test_analytics.py tests/test_rollups.py tests/test_cohorts.py \
	tests/test_policy.py tests/test_caching.py tests/test_e2e_server.py \
	tests/test_exactly_once.py tests/test_player_attributes.py tests/test_fx.py \
	tests/test_ingest_api.py tests/test_paging.py tests/test_residency.py \
	tests/test_policy_matrix.py tests/test_admin_matrix.py tests/test_admin_scope.py \
	tests/test_privacy.py tests/test_partners.py tests/test_durability.py \
	tests/test_query_limits.py tests/test_audit.py tests/test_demo.py \
	tests/test_csv_answers.py tests/test_exports.py tests/test_embeds.py tests/test_alerts.py \
	tests/test_drift.py tests/test_applier.py tests/test_funnel_days.py

# the fault scenarios that run there too (a slow-client scenario tests the HTTP edge alone)
STORE_FAULTS := $(addprefix tests/test_faults.py::test_,\
	sigkill_cycles_with_concurrent_writers_lose_and_double_nothing \
	sigterm_under_backlog_is_bounded_and_loses_nothing \
	overload_is_pushed_back_and_answers_never_overclaim \
	a_poison_record_blocks_neither_later_records_nor_the_restart \
	full_and_read_only_journal_store_and_audit_log \
	start_up_on_read_only_storage_is_a_clear_refusal)

# xdist workers: one more than the cores, since the end-to-end tests wait on processes,
# brokers and browsers a good part of their time
WORKERS ?= $(shell echo $$(( $$(nproc) + 1 )))

browser:  ## Debian's chromium for the widget tests, if missing (scripts/install-chromium.sh)
	@bash scripts/install-chromium.sh

promtool:  ## Debian's promtool for the rule and exposition tests, if missing (scripts/install-promtool.sh)
	@bash scripts/install-promtool.sh

compose:  ## Debian's docker-compose for the deployment tests, if missing (scripts/install-compose.sh)
	@bash scripts/install-compose.sh

test: lint browser promtool compose  ## the whole suite (lint first), then the API suite on chDB
	$(VENV)/bin/pytest -q -n $(WORKERS)
	TALLY_TEST_STORE=chdb $(VENV)/bin/pytest -q -n $(WORKERS) $(STORE_SUITE) $(STORE_FAULTS)

test-chdb: install browser promtool compose  ## the whole suite on the embedded ClickHouse
	TALLY_TEST_STORE=chdb $(VENV)/bin/pytest -q -n $(WORKERS)

openapi: install  ## regenerate openapi.json (commit it: tests/test_openapi_doc.py compares)
	$(TALLY) openapi --output openapi.json

dashboard: install  ## regenerate deploy/grafana/tally.json (commit it: tests/test_dashboard.py compares)
	$(VENV)/bin/python deploy/grafana/generate.py

bench: install  ## reproducible benchmarks; results in docs/benchmarks.md
	$(VENV)/bin/python -m bench.dedup_bench --keys 10000000 --keys 100000000
	$(VENV)/bin/python -m bench.ingest_bench --stored $(BENCH_STORED)
	$(VENV)/bin/python -m bench.ingest_bench --stored 1000000 --trickle 300
	$(VENV)/bin/python -m bench.query_bench --stored $(BENCH_STORED)
	$(VENV)/bin/python -m bench.cohort_bench --stored $(BENCH_STORED)
	$(VENV)/bin/python -m bench.engine_bench --events $(BENCH_STORED)
	$(VENV)/bin/python -m bench.apply_bench
	$(VENV)/bin/python -m bench.chdb_funnel_bench --stored $(BENCH_STORED)
	$(VENV)/bin/python -m bench.consume_bench --events 1000000
	$(VENV)/bin/python -m bench.export_bench --brands 100 --days 34

bench-quick: install  ## ~3 min regression guard: main queries at 1M, ratios to raw SQL
	$(VENV)/bin/python -m bench.quick_bench

reliability: install  ## the fault suite at full size; figures in docs/reliability.md (root)
	$(VENV)/bin/python -m reliability.run

clean:
	rm -rf $(VENV) .tools .mypy_cache .ruff_cache .pytest_cache
