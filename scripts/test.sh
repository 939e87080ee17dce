#!/usr/bin/env bash
# Runs the linters and the whole test suite (unit + integration) after installing what it needs.
#   ./scripts/test.sh            everything (the README's command; CI runs it)
#   ./scripts/test.sh --fast     the fast lane: linters, tests/unit, the snapshot conformance suite
#                                (tests/snapshot) and the other tests that start no server
# Further arguments go to pytest (e.g. ./scripts/test.sh --fast -x -k ledger).
set -euo pipefail
cd "$(dirname "$0")/.."
# The fast lane's tests (tests/unit/suite/test_suite_rules.py checks this list): every other test
# directory starts the real server, rsync and agents and is marked "integration".
FAST=(tests/unit tests/snapshot tests/integration/test_subp.py)
targets=()
if [ "${1:-}" = "--fast" ]; then
    shift
    targets=("${FAST[@]}")
fi
./scripts/setup.sh
PY="${PYTHON:-python3}"
"$PY" -m ruff check .
"$PY" -m mypy go2cloud_client go2cloud_server snapshot_driver
exec "$PY" -m pytest -q "${targets[@]}" "$@"
