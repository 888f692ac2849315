#!/usr/bin/env bash
# Set up, then the main job on a built-in default: make a tiny HMS checkpoint, export it to
# ONNX parts, generate a sample video, and classify it with the really-skipping runtime.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
out=${1:-demo_out}
mkdir -p "$out"
printf 'tone_low\ntone_high\nred_disc\ngreen_square\nmove_left\nmove_right\n' > "$out/labels.txt"
hms-init --variant tiny --num-classes 6 --labels "$out/labels.txt" --out "$out/ckpt.pt"
hms-export --checkpoint "$out/ckpt.pt" --out "$out/engines" --force
hms-synth sample "$out/sample.mp4"
echo "== hms-run (ONNX Runtime, learned gates)"
hms-run "$out/sample.mp4" --engines "$out/engines" --engine onnx
echo "== hms-run (torch, paper-regime forced rates), JSON"
hms-run "$out/sample.mp4" --checkpoint "$out/ckpt.pt" --engine torch --policy rates:0.6,0.05 --json
