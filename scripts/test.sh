#!/usr/bin/env bash
# Runs the whole test suite (unit + integration) after installing what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec "${PYTHON:-python3}" -m pytest -q "$@"
