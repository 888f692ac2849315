#!/usr/bin/env bash
# The one prepared device check (issue #10). On a machine with a CUDA GPU, in under
# 8 minutes, it runs and writes under ${OUT:-gpu_out}/:
#   1. the GPU-marked tests and the CUDA variants of the engine conformance test;
#   2. scripts/gpu_check.py: the lockstep step loop under torch.cuda.set_sync_debug_mode
#      (only the counted decision/prediction reads may synchronise) and the profiler proof
#      that an audio-only run launches no appearance/motion kernel;
#   3. hms-bench --device cuda on the paper variant, --engine torch (and onnx / trt where
#      onnxruntime-gpu / TensorRT are installed): videos/s, per-stage breakdown, dense
#      batched over steps side by side; lockstep N = 8 and 32 (N = 1: the sequential runs);
# then prints a one-screen summary ($OUT/summary.txt). Without a GPU it prints one line
# and exits 0 at once.
#
# Environment: a bare machine with this repository and PyTorch + CUDA preinstalled. The
# preinstalled torch is kept: a venv (.venv-gpu) with --system-site-packages gets this
# package (--no-deps) and the other dependencies from the package index, constrained to
# the installed torch (no second torch is downloaded). PYTHON picks the interpreter
# (default python3); HMS_GPU_CHECK_BUDGET the seconds for the whole check (default 450).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-gpu_out}
if { ! ls /dev/nvidia0 >/dev/null 2>&1 && ! command -v nvidia-smi >/dev/null 2>&1; } ||
   ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
  echo "gpu_check: no CUDA GPU visible to PyTorch ($PY) on this machine; nothing to check"
  exit 0
fi
BUDGET=${HMS_GPU_CHECK_BUDGET:-450}
START=$SECONDS
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $(( BUDGET - (SECONDS - START) )); }
# step NAME SECONDS CMD...: run with a time limit (never more than what is left), log it
step() {
  local name=$1 limit=$2; shift 2
  local rest; rest=$(left)
  (( limit > rest )) && limit=$rest
  if (( limit < 20 )); then say "[skip] $name: out of time budget"; return 0; fi
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local verdict=ok; (( rc != 0 )) && verdict="FAILED rc=$rc"; (( rc == 124 )) && verdict="TIMED OUT after ${limit}s"
  say "[$verdict] $name ($(( SECONDS - t0 )) s; log $OUT/$name.log)"
  return 0
}

{
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
  git rev-parse HEAD 2>/dev/null || true
} > "$OUT/environment.txt" 2>&1
say "gpu_check: $(sed -n 2p "$OUT/environment.txt") | $(sed -n 3p "$OUT/environment.txt")"

# -- environment: keep the preinstalled torch
VENV=.venv-gpu
setup() {
  set -e
  [ -x "$VENV/bin/python" ] || "$PY" -m venv --system-site-packages "$VENV"
  local v; v=$("$VENV/bin/python" -c "import torch; print(torch.__version__.split('+')[0])")
  echo "torch==$v" > "$VENV/constraints.txt"
  "$VENV/bin/python" -m pip install -q --no-deps -e .
  # the runtime dependencies of pyproject.toml except torch itself, kept at the installed torch
  "$VENV/bin/python" -m pip install -q -c "$VENV/constraints.txt" torchvision torchaudio \
    "timm>=1.0,<2" pytorchvideo==0.1.5 "onnx>=1.17" onnxruntime "onnxscript>=0.2" "av>=12" \
    "click>=8.1" "tqdm>=4.60" "numpy>=1.26" "matplotlib>=3.7" "pytest>=8"
  "$VENV/bin/python" -c "import hms_deploy, torch, torchvision, timm, pytorchvideo, onnx, onnxruntime, av; assert torch.cuda.is_available()"
}
step setup 240 bash -c "$(declare -f setup); VENV=$VENV PY=$PY setup"
VPY="$VENV/bin/python"
if ! "$VPY" -c "import hms_deploy, torch; assert torch.cuda.is_available()" >/dev/null 2>&1; then
  say "gpu_check: the environment could not be set up (see $OUT/setup.log); stopping"
  exit 1
fi

# -- 1. GPU tests (the tiny test model; engine conformance on CUDA; Session on CUDA)
# (-k also matches marker names: the gpu/tensorrt-marked tests and every *-cuda variant)
step tests 150 "$VPY" -m pytest -q -ra -p no:cacheprovider -m "not slow" \
  -k "(cuda or gpu or tensorrt) and not emulat" tests
tail -n 3 "$OUT/tests.log" | sed 's/^/    /' | tee -a "$SUMMARY"

# -- 2. sync-debug step loop and profiler proof
step sync_profiler 120 "$VPY" scripts/gpu_check.py --out "$OUT"
grep -E "^(sync-debug|profiler)" "$OUT/sync_profiler.log" | sed 's/^/    /' | tee -a "$SUMMARY"

# -- 3. hms-bench on the paper variant, lockstep N in {8, 32} (N = 1: the sequential runs)
engines=(torch)
"$VPY" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" \
  2>/dev/null && engines+=(onnx)
"$VPY" -c "import tensorrt" 2>/dev/null && engines+=(trt)
say "bench engines: ${engines[*]} (onnx needs onnxruntime-gpu, trt needs TensorRT)"
for engine in "${engines[@]}"; do
  for n in 8 32; do
    step "bench_${engine}_n$n" 200 "$VENV/bin/hms-bench" --suite e2e --variant paper \
      --engine "$engine" --device cuda --steps 32 --repeats 2 --heavy-repeats 1 \
      --throughput-videos "$n" --throughput-repeats 1 --batch 8 --no-plot \
      --out "$OUT/bench" --name "cuda_paper_${engine}_n$n"
  done
done
"$VPY" - "$OUT/bench" <<'EOF' 2>/dev/null | tee -a "$SUMMARY"
import json, pathlib, sys
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    d = json.loads(f.read_text())
    tp = d.get("throughput", {})
    runs = d.get("runs", {})
    def ms(name):
        r = runs.get(name)
        return f"{r['wall_ms']['median']:.0f} ms" if r else "-"
    hms = d.get("settings", {}).get("hms_policy", "learned")
    print(f"  {f.stem}: T={d.get('T')} videos/s sequential "
          f"{tp.get('sequential', {}).get('videos_per_s')} lockstep(N={tp.get('videos')}) "
          f"{tp.get('lockstep', {}).get('videos_per_s')}; per video: {hms} {ms(hms)}, "
          f"learned {ms('learned')}, dense stepped {ms('dense (stepped)')}, "
          f"dense batched {ms('dense (batched)')}")
    t = runs.get(hms, {}).get("timing_ms", {})
    print("    stages (median ms): " + ", ".join(
        f"{k} {v['median']:.1f}" for k, v in t.items() if isinstance(v, dict) and "median" in v))
EOF
say "gpu_check: done in $(( SECONDS - START )) s; everything is under $OUT/"
