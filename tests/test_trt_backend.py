"""The TensorRT backend without TensorRT: errors, and mypy.

- Without TensorRT (or without CUDA) the backend raises BackendUnavailable with the hint.
- The backend's call sequence on CPU (plan I/O discovery and checks, dtypes read from the
  plan, shapes and addresses set only when they change, chunks, plans refused with how to
  rebuild them) runs against the one TensorRT double, the emulator:
  tests/test_trt_emulator.py.
- mypy checks runtime/backends/trt.py against the TensorRT stubs (patched so that mypy
  can read them, tests/trt_stubs.py), with a negative control proving it does.
"""

from __future__ import annotations

import importlib.machinery
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from engine_assets import trt_unavailable_reason

from hms_deploy.errors import BackendUnavailable
from hms_deploy.runtime.backends.trt import TRT_MISSING, require_cuda, trt_engines

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


# --------------------------------------------------------------------- without TensorRT


def test_without_tensorrt_the_backend_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from engine_assets import manifest

    stubs_only = types.ModuleType("tensorrt")  # what tensorrt-stubs' namespace package looks like
    stubs_only.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt", stubs_only)
    with pytest.raises(BackendUnavailable, match=r"^TensorRT is not installed: pip install tensorrt "
                       r"\(NVIDIA's index\) on a machine with an NVIDIA GPU$"):
        trt_engines(manifest(), torch.device("cuda", 0))
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendUnavailable) as e:
        trt_engines(manifest(), torch.device("cuda", 0))
    assert str(e.value) == TRT_MISSING


def test_tensorrt_needs_a_cuda_device() -> None:
    with pytest.raises(BackendUnavailable, match=r"TensorRT runs on an NVIDIA GPU; got device cpu"):
        require_cuda(CPU)
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="torch sees no CUDA device"):
            require_cuda(torch.device("cuda"))


def test_conformance_variant_reports_why_tensorrt_is_skipped() -> None:
    reason = trt_unavailable_reason()
    if reason is None:
        pytest.skip("TensorRT and CUDA are available: the conformance test runs the real backend")
    assert "TensorRT" in reason or "CUDA" in reason


# ------------------------------------------------------------------------------- mypy


# torch and numpy are not analysed (Any): a cold mypy run over torch takes ~40 s here.
# The full check, torch included, is the command in tests/trt_stubs.py.
MYPY_INI = """\
[mypy]
python_version = 3.11
ignore_missing_imports = True
follow_imports = silent
[mypy-torch.*]
follow_imports = skip
[mypy-numpy.*]
follow_imports = skip
"""


def _mypy(tmp: Path, stubs: Path, *files: str) -> subprocess.CompletedProcess[str]:
    ini = tmp / "mypy.ini"
    ini.write_text(MYPY_INI)
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(ini), "--cache-dir", str(tmp / "cache"),
           "--no-error-summary", "--strict", *files]
    env = {**os.environ, "MYPYPATH": str(stubs)}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)


def test_trt_backend_type_checks_against_the_tensorrt_stubs(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    from trt_stubs import write_stubs

    stubs = write_stubs(tmp_path / "stubs")
    if stubs is None:
        pytest.skip("tensorrt-stubs is not installed")
    done = _mypy(tmp_path, stubs, "runtime/backends/trt.py", "runtime/streams.py")
    assert done.returncode == 0, done.stdout + done.stderr
    # negative control: the stubs are really used (an API TensorRT 10 removed is an error)
    bad = tmp_path / "bad_trt.py"
    bad.write_text("import tensorrt as trt\n\n\ndef f(c: trt.IExecutionContext) -> None:\n"
                   "    c.execute_async_v2([], 0)\n")
    done = _mypy(tmp_path, stubs, str(bad))
    assert done.returncode != 0 and '"IExecutionContext" has no attribute "execute_async_v2"' in done.stdout
