"""scripts/gpu_check.sh without a GPU (one line, exit 0, at once) and scripts/gpu_check.py's
checks run as a CPU dry run (the same counting and profiler attribution, minus the CUDA
sync-debug mode and kernels, which only a GPU has)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from runtime_helpers import one_torch_thread  # noqa: F401 - autouse fixture

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the script would run")
def test_gpu_check_without_a_gpu_says_so_in_one_line(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    t = time.perf_counter()
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1 and done.stderr == ""
    assert done.stdout.startswith("gpu_check: no CUDA GPU visible to PyTorch")
    assert time.perf_counter() - t < 60  # no setup, no tests: at most one python start
    assert not out.exists() and not (REPO / ".venv-gpu").exists()


def test_gpu_check_py_dry_run_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    assert gpu_check.main(["--device", "cpu", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    s, p = report["sync_debug"], report["profiler"]
    assert s["ok"] and s["partial_steps"] > 0 and s["host_reads"] == s["gate_calls"] > 0
    assert p["ok"]
    assert p["audio_only_kernels"]["appearance_backbone"] == p["audio_only_kernels"]["motion_backbone"] == 0
    assert p["dense_kernels"]["appearance_backbone"] > 0 and p["dense_kernels"]["motion_backbone"] > 0
