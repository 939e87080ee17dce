#!/usr/bin/env bash
# The main job: a complete local migration against the embedded control plane and target.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec "${PYTHON:-python3}" scripts/demo.py "$@"
