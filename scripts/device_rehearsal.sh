#!/usr/bin/env bash
# A rehearsal, on this CPU machine, of the offline GPU check (scripts/gpu_check.sh --bundle).
#
#   bash scripts/device_rehearsal.sh --prepare   # uses the package index; cached
#   bash scripts/device_rehearsal.sh OUT         # no network at all
#   bash scripts/device_rehearsal.sh             # both: --prepare, then OUT = rehearsal_out
#
# --prepare builds a stand-in of the GPU machine's Python: a Python 3.12 venv (from pyenv)
# holding the GPU machine's packages at its versions (torch 2.11.0, torchvision 0.26.0,
# torchaudio 2.11.0, numpy 2.5, onnx 1.23.1, onnxruntime 1.30.0, ...; the torch wheel pulls a
# few GB of CUDA libraries, downloaded once), and the device bundle (scripts/device_bundle.sh).
# Both live under $HMS_REHEARSAL_HOME (default ~/.cache/hms-deploy/rehearsal).
#
# OUT copies the working tree's files (tracked or not ignored) to a scratch folder (what a
# GPU machine receives), then runs there, in a network namespace with no interface but loopback
# (`unshare --net`), the command a GPU machine runs, with the stand-in venv's python as
# python3 and --dry-run (every section on the CPU at small sizes). It prints the bundle
# size, the command and every section's status, and exits 1 unless each section "ran".
# Not part of CI: run it by hand (benchmarks/README.md, "Device check").
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
HOME_DIR=${HMS_REHEARSAL_HOME:-$HOME/.cache/hms-deploy/rehearsal}
VENV=$HOME_DIR/venv
BUNDLE=$HOME_DIR/bundle
PYENV_PY=${HMS_REHEARSAL_PYTHON:-}

prepare() {
  mkdir -p "$HOME_DIR"
  if [ ! -x "$VENV/bin/python" ]; then
    if [ -z "$PYENV_PY" ]; then
      local v; v=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12.* 2>/dev/null | sort -V | tail -1)
      [ -n "$v" ] || { echo "device_rehearsal: no Python 3.12 under pyenv (pyenv install 3.12)"; exit 1; }
      PYENV_PY=$v/bin/python3
    fi
    "$PYENV_PY" -m venv "$VENV"
  fi
  # the GPU machine's packages at its versions (benchmarks/README.md, "Device check")
  "$VENV/bin/python" -m pip install -q --upgrade "pip>=24"
  "$VENV/bin/python" -m pip install -q \
    "torch==2.11.0" "torchvision==0.26.0" "torchaudio==2.11.0" "numpy==2.5.*" \
    "onnx==1.23.1" "onnxruntime==1.30.0" onnxscript timm click tqdm pillow matplotlib scipy \
    pandas pytest pytest-timeout setuptools wheel
  "$VENV/bin/python" -m pip list --format=freeze > "$HOME_DIR/venv-packages.txt"
  PYTHON="$VENV/bin/python" bash scripts/device_bundle.sh "$BUNDLE"
  echo "device_rehearsal: prepared $VENV ($(grep -iE '^(torch|numpy|onnxruntime)==' "$HOME_DIR/venv-packages.txt" | tr '\n' ' ')) and $BUNDLE"
}

if [ "${1:-}" = "--prepare" ]; then prepare; exit 0; fi
if [ $# -eq 0 ]; then  # both phases: prepare (cached; the index) then the offline run
  prepare
  set -- rehearsal_out
fi
[ $# -eq 1 ] || { echo "usage: bash scripts/device_rehearsal.sh [--prepare | OUT]" >&2; exit 2; }
[ -x "$VENV/bin/python" ] && [ -f "$BUNDLE/bundle_bytes" ] ||
  { echo "device_rehearsal: not prepared: run bash scripts/device_rehearsal.sh --prepare first"; exit 1; }
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/hms-rehearsal.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
# what a GPU machine receives: the working tree's tracked and not-ignored files + the bundle
git ls-files -z --cached --others --exclude-standard | xargs -0 -I{} cp --parents {} "$WORK/" 2>/dev/null || true
cp -r "$BUNDLE" "$WORK/bundle"
# no network: a namespace with only loopback; where that is not allowed, say so and stop
if ! unshare --net true 2>/dev/null; then
  echo "device_rehearsal: cannot create a network namespace here (unshare --net needs root)"
  exit 1
fi
# this working tree's own wheel replaces the one made by --prepare (offline: local setuptools)
rm -f "$WORK/bundle"/hms_deploy-*.whl
(cd "$WORK" && unshare --net "$VENV/bin/python" -m pip wheel -q --no-index --no-deps \
  --no-build-isolation -w "$WORK/bundle" "$WORK" > "$WORK/wheel.log" 2>&1) ||
  { tail -n 5 "$WORK/wheel.log"; echo "device_rehearsal: building the project's wheel failed"; exit 1; }
rm -rf "$WORK/build" "$WORK"/*.egg-info
bundle=$(cat "$WORK"/bundle/*.whl | wc -c)
repo=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
echo "device_rehearsal: bundle $bundle bytes ($(ls "$WORK"/bundle/*.whl | wc -l) wheels); with the repository $(( bundle + repo )) bytes ($(awk -v b=$(( bundle + repo )) 'BEGIN {printf "%.1f", b / 1048576}') MiB; limit 64 MiB)"
CMD=(bash scripts/gpu_check.sh --bundle bundle --dry-run --out "$OUT")
echo "device_rehearsal: running (python3 = $VENV/bin/python, no network): ${CMD[*]}"
rc=0
(cd "$WORK" && unshare --net env PATH="$VENV/bin:$PATH" PIP_NO_INDEX=1 PYTHON=python3 \
  HMS_GPU_CHECK_BUDGET=${HMS_GPU_CHECK_BUDGET:-2400} HMS_GPU_WORK="$WORK/.gpu-work" \
  HOME="$WORK/home" "${CMD[@]}") || rc=$?
"$VENV/bin/python" - "$OUT/gpu_check.json" <<'PY' || rc=1
import json, sys
report = json.load(open(sys.argv[1]))
print(f"device_rehearsal: bundle_bytes {report.get('bundle_bytes')}; torch {report.get('torch')}, "
      f"numpy {report.get('numpy')}; sections:")
ok = True
for name, s in report["sections"].items():
    print(f"  {name}: {s['status']}" + (f" ({s['reason']})" if s.get("reason") else ""))
    ok &= s["status"] == "ran"
sys.exit(0 if ok else 1)
PY
exit $rc
