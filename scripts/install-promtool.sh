#!/usr/bin/env bash
# Debian's promtool (package `prometheus`) for the rule, dashboard and exposition tests
# (tests/test_slo_rules.py, tests/test_dashboard.py, tests/test_exposition.py): installed
# once, if missing. Needs apt-get and root (or sudo); prints what to do otherwise.
set -euo pipefail
PROMTOOL=${TALLY_TEST_PROMTOOL:-/usr/bin/promtool}
if [ -x "$PROMTOOL" ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
        echo "install-promtool: $PROMTOOL is missing; run 'apt-get install prometheus' as root" >&2
        exit 1
    fi
fi
echo "install-promtool: installing Debian's prometheus (for promtool)" >&2
# only promtool is used; on a host with systemd the package also starts a Prometheus server
# on :9090 (stop it with 'systemctl disable --now prometheus' if it is not wanted)
$SUDO apt-get install -y --no-install-recommends prometheus >/dev/null 2>&1 || {
    $SUDO apt-get update >/dev/null && \
    $SUDO apt-get install -y --no-install-recommends prometheus >/dev/null; }
test -x "$PROMTOOL"
