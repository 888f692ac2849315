#!/usr/bin/env bash
# Set up, then the main job on a built-in default (hms-demo; a few minutes on 2 idle CPU
# cores, longer on a loaded machine: benchmarks/results/demo_seeds.md): generate a small
# synthetic set (6 classes), extract features with the tiny model's encoders, train HMS,
# export it to ONNX parts, and classify the test split and one new sample per class with
# the really-skipping runtime; hms-demo ends with the motion-usage line per class group
# and "demo: K/M correct".
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
out=${1:-demo_out}
hms-demo "$out" --quiet
echo "== the same engines from the command line (ONNX Runtime, learned gates):"
hms-run "$out/samples/move_right.mp4" "$out/samples/tone_low.mp4" --engines "$out/engines" --engine onnx
