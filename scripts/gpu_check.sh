#!/usr/bin/env bash
# The offline device check: one command on a GPU machine that has no network.
#
#   bash scripts/gpu_check.sh --bundle DIR [--out OUT] [--dry-run]
#
# DIR is the bundle made by scripts/device_bundle.sh (wheels of what the GPU machine
# lacks, and this project as a wheel). Nothing here reaches a network:
#   1. install: `pip install --no-index --no-deps --target SITE DIR/*.whl` and SITE first
#      on PYTHONPATH (the machine's python3 is itself a venv, so a nested
#      --system-site-packages venv would not see its torch); every python runs from a
#      folder outside the repository, so the source tree's hms_deploy/ cannot shadow the
#      installed package;
#   2. imports: hms_deploy.runtime, hms_deploy.export, av, pytorchvideo, polygraphy and
#      torch with CUDA must import, else one line and exit 1; ONNX Runtime's CUDA provider
#      and a real TensorRT (not tensorrt-stubs) are reported as present or absent;
#   3. the sections, in order of value, each under its own time cap (the caps of every
#      step sum to the budget, HMS_GPU_CHECK_BUDGET, default 480 s; a section past its
#      cap is killed and "failed", so a slow section never eats a later one's time): a sync_profiler, b part_latency, c end_to_end, d lockstep, e trace,
#      f cuda_tests (scripts/gpu_check.py, scripts/gpu_sections.py, pytest);
#   4. OUT (default gpu_out) gets gpu_check.json (card, driver, torch/CUDA versions,
#      bundle_bytes, "sections": {NAME: {"status": "ran"|"skipped"|"failed", "reason"}},
#      results), gpu_check.md and gpu_check.log (every step's log): three files.
# Exit 0 only if every section ran. --dry-run runs every section on the CPU at small
# sizes (scripts/device_rehearsal.sh rehearses this command offline). PYTHON picks the
# interpreter (default python3); scratch files go to HMS_GPU_WORK (default .gpu-work).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PYTHON:-python3}
OUT=gpu_out BUNDLE="" DRY=0
while [ $# -gt 0 ]; do
  case $1 in
    --bundle) BUNDLE=${2:?}; shift 2 ;;
    --out) OUT=${2:?}; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    *) echo "usage: bash scripts/gpu_check.sh --bundle DIR [--out OUT] [--dry-run]" >&2; exit 2 ;;
  esac
