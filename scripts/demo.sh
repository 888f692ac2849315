#!/usr/bin/env bash
# Set up, then the first-hour demo (hms-demo): generate a small synthetic set, fine-tune the
# tiny model's motion encoder and train HMS on it, export it to ONNX parts, and classify one
# new sample per class with the exported engines. The last line reads "demo: K/M correct".
# Usage: bash scripts/demo.sh [OUT_DIR]   (default demo_out/)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
out=${1:-demo_out}
hms-demo "$out"
