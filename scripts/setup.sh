#!/usr/bin/env bash
# Set up a virtual environment in .venv with hms-deploy and its dev tools (idempotent).
# Versions: the known-good set in scripts/constraints.txt (pyproject.toml holds the ranges
# the package accepts). tensorrt-stubs is installed without its dependencies:
# its metadata pulls the real TensorRT, which only NVIDIA's index serves.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.hms-deploy-installed
want=$(sha256sum pyproject.toml scripts/setup.sh scripts/constraints.txt | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing into .venv (a few minutes the first time; log in .venv/setup.log)"
  free_gib=$(df -Pk .venv | awk 'NR == 2 { printf "%d", $4 / 1048576 }')
  if [ "${free_gib:-0}" -lt 8 ]; then  # the environment takes about 7 GiB (torch with CUDA)
    echo "setup: warning: ${free_gib} GiB free on the disk of .venv; the install needs about 8 GiB" >&2
  fi
  {
    .venv/bin/pip install --upgrade pip &&
    .venv/bin/pip install -c scripts/constraints.txt -e ".[dev,serve,ray]" &&
    .venv/bin/pip install --no-deps "tensorrt-stubs>=10.13"
  } > .venv/setup.log 2>&1 || { tail -30 .venv/setup.log >&2; echo "setup: pip failed" >&2; exit 1; }
  .venv/bin/python -c "import hms_deploy, torch, torchvision, timm, pytorchvideo, onnx, onnxruntime, av, ray.data" \
    || { echo "setup: the environment does not import; see .venv/setup.log" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
