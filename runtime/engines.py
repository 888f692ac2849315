"""An :class:`EngineSet`: the nine engines of one model on one backend and device.

Opened from an ``hms-export`` directory (hashes verified; backends ``onnx`` and ``trt``)
or from a checkpoint (backend ``torch`` only). It carries what the scheduler needs that
is not an engine: the config (preprocessing), labels, per-part costs, and the export hash.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from hms_deploy.config import HMSConfig
from hms_deploy.errors import BackendUnavailable, ConfigError
from hms_deploy.parts import PART_NAMES, part_specs
from hms_deploy.runtime.engine import Engine

BACKENDS = ("torch", "onnx", "trt")
DEFAULT_DEVICE = "cpu"  # the device a model runs on unless told


def device_of(device: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` -> torch.device, without asking whether it exists
    here (a model repository may be written for another machine)."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"unknown device {device!r}, expected cpu, cuda or cuda:N",
                          value=device, expected="cpu, cuda or cuda:N")
    return dev


def parse_device(device: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` -> torch.device, with a clear error if CUDA is missing."""
    dev = device_of(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendUnavailable(f"device {device!r} requested but no CUDA device is available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BackendUnavailable(
                f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


@dataclass
class EngineSet:
    """Nine engines keyed by part name, plus the model facts the runtime needs."""

    backend: str
    device: torch.device
    config: HMSConfig
    labels: list[str]
    costs: dict[str, float]
    engines: dict[str, Engine]
    export_sha256: str | None = None  # sha256 of manifest.json, None for a checkpoint
    source: str = ""
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack, repr=False)

    def __getitem__(self, part: str) -> Engine:
        return self.engines[part]

    def __enter__(self) -> EngineSet:  # noqa: PYI034 - a dataclass, never subclassed
        for name in PART_NAMES:
            self._stack.enter_context(self.engines[name])
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stack.close()
        self._stack = contextlib.ExitStack()

    def calls(self) -> dict[str, int]:
        return {name: e.calls for name, e in self.engines.items()}


def engines_from_checkpoint(checkpoint: str | Path, device: str = DEFAULT_DEVICE) -> EngineSet:
    """Torch engines over a checkpoint's modules."""
    from hms_deploy.checkpoint import load_checkpoint
    from hms_deploy.runtime.backends.torch import TorchEngine

    dev = parse_device(device)
    ckpt = load_checkpoint(checkpoint)
    model = ckpt.build_model()
    specs = part_specs(ckpt.config)
    engines: dict[str, Engine] = {
        name: TorchEngine(specs[name], model.part(name), dev) for name in PART_NAMES
    }
    return EngineSet(
        backend="torch", device=dev, config=ckpt.config, labels=ckpt.labels, costs=ckpt.costs,
        engines=engines, source=str(checkpoint),
    )


def engines_from_export(
    engines_dir: str | Path, backend: str = "onnx", device: str = DEFAULT_DEVICE, **options: Any
) -> EngineSet:
    """ONNX Runtime or TensorRT engines over an ``hms-export`` directory (hashes verified).

    ``options`` go to the backend (e.g. ``providers`` for onnx, ``max_batch`` for trt).
    """
    from hms_deploy.runtime.manifest import load_manifest

    dev = parse_device(device)
    manifest = load_manifest(engines_dir, verify=True)
    if backend == "onnx":
        from hms_deploy.runtime.backends.onnx import onnx_engines

        engines = onnx_engines(manifest, dev, **options)
    elif backend == "trt":
        from hms_deploy.runtime.backends.trt import trt_engines

        engines = trt_engines(manifest, dev, **options)
    else:
        raise ConfigError(f"backend {backend!r} cannot run an export dir; expected onnx or trt")
    return EngineSet(
        backend=backend, device=dev, config=manifest.config, labels=manifest.labels,
        costs={name: manifest.parts[name].gmac for name in PART_NAMES},
        engines=engines, export_sha256=manifest.sha256, source=str(engines_dir),
    )


def open_engine_set(
    backend: str,
    *,
    engines_dir: str | Path | None = None,
    checkpoint: str | Path | None = None,
    device: str = DEFAULT_DEVICE,
    **options: object,
) -> EngineSet:
    """The one entry point: ``torch`` needs ``checkpoint``; ``onnx``/``trt`` need ``engines_dir``."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown engine {backend!r}, expected one of {BACKENDS}",
                          setting="engine", value=backend, expected=" | ".join(BACKENDS))
    if backend == "torch":
        if checkpoint is None:
            raise ConfigError("engine torch needs checkpoint, a checkpoint file (.pt)",
                              setting=("engine", "checkpoint"), value=backend)
        return engines_from_checkpoint(checkpoint, device)
    if checkpoint is not None and engines_dir is None:
        raise ConfigError(
            f"engine {backend} runs an export dir, not a checkpoint; export the checkpoint "
            "first (hms-export), or run it with the torch engine",
            setting=("engine", "engines_dir"), value=backend)
    return engines_from_export(engines_dir or "engines", backend, device, **options)
