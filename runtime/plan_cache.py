"""TensorRT plans built on first use (``hms-run --engine trt`` on an export without plans).

The runtime does not import the export package; the caller hands down the builder
(``add_trt_plans`` of the export package: ``hms-run`` and the benchmarks do). Builds run
under an exclusive file lock in the export dir, so concurrent runs build once.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hms_deploy.parts import PART_NAMES
from hms_deploy.runtime.trt_plan import plan_error

if TYPE_CHECKING:
    from hms_deploy.runtime.manifest import Manifest

BUILD_LOCK = ".trt_build.lock"

# builds every part's plan into an export dir: (dir, *, max_batch) -> anything (ignored)
PlanBuilder = Callable[..., object]


def build_missing_plans(manifest: Manifest, device: torch.device, max_batch: int, build_plans: PlanBuilder) -> None:
    """Build every part's plan from its ONNX file into the export dir; refresh ``manifest``.

    Under an exclusive lock on ``DIR/.trt_build.lock``: a second process waits, then finds
    the plans built and loads them.
    """
    from hms_deploy.runtime.manifest import load_manifest

    root = Path(manifest.dir)
    try:
        lock = open(root / BUILD_LOCK, "a+b")  # noqa: SIM115 - closed by the with below
    except OSError as e:
        raise plan_error(
            f"{root}: the export has no TensorRT plans and they cannot be built there ({e}); ",
            root, " where the directory is writable") from None
    with lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released when the file closes
        fresh = load_manifest(root, verify=True)
        if not any("trt" in fresh.parts[name].files for name in PART_NAMES):  # nobody built meanwhile
            with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
                build_plans(root, max_batch=max_batch)
                fresh = load_manifest(root, verify=True)
    vars(manifest).update(vars(fresh))  # callers keep their object; it now lists the plans
