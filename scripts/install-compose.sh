#!/usr/bin/env bash
# Debian's docker-compose (1.29, the Python one) for tests/test_deploy.py: `docker-compose
# config` validates deploy/compose.yaml against the Compose schema and resolves it, offline and
# with no Docker daemon (none runs on these machines; the docker CLI here has no compose
# plugin). Installed once, if missing.
set -euo pipefail
exec bash "$(dirname "$0")/debian-package.sh" "${TALLY_TEST_COMPOSE:-/usr/bin/docker-compose}" \
    docker-compose install-compose
