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
echo "== mypy (TensorRT code against tensorrt-stubs, patched so that mypy reads them)"
python tests/trt_stubs.py build/trt-stubs
MYPYPATH=build/trt-stubs mypy --strict --follow-imports=silent \
  export/tensorrt.py runtime/trt_plan.py runtime/backends/trt.py runtime/bindings.py \
  runtime/engine.py runtime/streams.py runtime/backends/onnx.py hms_deploy/dtypes.py \
  runtime/plan_cache.py hms_deploy/transfer.py
echo "== pytest"
marks="not slow"
[ "${HMS_SLOW:-0}" = "1" ] && marks=""
pytest -m "$marks" -q -ra "$@"
