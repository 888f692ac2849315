#!/usr/bin/env bash
# Set up and run the test suite: lint, type-check of the TensorRT code, pytest.
# Tests that need a GPU or TensorRT skip themselves; paper-size tests (-m slow) run with
# HMS_SLOW=1. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
echo "== ruff"
ruff check hms_deploy export runtime benchmarks tests
echo "== mypy (TensorRT code against tensorrt-stubs)"
mypy --config-file pyproject.toml export/tensorrt.py runtime/backends/trt.py runtime/bindings.py runtime/engine.py
echo "== pytest"
marks="not slow"
[ "${HMS_SLOW:-0}" = "1" ] && marks=""
pytest -m "$marks" -q -ra "$@"
