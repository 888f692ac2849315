#!/usr/bin/env bash
# Set up and run the test suite: lint, import contracts, type-check, pytest.
# Tests that need a GPU or TensorRT skip themselves; paper-size tests (-m slow) run with
# HMS_SLOW=1. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
echo "== ruff"
ruff check hms_deploy export runtime benchmarks tests
echo "== lint-imports (layers cli -> export -> runtime -> core; no import cycles)"
bash scripts/lint_imports.sh
echo "== mypy --strict (hms_deploy, export, runtime; see scripts/typecheck.sh)"
bash scripts/typecheck.sh
echo "== pytest"
marks="not slow"
[ "${HMS_SLOW:-0}" = "1" ] && marks=""
pytest -m "$marks" -q -ra "$@"
