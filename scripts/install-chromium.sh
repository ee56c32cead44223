#!/usr/bin/env bash
# Debian's Chromium for the widget tests (tests/test_embeds_browser.py), driven by Playwright
# (a dev dependency) through its own executable: installed once, if missing.
set -euo pipefail
exec bash "$(dirname "$0")/debian-package.sh" "${TALLY_TEST_CHROMIUM:-/usr/bin/chromium}" \
    chromium install-chromium
