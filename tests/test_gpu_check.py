"""The offline device check without a GPU: its guards, its time caps, its report, and the
sync/profiler section as a CPU dry run (the same counting and profiler attribution, minus
the CUDA sync-debug mode and kernels, which only a GPU has).

The whole check, installed from a bundle with no network, is rehearsed by
``scripts/device_rehearsal.sh`` (by hand: it downloads GBs once; benchmarks/README.md).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from runtime_helpers import one_torch_thread  # noqa: F401 - autouse fixture

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable, "HMS_GPU_WORK": str(tmp_path / "work")}
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, check=False)


def test_without_a_bundle_it_stops_with_one_line(tmp_path):
    done = _run(["--out", str(tmp_path / "out")], tmp_path)
    assert done.returncode == 1 and done.stdout.count("\n") == 1
    assert done.stdout.startswith("gpu_check: no bundle: give --bundle DIR")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _run(["--bundle", str(empty)], tmp_path).stdout.startswith("gpu_check: no bundle")


def test_a_bundle_that_does_not_install_stops_with_one_line(tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "broken-1.0-py3-none-any.whl").write_bytes(b"not a wheel")
    done = _run(["--bundle", str(bundle), "--out", str(tmp_path / "out"), "--dry-run"], tmp_path)
    assert done.returncode == 1 and done.stdout.count("\n") == 1, done.stdout
    assert done.stdout.startswith("gpu_check: installing the bundle failed")


def test_a_bundle_without_the_project_stops_at_the_import_check(tmp_path):
    """Only what the bundle installs counts: hms_deploy from the source tree (which lacks
    hms_deploy.runtime without an install) is never taken for the installed package."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    wheel = bundle / "tiny-1.0-py3-none-any.whl"
    import zipfile

    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("tiny.py", "")
        z.writestr("tiny-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: tiny\nVersion: 1.0\n")
        z.writestr("tiny-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("tiny-1.0.dist-info/RECORD", "")
    done = _run(["--bundle", str(bundle), "--out", str(tmp_path / "out"), "--dry-run"], tmp_path)
    assert done.returncode == 1, done.stdout
    assert done.stdout.startswith("gpu_check: the bundle's packages do not import:"), done.stdout
    assert "hms_deploy not from the bundle" in done.stdout or "No module named" in done.stdout


def test_the_caps_of_every_step_sum_to_the_budget():
    """Sections run in order of value; each has a cap and the caps (with the fixed steps)
    add up to the 480 s budget, so a slow section cannot take a later one's time."""
    text = SCRIPT.read_text()
    caps = dict(re.findall(r"\[(\w+)\]=(\d+)", re.search(r"declare -A CAP=\((.*?)\)", text).group(1)))
    fixed = [int(n) for n in re.findall(r'timeout "\$\(cap (\d+)\)"', text)]
    assert list(caps) == list(_gpu_check().SECTIONS)
    assert sum(map(int, caps.values())) + sum(fixed) == 480
    assert re.search(r"HMS_GPU_CHECK_BUDGET:-480", text)
    assert "--no-index --no-deps --target" in text and "pip install -e" not in text


def test_the_report_never_calls_skipped_work_ran(tmp_path):
    gpu_check = _gpu_check()
    work = tmp_path / "work"
    gpu_check.record(work, "sync_profiler", "ran", None, {"sync_debug": {"ok": True}})
    gpu_check.record(work, "part_latency", "failed", "timed out after 70 s (its cap)")
    rc = gpu_check.report(work, tmp_path / "out", dry_run=True, bundle_bytes=123, budget_s=480,
                          caps={"sync_profiler": 55}, backends={"trt": "absent"})
    assert rc == 1
    data = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert list(data["sections"]) == list(gpu_check.SECTIONS)
    st = {k: v["status"] for k, v in data["sections"].items()}
    assert st == {"sync_profiler": "ran", "part_latency": "failed", "end_to_end": "skipped",
                  "lockstep": "skipped", "trace": "skipped", "cuda_tests": "skipped"}
    assert data["sections"]["end_to_end"]["reason"].startswith("not reached")
    assert data["bundle_bytes"] == 123 and data["dry_run"] is True
    for key in ("torch", "cuda", "numpy", "nvidia_smi", "device", "compute_capability"):
        assert key in data
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "DRY RUN" in md and "| part_latency | failed | timed out" in md
    with pytest.raises(SystemExit):
        gpu_check.record(work, "lockstep", "ok", None)  # "ok" is not a status


def test_sync_and_profiler_section_dry_run_on_cpu(tmp_path):
    gpu_check = _gpu_check()
    assert gpu_check.run_section("sync_profiler", tmp_path, dry_run=True) == 0
    d = json.loads((tmp_path / "sections" / "sync_profiler.json").read_text())
    assert d["status"] == "ran"
    s, p = d["result"]["sync_debug"], d["result"]["profiler"]
    assert s["ok"] and s["partial_steps"] > 0 and s["host_reads"] == s["gate_calls"] > 0
    assert p["ok"]
    assert p["audio_only_kernels"]["appearance_backbone"] == p["audio_only_kernels"]["motion_backbone"] == 0
    assert p["dense_kernels"]["appearance_backbone"] > 0 and p["dense_kernels"]["motion_backbone"] > 0
