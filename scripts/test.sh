#!/usr/bin/env bash
# Runs the linters and the whole test suite (unit + integration) after installing what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
PY="${PYTHON:-python3}"
"$PY" -m ruff check .
"$PY" -m mypy go2cloud_client go2cloud_server snapshot_driver
exec "$PY" -m pytest -q "$@"
