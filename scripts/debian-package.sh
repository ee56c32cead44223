#!/usr/bin/env bash
# Install a Debian package a test needs, once, if its executable is missing:
#   scripts/debian-package.sh EXECUTABLE PACKAGE WHAT
# Needs apt-get and root (or sudo); prints what to do otherwise. Used by install-chromium.sh,
# install-promtool.sh and install-compose.sh (make browser, make promtool, make compose).
set -euo pipefail
EXECUTABLE=$1 PACKAGE=$2 WHAT=$3
if [ -x "$EXECUTABLE" ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
        echo "$WHAT: $EXECUTABLE is missing; run 'apt-get install $PACKAGE' as root" >&2
        exit 1
    fi
fi
echo "$WHAT: installing Debian's $PACKAGE" >&2
$SUDO apt-get install -y --no-install-recommends "$PACKAGE" >/dev/null 2>&1 || {
    $SUDO apt-get update >/dev/null && \
    $SUDO apt-get install -y --no-install-recommends "$PACKAGE" >/dev/null; }
test -x "$EXECUTABLE"