done
[ -n "$BUNDLE" ] && ls "$BUNDLE"/*.whl >/dev/null 2>&1 ||
  { echo "gpu_check: no bundle: give --bundle DIR (made by scripts/device_bundle.sh DIR)"; exit 1; }
BUNDLE=$(cd "$BUNDLE" && pwd)
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
WORK=${HMS_GPU_WORK:-$REPO/.gpu-work}
rm -rf "$WORK/sections" "$WORK/site" "$WORK/logs"
mkdir -p "$WORK/logs" "$WORK/run"
WORK=$(cd "$WORK" && pwd)
LOG=$OUT/gpu_check.log
: > "$LOG"
BUDGET=${HMS_GPU_CHECK_BUDGET:-480}
START=$SECONDS
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
export HF_HUB_OFFLINE=1 TORCH_HOME="$WORK/torch_home" MPLBACKEND=Agg
say() { echo "$*" | tee -a "$LOG"; }
# a step's cap: its share (seconds at the default 480 s budget) scaled to the budget; the
# fixed steps (install 30, imports 30, backends 20, media 40, report 30) and the six
# sections (330) sum to the budget
cap() { echo $(( $1 * BUDGET / 480 )); }
DRYFLAG=(); (( DRY )) && DRYFLAG=(--dry-run)

# -- 1. install from the bundle only
SITE=$WORK/site
if ! timeout "$(cap 30)" "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "$BUNDLE"/*.whl \
     > "$WORK/logs/install.log" 2>&1; then
  cat "$WORK/logs/install.log" >> "$LOG"
  say "gpu_check: installing the bundle failed: $(tail -n 1 "$WORK/logs/install.log")"
  exit 1
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
cd "$WORK/run"  # never the repository root: its hms_deploy/ is not the installed package
need_cuda="assert torch.cuda.is_available(), 'torch sees no CUDA device'"
(( DRY )) && need_cuda="pass"
if ! msg=$(timeout "$(cap 30)" "$PY" -c "
import sys, torch
$need_cuda
import hms_deploy.runtime, hms_deploy.export, hms_deploy.runtime.backends.trt, av, polygraphy
import pytorchvideo.models.hub
assert hms_deploy.runtime.__file__.startswith('$SITE'), 'hms_deploy not from the bundle: ' + hms_deploy.runtime.__file__
" 2>&1); then
  say "gpu_check: the bundle's packages do not import: $(echo "$msg" | tail -n 1)"
  exit 1
fi
backends=$(timeout "$(cap 20)" "$PY" - <<'EOF' 2>>"$LOG"
import torch
where = f"CUDA {torch.version.cuda}" if torch.cuda.is_available() else "CPU only"
out = [f"torch={torch.__version__} on {where}"]
try:
    import onnxruntime as ort
    ok = "CUDAExecutionProvider" in ort.get_available_providers()
    out.append("onnx=" + ("cuda" if ok else f"absent (onnxruntime {ort.__version__} is the CPU build)"))
except ImportError as e:
    out.append(f"onnx=absent ({e})")
from hms_deploy.errors import BackendUnavailable
from hms_deploy.runtime.backends.trt import require_tensorrt
try:
    out.append("trt=" + require_tensorrt())
except BackendUnavailable as e:
    out.append(f"trt=absent ({e})")
print(";".join(out))
EOF
)
say "gpu_check: backends: $backends"
rec() { "$PY" "$REPO/scripts/gpu_check.py" --work "$WORK" --record "$@" >> "$LOG" 2>&1; }

# -- 2. the sections, each under its cap
declare -A CAP=([sync_profiler]=50 [part_latency]=60 [end_to_end]=50 [lockstep]=80 [trace]=45 [cuda_tests]=45)
ORDER=(sync_profiler part_latency end_to_end lockstep trace cuda_tests)
caps=""
for s in "${ORDER[@]}"; do CAP[$s]=$(cap "${CAP[$s]}"); caps+="$s=${CAP[$s]},"; done
section() {  # section NAME CMD...: run under its cap; a crash or timeout is "failed"
  local name=$1; shift
  local cap=${CAP[$name]} left=$(( BUDGET - (SECONDS - START) ))
  (( cap > left )) && cap=$left
  if (( cap < 5 )); then rec "$name" skipped "out of time budget"; say "[skipped] $name"; return; fi
  local t0=$SECONDS
  timeout --kill-after=2 "$cap" "$@" > "$WORK/logs/$name.log" 2>&1
  local rc=$?
  if (( rc == 124 || rc == 137 )); then rec "$name" failed "timed out after ${cap} s (its cap)"
  elif [ ! -f "$WORK/sections/$name.json" ]; then rec "$name" failed "exit status $rc: $(tail -n 1 "$WORK/logs/$name.log")"
  fi
  say "[$name] $(( SECONDS - t0 )) s: $(tail -n 1 "$WORK/logs/$name.log")"
}
# the checkpoint and reference video of sections b-e, made once (a section whose media is
# missing makes it itself, inside its own cap)
timeout "$(cap 40)" "$PY" "$REPO/scripts/gpu_check.py" --work "$WORK" --prepare "${DRYFLAG[@]}" \
  > "$WORK/logs/media.log" 2>&1
say "[media] $(tail -n 1 "$WORK/logs/media.log")"
for s in sync_profiler part_latency end_to_end lockstep trace; do
  section "$s" "$PY" "$REPO/scripts/gpu_check.py" --work "$WORK" --section "$s" "${DRYFLAG[@]}"
done
# f. the CUDA-marked tests (and the CUDA variants of the engine conformance test); the
# dry run adds the torch-cpu variants so that something runs where no CUDA exists
sel="(cuda or gpu or tensorrt) and not emulat"
(( DRY )) && sel="(cuda or gpu or tensorrt or torch-cpu) and not emulat"
tests_cmd() {
  "$PY" -m pytest -q -ra -p no:cacheprovider --rootdir "$REPO" -c "$REPO/pyproject.toml" \
    -m "not slow" -k "$sel" "$REPO/tests/test_engine_contract.py" "$REPO/tests/test_backends.py" \
    "$REPO/tests/test_session.py" "$REPO/tests/test_scheduler.py" "$REPO/tests/test_trt_backend.py"
  local rc=$?
  local tail; tail=$(tail -n 1 "$WORK/logs/cuda_tests.log" 2>/dev/null)
  if (( rc == 0 )) && ! grep -q " passed" <<< "$tail"; then rc=5; fi
  if (( rc == 0 )); then rec cuda_tests ran "$tail"; else rec cuda_tests failed "pytest exit $rc"; fi
}
export -f tests_cmd rec; export REPO WORK PY sel LOG
section cuda_tests bash -c 'tests_cmd >> "$WORK/logs/cuda_tests.log" 2>&1'

for f in "$WORK"/logs/*.log; do { echo "=== $(basename "$f")"; tail -n 60 "$f"; } >> "$LOG"; done
bundle_bytes=$(cat "$BUNDLE"/*.whl | wc -c)
timeout "$(cap 30)" "$PY" "$REPO/scripts/gpu_check.py" --work "$WORK" --report "$OUT" "${DRYFLAG[@]}" \
  --bundle-bytes "$bundle_bytes" --budget "$BUDGET" --caps "${caps%,}" --backends "$backends"
rc=$?
[ -f "$OUT/gpu_check.json" ] || say "gpu_check: writing the report failed (exit status $rc)"
say "gpu_check: done in $(( SECONDS - START )) s; $OUT/gpu_check.json, gpu_check.md, gpu_check.log"
exit $rc
