#!/usr/bin/env bash
# Debian's promtool (package `prometheus`) for the rule, dashboard and exposition tests
# (tests/test_slo_rules.py, tests/test_dashboard.py, tests/test_exposition.py): installed
# once, if missing. Only promtool is used; on a host with systemd the package also starts a
# Prometheus server on :9090 (stop it with 'systemctl disable --now prometheus').
set -euo pipefail
exec bash "$(dirname "$0")/debian-package.sh" "${TALLY_TEST_PROMTOOL:-/usr/bin/promtool}" \
    prometheus install-promtool
