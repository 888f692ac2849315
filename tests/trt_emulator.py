"""A TensorRT EMULATOR for tests on machines without a GPU. Never shipped, never a backend.

It stands in for the ``tensorrt`` module (installed into ``sys.modules``) and for the
CUDA device (tests/emulated_device.py: a :class:`~hms_deploy.runtime.streams.DeviceStreams`
over CPU memory; deserialised plans and contexts: tests/emulated_engine.py), so
that the real TensorRT backend (runtime/backends/trt.py) and the real plan builder
(export/tensorrt.py ``build_plan``) run unchanged on CPU tensors. What it models:

- **Building**: ``Builder``, ``INetworkDefinition``, ``OnnxParser`` (reads the ONNX
  file's inputs and outputs; a file it cannot load gives parser errors),
  ``IBuilderConfig`` (workspace pool, flags, optimisation profile, timing cache) and
  ``build_serialized_network``, which checks that every dynamic input has a profile and
  returns a plan: a header (TensorRT version, GPU, I/O, profile) plus the ONNX model.
  Executing a plan runs that ONNX model with ONNX Runtime on the CPU.
- **Loading**: ``Runtime.deserialize_cuda_engine`` returns None for bytes that are not a
  plan, or a plan built by another TensorRT version or for another GPU (as TensorRT
  does). ``ICudaEngine`` / ``IExecutionContext`` give I/O by name, profile shapes,
  ``set_input_shape`` (refused outside the profile), ``set_tensor_address``.
- **Deferred execution**: ``execute_async_v3(handle)`` only enqueues on the emulated
  stream with that handle (an unknown or the default stream 0 is an error). The launch
  runs when the stream is synchronised or when another stream is made to wait for it
  (``DeviceStreams.wait``). The caller's "current stream" is the host's eager CPU work
  (ordering it after a stream is a flush) unless a stream was made current with
  ``use(stream)``, as the scheduler does with the engines' stream (the GPU's path: the
  engines then wait for nothing). While a stream is current, a torch op that touches
  memory of a launch pending on it runs the pending launches first (stream order). Until
  a launch runs its output memory holds poison (0xFF bytes: NaN floats, -1 integers), so
  a read that skips the synchronisation (``peek``) sees garbage and fails the test.
- **Lifetimes**: when a launch runs, every address it reads or writes must lie inside a
  tensor recorded on its stream (``DeviceStreams.record``, the ``record_stream`` of the
  CUDA caching allocator) that is still alive, and its execution context must still
  exist; otherwise :class:`EmulatorError` ("freed before completion"). A recorded tensor
  is kept alive until its stream is past the launches issued before the record; if the
  emulator held its last reference it is poisoned before release, like memory the
  allocator hands out again.
- **TensorRT 11 mode** (``version="11.x"``): the names TensorRT 11 removed
  (docs/tensorrt.md §1) are absent, so code that uses them fails with AttributeError, and every
  network is strongly typed.
- **Timing caches and loggers**: a timing cache belongs to the device that made it;
  ``set_timing_cache`` of another device's cache returns False and ``get_timing_cache``
  then returns None (as TensorRT does). ``Logger.created`` counts the loggers made.
"""

from __future__ import annotations

import enum
import functools
import importlib.machinery
import json
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from emulated_device import (
    GPU_CC,
    GPU_NAME,
    POISON,
    EmulatedDevice,
    EmulatorError,
    EmuStream,
    peek,
)
from emulated_engine import Dims, ICudaEngine, IExecutionContext

from hms_deploy.runtime.trt_plan import DEFAULT_MAX_BATCH

__all__ = ["GPU_CC", "GPU_NAME", "POISON", "EmuStream", "EmulatedDevice", "EmulatorError",
           "add_plans", "emulated_export", "emulated_tensorrt", "installed", "peek"]

MAGIC = b"TRT-EMULATOR-PLAN\n"

# names TensorRT 11 removed (docs/tensorrt.md §1; NVIDIA's 10.x -> 11.x Python migration guide)
REMOVED_IN_11_FLAGS = ("FP16", "BF16", "INT8", "FP8", "INT4", "FP4", "OBEY_PRECISION_CONSTRAINTS",
                       "PREFER_PRECISION_CONSTRAINTS", "DIRECT_IO")

_ONNX_TYPES = {1: "FLOAT", 2: "UINT8", 3: "INT8", 6: "INT32", 7: "INT64", 9: "BOOL", 10: "HALF",
               16: "BF16"}


