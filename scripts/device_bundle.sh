#!/usr/bin/env bash
# Builds the device bundle: every wheel the GPU check needs that the GPU machine lacks, for
# CPython 3.12 manylinux x86_64, plus this project built as a wheel. Run here, where the
# package index is reachable; the GPU machine installs only from it (scripts/gpu_check.sh
# --bundle DIR). The machine's own torch, torchvision, torchaudio, numpy, onnx, onnxruntime,
# onnxscript, timm, click, tqdm, pillow, matplotlib, scipy, pyyaml and pytest are used as
# they are: no wheel of those (and never a torch or nvidia-* wheel) goes in.
#
#   bash scripts/device_bundle.sh DIR
#
# Prints every wheel, the bundle's size and the bundle + repository size; exits 1 above
# 60 MiB (the GPU machine takes 64 MiB in all). PYTHON picks the interpreter that runs pip
# (default python3).
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: bash scripts/device_bundle.sh DIR" >&2; exit 2; }
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PYTHON:-python3}
DIR=$1
LIMIT=$(( 60 * 1024 * 1024 ))
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
rm -f "$DIR"/*.whl

# compiled wheels: downloaded for the target interpreter and platform
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DIR" "av==18.1.0"
# pure-Python packages (some are published only as source): built into py3-none-any wheels.
# pytorchvideo's model code imports fvcore -> iopath -> portalocker, tabulate, termcolor;
# yacs and parameterized complete pytorchvideo's declared dependencies; threadpoolctl is ours.
"$PY" -m pip wheel -q --no-deps -w "$DIR" \
  "pytorchvideo==0.1.5" "fvcore==0.1.5.post20221221" "iopath==0.1.10" "portalocker==3.2.0" \
  "tabulate==0.9.0" "termcolor==3.1.0" "yacs==0.1.8" "parameterized==0.9.0" \
  "polygraphy==0.53.6" "threadpoolctl==3.8.0"
# this project (with the local setuptools + wheel where they import; else pip fetches them)
isolation=(--no-build-isolation)
"$PY" -c "import setuptools, wheel" 2>/dev/null || isolation=()
# built from a scratch copy of the working tree's files: a stale build/ cannot leak into it
SRC=$(mktemp -d "${TMPDIR:-/tmp}/hms-wheel.XXXXXX")
trap 'rm -rf "$SRC"' EXIT
git ls-files -z --cached --others --exclude-standard | xargs -0 -I{} cp --parents {} "$SRC/" 2>/dev/null || true
"$PY" -m pip wheel -q --no-deps "${isolation[@]}" -w "$DIR" "$SRC" 2>&1 | grep -vE "^ *(\*|!!|By 20|or your|See https|corresp|$|\*+)" >&2 || true
ls "$DIR"/hms_deploy-*.whl >/dev/null 2>&1 || { echo "device_bundle: building the project's wheel failed" >&2; exit 1; }

if ls "$DIR" | grep -qiE '^(torch|torchvision|torchaudio|nvidia|numpy)[-_]'; then
  echo "device_bundle: $DIR holds a torch/nvidia/numpy wheel: the GPU machine keeps its own" >&2
  exit 1
fi
for w in "$DIR"/*.whl; do printf '  %8d  %s\n' "$(stat -c %s "$w")" "$(basename "$w")"; done
bundle=$(cat "$DIR"/*.whl | wc -c)
repo=$(git ls-files -z | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
total=$(( bundle + repo ))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "device_bundle: $(ls "$DIR"/*.whl | wc -l) wheels, $bundle bytes ($(mib "$bundle")); with the repository ($(mib "$repo")): $total bytes ($(mib "$total")); limit 60 MiB"
echo "$bundle" > "$DIR/bundle_bytes"
if (( total > LIMIT )); then
  echo "device_bundle: bundle + repository is $(mib "$total"), over the 60 MiB limit" >&2
  exit 1
fi
