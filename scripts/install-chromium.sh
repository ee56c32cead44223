#!/usr/bin/env bash
# Debian's Chromium for the widget tests (tests/test_embeds_browser.py), driven by Playwright
# (a dev dependency) through its own executable: installed once, if missing. Needs apt-get
# and root (or sudo); prints what to do otherwise.
set -euo pipefail
CHROMIUM=${TALLY_TEST_CHROMIUM:-/usr/bin/chromium}
if [ -x "$CHROMIUM" ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
        echo "install-chromium: $CHROMIUM is missing; run 'apt-get install chromium' as root" >&2
        exit 1
    fi
fi
echo "install-chromium: installing Debian's chromium (browser tests need it)" >&2
$SUDO apt-get install -y --no-install-recommends chromium >/dev/null 2>&1 || {
    $SUDO apt-get update >/dev/null && \
    $SUDO apt-get install -y --no-install-recommends chromium >/dev/null; }
test -x "$CHROMIUM"