# --------------------------------------------------------------------------- the module


class _Error:
    def __init__(self, desc: str, node: str = "", op: str = ""):
        self._desc, self._node, self._op = desc, node, op

    def desc(self) -> str:
        return self._desc

    def node_name(self) -> str:
        return self._node

    def node_operator(self) -> str:
        return self._op


class ITensor:
    def __init__(self, name: str, dtype: Any, shape: tuple[int, ...]):
        self.name, self.dtype, self.shape = name, dtype, Dims(shape)


class INetworkDefinition:
    def __init__(self, flags: int, strongly_typed: bool):
        self.flags = flags
        self.strongly_typed = strongly_typed
        self.inputs: list[ITensor] = []
        self.outputs: list[ITensor] = []
        self.onnx: bytes | None = None
        self.name = ""

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    @property
    def num_outputs(self) -> int:
        return len(self.outputs)

    def get_input(self, i: int) -> ITensor:
        return self.inputs[i]

    def get_output(self, i: int) -> ITensor:
        return self.outputs[i]


def _make_module(version: str) -> types.ModuleType:
    major = int(version.split(".")[0])
    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # torch._dynamo looks it up
    trt.__version__ = version
    trt.__doc__ = "TensorRT EMULATOR (tests/trt_emulator.py), not TensorRT"
    trt.DataType = enum.Enum("DataType", ["FLOAT", "HALF", "BF16", "INT8", "INT32", "INT64", "BOOL", "UINT8"])
    trt.TensorIOMode = enum.Enum("TensorIOMode", ["NONE", "INPUT", "OUTPUT"])
    trt.MemoryPoolType = enum.Enum("MemoryPoolType", ["WORKSPACE", "DLA_MANAGED_SRAM", "TACTIC_DRAM"])
    flags = ["TF32", "DEBUG", "GPU_FALLBACK", "REFIT", "VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME"]
    if major < 11:
        flags += list(REMOVED_IN_11_FLAGS)
    trt.BuilderFlag = enum.IntEnum("BuilderFlag", flags)
    creation = {"STRONGLY_TYPED": 1} if major >= 11 else {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1}
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", creation)
    trt.HardwareCompatibilityLevel = enum.Enum("HardwareCompatibilityLevel",
                                               ["NONE", "AMPERE_PLUS", "SAME_COMPUTE_CAPABILITY"])
    trt.Dims = Dims
    trt.emulated_device = EmulatedDevice()

    class Logger:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)
        created = 0  # instances made in this process (TensorRT wants one)

        def __init__(self, min_severity: int = 2):
            type(self).created += 1
            self.min_severity = min_severity
            self.messages: list[str] = []

    class ITimingCache:
        """Timing entries of one device (TensorRT rejects a cache made on another GPU)."""

        def __init__(self, data: bytes):
            entries, device = 0, GPU_NAME
            if data.startswith(b"TRT-EMULATOR-TIMING "):
                head, _, tail = data.partition(b"\n")
                entries = int(head.split()[1])
                device = tail.decode().strip() or GPU_NAME
            self.entries, self.device = entries, device

        def serialize(self) -> bytes:
            return b"TRT-EMULATOR-TIMING %d\n%s\n" % (self.entries, self.device.encode())

    class IOptimizationProfile:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple[tuple[int, ...], ...]] = {}

        def set_shape(self, name: str, min: Any, opt: Any, max: Any) -> None:
            lo, mid, hi = (tuple(int(d) for d in s) for s in (min, opt, max))
            if not (len(lo) == len(mid) == len(hi)) or any(not a <= b <= c for a, b, c in zip(lo, mid, hi)):
                raise ValueError(f"profile for '{name}': need min <= opt <= max, got {lo}, {mid}, {hi}")
            self.shapes[name] = (lo, mid, hi)

    class IBuilderConfig:
        def __init__(self) -> None:
            self.pools: dict[Any, int] = {}
            self.flags: set[Any] = {trt.BuilderFlag.TF32}  # TF32 is on by default
            self.profiles: list[IOptimizationProfile] = []
            self.cache: ITimingCache | None = None
            self.hardware_compatibility_level = trt.HardwareCompatibilityLevel.NONE
            if major < 11:
                self.int8_calibrator = None

        def set_memory_pool_limit(self, pool: Any, size: int) -> None:
            self.pools[pool] = int(size)

        def set_flag(self, flag: Any) -> None:
            self.flags.add(flag)

        def clear_flag(self, flag: Any) -> None:
            self.flags.discard(flag)

        def get_flag(self, flag: Any) -> bool:
            return flag in self.flags

        def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, data: bytes) -> ITimingCache:
            return ITimingCache(bytes(data))

        def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
            if cache.device != GPU_NAME and not ignore_mismatch:
                self.cache = None  # TensorRT: the check fails and get_timing_cache() is None
                return False
            self.cache = cache
            return True

        def get_timing_cache(self) -> ITimingCache | None:
            return self.cache

    class Builder:
        def __init__(self, logger: Logger):
            self.logger = logger

        def create_network(self, flags: int = 0) -> INetworkDefinition:
            strongly = major >= 11 or bool(flags & (1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)))
            return INetworkDefinition(flags, strongly)

        def create_builder_config(self) -> IBuilderConfig:
            return IBuilderConfig()

        def create_optimization_profile(self) -> IOptimizationProfile:
            return IOptimizationProfile()

        def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> bytes | None:
            if network.onnx is None or not network.outputs:
                self.logger.messages.append("ERROR: network has no outputs (nothing parsed)")
                return None
            profile = config.profiles[0].shapes if config.profiles else {}
            for t in network.inputs:
                if -1 in t.shape and t.name not in profile:
                    self.logger.messages.append(f"ERROR: dynamic input '{t.name}' has no optimization profile")
                    return None
                lo, _, hi = profile.get(t.name, (tuple(t.shape),) * 3)
                fixed = [d for d in t.shape]
                if len(lo) != len(fixed) or any(f != -1 and not a == f == b for a, f, b in zip(lo, fixed, hi)):
                    self.logger.messages.append(f"ERROR: profile of '{t.name}' does not match its shape {fixed}")
                    return None
            if config.cache is not None:
                config.cache.entries += len(network.inputs) + len(network.outputs)
            io = [{"name": t.name, "mode": mode, "dtype": t.dtype.name, "shape": list(t.shape)}
                  for mode, ts in (("INPUT", network.inputs), ("OUTPUT", network.outputs)) for t in ts]
            header = {
                "tensorrt": version, "gpu": GPU_NAME, "cc": list(GPU_CC), "name": network.name,
                "strongly_typed": network.strongly_typed, "io": io,
                "profile": {k: [list(s) for s in v] for k, v in profile.items()},
                "flags": sorted(f.name for f in config.flags),
            }
            h = json.dumps(header).encode()
            return MAGIC + len(h).to_bytes(8, "little") + h + network.onnx

        if major < 11:
            platform_has_fast_fp16 = True
            platform_has_fast_int8 = True
            platform_has_tf32 = True

    class OnnxParser:
        def __init__(self, network: INetworkDefinition, logger: Logger):
            self.network, self.logger = network, logger
            self.errors: list[_Error] = []

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def get_error(self, i: int) -> _Error:
            return self.errors[i]

        def parse_from_file(self, path: str) -> bool:
            import onnx

            try:
                model = onnx.load(path)
            except Exception as e:  # noqa: BLE001 - every load failure is a parser error
                self.errors.append(_Error(f"cannot read ONNX file {path}: {e}"))
                return False
            return self._take(model, Path(path).stem)

        def parse(self, data: bytes, path: str | None = None) -> bool:
            import onnx

            try:
                model = onnx.load_from_string(bytes(data))
            except Exception as e:  # noqa: BLE001
                self.errors.append(_Error(f"cannot read ONNX bytes: {e}"))
                return False
            return self._take(model, Path(path).stem if path else "")

        def _take(self, model: Any, name: str) -> bool:
            g = model.graph
            init = {i.name for i in g.initializer}

            def tensor(v: Any) -> ITensor | None:
                tt = v.type.tensor_type
                dtype = _ONNX_TYPES.get(tt.elem_type)
                if dtype is None:
                    self.errors.append(_Error(f"unsupported ONNX type {tt.elem_type} of '{v.name}'", v.name))
                    return None
                shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim)
                return ITensor(v.name, trt.DataType[dtype], shape)

            ins = [tensor(v) for v in g.input if v.name not in init]
            outs = [tensor(v) for v in g.output]
            if self.errors:
                return False
            self.network.inputs = [t for t in ins if t is not None]
            self.network.outputs = [t for t in outs if t is not None]
            self.network.onnx = model.SerializeToString()
            self.network.name = name
            return True

    class Runtime:
        def __init__(self, logger: Logger):
            self.logger = logger
            self.engine_host_code_allowed = False

        def deserialize_cuda_engine(self, data: bytes) -> ICudaEngine | None:
            data = bytes(data)
            if not data.startswith(MAGIC):
                self.logger.messages.append("ERROR: not a serialized engine")
                return None
            n = int.from_bytes(data[len(MAGIC):len(MAGIC) + 8], "little")
            start = len(MAGIC) + 8
            header = json.loads(data[start:start + n])
            if header["tensorrt"] != version or tuple(header["cc"]) != GPU_CC:
                self.logger.messages.append(
                    f"ERROR: plan built by TensorRT {header['tensorrt']} for sm {header['cc']}")
                return None
            engine: ICudaEngine = trt.ICudaEngine(trt, header, data[start + n:])
            return engine

    trt.Logger, trt.Builder, trt.OnnxParser, trt.Runtime = Logger, Builder, OnnxParser, Runtime
    trt.IBuilderConfig, trt.ITimingCache = IBuilderConfig, ITimingCache
    if major < 11:  # names 11 removed exist (deprecated) in 10.x
        class ICudaEngine10(ICudaEngine):
            device_memory_size = 0

            def create_execution_context_without_device_memory(self) -> IExecutionContext:
                return self.create_execution_context()

        class IExecutionContext10(IExecutionContext):
            @property
            def all_shape_inputs_specified(self) -> bool:
                return self._batch() is not None

        trt.ICudaEngine, trt.IExecutionContext = ICudaEngine10, IExecutionContext10
    else:
        trt.ICudaEngine, trt.IExecutionContext = ICudaEngine, IExecutionContext
    return trt


