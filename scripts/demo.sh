#!/usr/bin/env bash
# Set up, then the main job on a built-in default (hms-demo, ~2-3 min on 2 CPU cores):
# generate a small synthetic set (6 classes), fine-tune the tiny model's audio and motion
# encoders, train HMS, export it to ONNX parts, and classify one new sample per class with
# the really-skipping runtime; the last line of hms-demo is "demo: K/M correct".
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
out=${1:-demo_out}
hms-demo "$out" --quiet
echo "== the same engines from the command line (ONNX Runtime, learned gates):"
hms-run "$out/samples/move_right.mp4" "$out/samples/tone_low.mp4" --engines "$out/engines" --engine onnx
