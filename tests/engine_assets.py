"""Assets for the engine tests (contract, backends, TensorRT), built once per process.

A tiny checkpoint (5 classes) and its ONNX export made with the export engineer's API
(``export_checkpoint``, with a short validation: these tests check parity themselves),
plus engine factories for every backend and device, and the tolerances of the contract.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from hms_deploy.checkpoint import init_checkpoint, save_checkpoint
from hms_deploy.config import make_config
from hms_deploy.errors import BackendUnavailable
from hms_deploy.parts import PART_NAMES, part_specs
from hms_deploy.runtime.engine import Engine

RTOL, ATOL = 1e-4, 1e-5
TIE = 1e-4  # gate logits closer than this may decide either way on another backend


@functools.cache
def root() -> Path:
    path = Path(tempfile.mkdtemp(prefix="hms-engine-tests-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@functools.cache
def checkpoint() -> Path:
    ckpt = init_checkpoint(make_config("tiny", 5), seed=0)
    return save_checkpoint(ckpt, root() / "tiny.pt")


@functools.cache
def export_dir() -> Path:
    from hms_deploy.export.pipeline import ExportOptions, export_checkpoint
    from hms_deploy.export.validate import ValidationOptions

    quick = ValidationOptions(random_batches=(1,), gate_samples=8, steps=1, realistic_motion_steps=1)
    out = root() / "engines"
    export_checkpoint(checkpoint(), out, ExportOptions(validation=quick))
    return out


def manifest():
    from hms_deploy.runtime.manifest import load_manifest

    return load_manifest(export_dir(), verify=False)


@functools.cache
def model() -> torch.nn.Module:
    from hms_deploy.checkpoint import load_checkpoint

    return load_checkpoint(checkpoint()).build_model()


@functools.cache
def specs():
    return part_specs(model().cfg)


def torch_engine(part: str, device: str = "cpu") -> Engine:
    """A fresh (unopened) torch engine over the checkpoint's module; the reference."""
    from hms_deploy.runtime.backends.torch import TorchEngine

    return TorchEngine(specs()[part], model().part(part), torch.device(device))


def onnx_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def onnx_cuda_available() -> bool:
    if not (torch.cuda.is_available() and onnx_available()):
        return False
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def trt_unavailable_reason() -> str | None:
    from hms_deploy.runtime.backends.trt import require_cuda, require_tensorrt

    try:
        require_tensorrt()
        require_cuda(torch.device("cuda"))
    except BackendUnavailable as e:
        return str(e)
    return None


# (backend, device) variants of the conformance test; "onnx-iobinding" is ONNX Runtime on
# CPU with preallocated, reused outputs: the GPU backends' output lifetime, testable here.
# "trt-emulated-11" / "-10" are the real TensorRT backend over tests/trt_emulator.py
# (TensorRT 11 names only / TensorRT 10's; deferred execution, poisoned memory) on the CPU.
VARIANTS = ("torch-cpu", "onnx-cpu", "onnx-iobinding-cpu", "trt-emulated-11", "trt-emulated-10",
            "torch-cuda", "onnx-cuda", "trt-cuda")
EMULATED_TRT = {"trt-emulated-11": "11.0.0", "trt-emulated-10": "10.13.0.35"}


def skip_reason(variant: str) -> str | None:
    if variant in EMULATED_TRT:
        return None if onnx_available() else "the TensorRT emulator runs plans with onnxruntime"
    if variant.endswith("cuda") and not torch.cuda.is_available():
        return "no CUDA device"
    if variant.startswith("onnx") and not onnx_available():
        return "onnxruntime is not installed"
    if variant == "onnx-cuda" and not onnx_cuda_available():
        return "onnxruntime has no CUDAExecutionProvider (CPU build)"
    if variant == "trt-cuda":
        return trt_unavailable_reason()
    return None


@functools.cache
def _trt_stream() -> torch.cuda.Stream:
    from hms_deploy.runtime.bindings import new_stream

    return new_stream(torch.device("cuda"))


@functools.cache
def emulated_export_dir(version: str = "11.0.0") -> Path:
    """:func:`export_dir` with TensorRT plans built by the emulator of ``version``."""
    from trt_emulator import emulated_export

    return emulated_export(export_dir(), root() / f"engines-trt-emulated-{version}", version=version)


def make_engine(variant: str, part: str) -> Engine:
    """A fresh (unopened) engine of ``variant`` for ``part``; skips if unavailable here.

    ``trt-emulated-*`` needs the emulator of its version installed while the engine is
    used (``trt_emulator.installed(EMULATED_TRT[variant])``).
    """
    reason = skip_reason(variant)
    if reason:
        pytest.skip(reason)
    if variant in EMULATED_TRT:
        from trt_emulator import emulated_tensorrt

        from hms_deploy.runtime.backends.trt import trt_engines
        from hms_deploy.runtime.manifest import load_manifest

        version = EMULATED_TRT[variant]
        device = emulated_tensorrt(version).emulated_device
        return trt_engines(load_manifest(emulated_export_dir(version)), torch.device("cpu"),
                           streams=device)[part]
    backend, device = variant.rsplit("-", 1)
    dev = torch.device(device if device == "cpu" else "cuda", None if device == "cpu" else 0)
    if backend == "torch":
        return torch_engine(part, str(dev))
    if backend in ("onnx", "onnx-iobinding"):
        from hms_deploy.runtime.backends.onnx import onnx_engines

        engines = onnx_engines(manifest(), dev, threads=1, iobinding=True if backend == "onnx-iobinding" else None)
        return engines[part]
    from hms_deploy.runtime.backends.trt import trt_engines

    return trt_engines(manifest(), dev, stream=_trt_stream())[part]


__all__ = ["ATOL", "EMULATED_TRT", "PART_NAMES", "RTOL", "TIE", "VARIANTS", "make_engine", "torch_engine"]