def emulated_tensorrt(version: str = "11.0.0") -> types.ModuleType:
    """The emulated ``tensorrt`` module of ``version`` (one per process; its device:
    ``module.emulated_device``)."""
    return _module(version)


@functools.cache
def _module(version: str) -> types.ModuleType:
    return _make_module(version)


@contextmanager
def installed(version: str = "11.0.0") -> Iterator[types.ModuleType]:
    """Make ``import tensorrt`` give the emulator, and the export's GPU query the emulated
    GPU, while the block runs."""
    from hms_deploy.export import tensorrt as export_trt
    from hms_deploy.runtime.backends import trt as backend

    trt = emulated_tensorrt(version)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "tensorrt", trt)
        mp.setattr(backend, "_LOGGER", None)
        mp.setattr(export_trt, "gpu_info", lambda: (GPU_CC, GPU_NAME))
        yield trt


def add_plans(export_dir: str | Path, *, max_batch: int = DEFAULT_MAX_BATCH) -> Any:
    """Build every part's plan with the export's real ``build_plan`` (against the installed
    emulator) into ``export_dir`` and list them in its manifest; the new manifest.

    ``hms-export --engine trt`` (``add_trt_plans``) also checks the plans' parity
    (``validate_plans``: runtime TrtEngines against OnnxEngines), which needs CUDA; the
    runtime's conformance test does that here.
    """
    from hms_deploy.export.tensorrt import BuildOptions, build_plan
    from hms_deploy.parts import PART_NAMES
    from hms_deploy.runtime import manifest as mf
    from hms_deploy.runtime.trt_plan import PLAN_SUFFIX, TIMING_CACHE_NAME

    root = Path(export_dir)
    m = mf.load_manifest(root, verify=True)
    data = json.loads((root / "manifest.json").read_text())
    for name in PART_NAMES:
        rec = data["parts"][name]
        plan = root / f"{name}{PLAN_SUFFIX}"
        rec["trt"] = build_plan(root / rec["files"]["onnx"], m.parts[name].spec, plan,
                                BuildOptions(max_batch=max_batch), onnx_sha256=rec["sha256"]["onnx"],
                                timing_cache=root / TIMING_CACHE_NAME)
        rec["files"]["trt"] = plan.name
        rec["sha256"]["trt"] = mf.sha256_file(plan)
    data = {k: v for k, v in data.items() if k not in ("format", "format_version")}
    mf.write_manifest(root, data)
    return mf.load_manifest(root, verify=True)


def emulated_export(src: str | Path, dst: str | Path, *, version: str = "11.0.0",
                    max_batch: int = DEFAULT_MAX_BATCH) -> Path:
    """A copy of the ONNX export ``src`` at ``dst`` with emulated plans of ``version``."""
    import shutil

    dst = Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    with installed(version):
        add_plans(dst, max_batch=max_batch)
    return dst
