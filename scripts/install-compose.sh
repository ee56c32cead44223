#!/usr/bin/env bash
# Debian's docker-compose (1.29, the Python one) for tests/test_deploy.py: `docker-compose
# config` validates deploy/compose.yaml against the Compose schema and resolves it, offline and
# with no Docker daemon (none runs on these machines; the docker CLI here has no compose
# plugin). Installed once, if missing. Needs apt-get and root (or sudo).
set -euo pipefail
COMPOSE=${TALLY_TEST_COMPOSE:-/usr/bin/docker-compose}
if [ -x "$COMPOSE" ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
        echo "install-compose: $COMPOSE is missing; run 'apt-get install docker-compose' as root" >&2
        exit 1
    fi
fi
echo "install-compose: installing Debian's docker-compose" >&2
$SUDO apt-get install -y --no-install-recommends docker-compose >/dev/null 2>&1 || {
    $SUDO apt-get update >/dev/null && \
    $SUDO apt-get install -y --no-install-recommends docker-compose >/dev/null; }
test -x "$COMPOSE"
