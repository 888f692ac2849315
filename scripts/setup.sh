#!/usr/bin/env bash
# Set up a virtual environment in .venv with hms-deploy and its dev tools (idempotent).
# Pins: torch 2.14.1 + torchvision 0.29.1 (the combination that works beside timm and
# pytorchvideo), torchaudio 2.11. tensorrt-stubs is installed without its dependencies:
# its metadata pulls the real TensorRT, which only NVIDIA's index serves.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.hms-deploy-installed
want=$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/pip install --quiet --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/pip install --quiet -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/pip install --quiet --no-deps "tensorrt-stubs>=10.13" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import hms_deploy, torch, torchvision, timm, pytorchvideo, onnx, onnxruntime, av" \
    || { echo "setup: the environment does not import; see pip output above" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
