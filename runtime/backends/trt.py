"""The TensorRT backend (TensorRT 10 and 11): one plan and one execution context per part.

``tensorrt`` is imported when an engine opens (or :func:`trt_engines` is called), never
when this module is imported. Only API that TensorRT 10.x and 11.x share is used
(``execute_async_v3``, ``set_input_shape``, ``set_tensor_address``, the
``get_tensor_*`` queries); see docs/tensorrt.md §3.

Per call (:meth:`TrtEngine.run`):

1. each input is made bindable (right device and the dtype the plan declares,
   contiguous; a copy when not) and held alive: ``record_stream`` on the engines' stream
   plus a reference until the next call, so memory is not reused while TensorRT reads it;
2. the input shapes are set on the context only when N changed since the last call;
3. outputs are preallocated per (part, N) and reused
   (:class:`~hms_deploy.runtime.bindings.OutputBuffers`; a second set when an input
   aliases the first), with the dtype read from the engine (``decision`` is INT64);
4. ``execute_async_v3`` on the one caller-owned non-default stream shared by the nine
   engines; that stream first waits for the caller's current stream, and the caller's
   stream then waits for it, so results are ordered without any host sync.

Streams, waits, ``record_stream`` and the GPU query go through a
:class:`~hms_deploy.runtime.streams.DeviceStreams` (``torch.cuda`` by default), so the
tests' TensorRT emulator runs this exact code on CPU with deferred execution.

No CUDA graphs: at the sizes HMS runs (one launch per part and step) a graph would save
a few microseconds of launch per call but needs a static output set per N plus a copy
to keep the engine contract's output lifetime.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hms_deploy.dtypes import TORCH_DTYPES
from hms_deploy.errors import BackendUnavailable, EngineError
from hms_deploy.parts import PART_NAMES, PartSpec
from hms_deploy.runtime.trt_plan import (
    DEFAULT_MAX_BATCH,
    check_plan_compatible,
    plan_error,
    plan_remedy,
)

from ..bindings import OutputBuffers, bindable, torch_dtype_from_trt
from ..engine import Engine
from ..plan_cache import PlanBuilder, build_missing_plans
from ..streams import CUDA, DeviceStreams, Stream, ordered

if TYPE_CHECKING:
    import tensorrt as trt

    from hms_deploy.runtime.manifest import Manifest

TRT_INSTALL = "pip install tensorrt (NVIDIA's index) on a machine with an NVIDIA GPU"
TRT_MISSING = f"TensorRT is not installed: {TRT_INSTALL}"


_LOGGER: trt.Logger | None = None  # one logger per process (TensorRT warns about a second one)


def require_tensorrt() -> str:
    """The TensorRT version (>= 10), or :class:`BackendUnavailable` with the install hint.

    The one check for both the runtime and the export's plan builder. ``tensorrt-stubs``
    (type stubs) and NVIDIA's PyPI placeholder both make ``import tensorrt`` succeed
    without a runtime: those count as not installed.
    """
    try:
        import tensorrt
    except ImportError:
        raise BackendUnavailable(TRT_MISSING) from None
    version = getattr(tensorrt, "__version__", None)
    if not hasattr(tensorrt, "Runtime") or not isinstance(version, str):
        raise BackendUnavailable(TRT_MISSING)
    major = version.split(".")[0]
    if not major.isdigit() or int(major) < 10:
        raise BackendUnavailable(f"TensorRT {version} is too old (10 or newer needed): {TRT_INSTALL}")
    return version


def require_cuda(device: torch.device) -> torch.device:
    """``device`` with its index, or :class:`BackendUnavailable` if it is not a usable GPU."""
    if device.type != "cuda":
        raise BackendUnavailable(f"TensorRT runs on an NVIDIA GPU; got device {device}, expected "
                                 "cuda", setting="device", value=str(device), expected="cuda")
    if not torch.cuda.is_available():
        raise BackendUnavailable("TensorRT needs CUDA, but torch sees no CUDA device")
    return torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)


def trt_logger() -> trt.Logger:
    """The process's one ``trt.Logger`` (plan builds and engines share it)."""
    global _LOGGER
    import tensorrt as trt

    if _LOGGER is None:
        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


def _dims(d: trt.Dims) -> tuple[int, ...]:
    return tuple(int(d[i]) for i in range(len(d)))


class TrtEngine(Engine):
    """One part as a TensorRT plan; the context and buffers live between enter and exit."""

    backend = "trt"

    def __init__(
        self,
        spec: PartSpec,
        plan_path: str | os.PathLike[str],
        device: torch.device,
        *,
        stream: Stream,
        streams: DeviceStreams = CUDA,
        export_dir: str | os.PathLike[str] | None = None,
    ):
        super().__init__(spec, device)
        self.path = Path(plan_path)
        self.stream = stream
        self.streams = streams
        self.export_dir = export_dir
        self._runtime: trt.Runtime | None = None
        self._engine: trt.ICudaEngine | None = None
        self._context: trt.IExecutionContext | None = None
        self._in_dtypes: dict[str, torch.dtype] = {}
        self._out_dtypes: dict[str, torch.dtype] = {}
        self._max_batch = 0
        self._buffers: OutputBuffers | None = None
        self._n: int | None = None  # batch size whose input shapes are set on the context
        self._out_shapes: dict[int, dict[str, tuple[int, ...]]] = {}
        self._addresses: dict[str, int] = {}  # last address bound per tensor
        self._held: list[torch.Tensor] = []  # inputs of the last launch (kept until the next one)
        self._casts: list[tuple[str, torch.dtype]] = []  # outputs whose plan dtype differs from the spec

    @property
    def max_batch(self) -> int:
        """Largest N of the plan's optimisation profile (0 before open); larger batches run
        in chunks of it."""
        return self._max_batch

    # ------------------------------------------------------------------ lifecycle

    def open(self) -> None:
        require_tensorrt()
        import tensorrt as trt

        if self.streams.cuda:
            self.device = require_cuda(self.device)
        if not self.path.is_file():
            raise plan_error(f"{self.name}: TensorRT plan {self.path} not found; ", self.export_dir)
        runtime = trt.Runtime(trt_logger())
        with self.streams.guard(self.device):
            engine: trt.ICudaEngine | None = runtime.deserialize_cuda_engine(self.path.read_bytes())
            if engine is None:
                raise plan_error(
                    f"{self.name}: TensorRT {trt.__version__} cannot load {self.path.name} (built by "
                    f"another TensorRT version or for another GPU?): ", self.export_dir)
            context: trt.IExecutionContext | None = engine.create_execution_context()
            if context is None:
                raise EngineError(f"{self.name}: TensorRT could not create an execution context (out of GPU memory?)")
        self._in_dtypes, self._out_dtypes = self._read_io(engine)
        self._casts = [
            (t.name, TORCH_DTYPES[t.dtype]) for t in self.spec.outputs
            if self._out_dtypes[t.name] != TORCH_DTYPES[t.dtype]
        ]
        first = self.spec.inputs[0].name
        self._max_batch = _dims(engine.get_tensor_profile_shape(first, 0)[2])[0]
        self._runtime, self._engine, self._context = runtime, engine, context
        self._buffers = OutputBuffers(self.name, self._out_dtypes, self.device)

    def _read_io(self, engine: trt.ICudaEngine) -> tuple[dict[str, torch.dtype], dict[str, torch.dtype]]:
        """The plan's I/O checked against the part spec; dtypes by name, in spec order."""
        import tensorrt as trt

        found: dict[str, tuple[bool, torch.dtype, tuple[int, ...]]] = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            where = f"{self.name}: {'input' if is_input else 'output'} '{name}' of {self.path.name}"
            dtype = torch_dtype_from_trt(engine.get_tensor_dtype(name).name, where=where)
            found[name] = (is_input, dtype, _dims(engine.get_tensor_shape(name)))
        want_in, want_out = self.spec.input_names, self.spec.output_names
        got_in = [n for n, v in found.items() if v[0]]
        got_out = [n for n, v in found.items() if not v[0]]
        if sorted(got_in) != sorted(want_in) or sorted(got_out) != sorted(want_out):
            raise plan_error(
                f"{self.name}: plan {self.path.name} has inputs {got_in} and outputs {got_out}, "
                f"expected {want_in} and {want_out}: ", self.export_dir)
        ins: dict[str, torch.dtype] = {}
        outs: dict[str, torch.dtype] = {}
        for t in (*self.spec.inputs, *self.spec.outputs):
            is_input, dtype, shape = found[t.name]
            kind = "input" if is_input else "output"
            if len(shape) != len(t.shape) + 1 or shape[1:] != t.shape:
                raise plan_error(
                    f"{self.name}: {kind} '{t.name}' of {self.path.name} has shape {shape}, "
                    f"expected {t.describe()}: ", self.export_dir)
            want = TORCH_DTYPES[t.dtype]
            # other float precision at the I/O is bridged by a cast; anything else is wrong
            if dtype != want and not (dtype.is_floating_point and want.is_floating_point) and not (
                t.dtype == "int64" and dtype == torch.int32
            ):
                raise EngineError(f"{self.name}: {kind} '{t.name}' of {self.path.name} has dtype {dtype}, expected {want}")
            (ins if is_input else outs)[t.name] = dtype
        return ins, outs

    def close(self) -> None:
        if self._context is not None:
            self.stream.synchronize()  # nothing may still read or write what is freed below
        self._held = []
        self._addresses = {}
        self._out_shapes = {}
        self._n = None
        if self._buffers is not None:
            self._buffers.clear()
        self._buffers = None
        self._context = None  # context before engine before runtime
        self._engine = None
        self._runtime = None

    # ------------------------------------------------------------------ running

    def _set_batch(self, n: int) -> dict[str, tuple[int, ...]]:
        """Set every input shape for batch ``n`` on the context; the output shapes at ``n``."""
        ctx = self._context
        assert ctx is not None and 0 < n <= self._max_batch  # open; run() chunks larger batches
        if self._n != n:
            for t in self.spec.inputs:
                if not ctx.set_input_shape(t.name, t.with_batch(n)):
                    raise EngineError(f"{self.name}: TensorRT refused input '{t.name}' shape {t.with_batch(n)}")
            self._n = n
        shapes = self._out_shapes.get(n)
        if shapes is None:
            shapes = {t.name: _dims(ctx.get_tensor_shape(t.name)) for t in self.spec.outputs}
            for t in self.spec.outputs:
                if shapes[t.name] != t.with_batch(n):
                    raise EngineError(
                        f"{self.name}: plan gives output '{t.name}' shape {shapes[t.name]} at N={n}, "
                        f"expected {t.with_batch(n)}"
                    )
            self._out_shapes[n] = shapes
        return shapes

    def _bind(self, name: str, x: torch.Tensor) -> None:
        ptr = x.data_ptr()
        if self._addresses.get(name) != ptr:
            assert self._context is not None
            if not self._context.set_tensor_address(name, ptr):
                raise EngineError(f"{self.name}: TensorRT refused the address of '{name}'")
            self._addresses[name] = ptr

    def _launch(self) -> None:
        assert self._context is not None
        if not self._context.execute_async_v3(self.stream.cuda_stream):
            raise EngineError(f"{self.name}: TensorRT execute_async_v3 failed (see the TensorRT log above)")

    def run(self, inputs: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
        assert self._buffers is not None  # open
        held = [
            bindable(self.name, name, inputs[name], device=self.device, dtype=dtype)
            for name, dtype in self._in_dtypes.items()
        ]
        with self._ordered() as stream:
            out = self._run_eager(held, n, stream)
            # not reused by the allocator before the stream is past here
            self.streams.record(held, stream)
            self._held = held
        return self._as_spec(dict(out))

    def _run_eager(self, held: list[torch.Tensor], n: int, stream: Stream) -> dict[str, torch.Tensor]:
        """Launch on the stream; batches above the plan's maximum run in chunks of it, each
        chunk reading and writing contiguous row slices of the same tensors (no copies)."""
        assert self._buffers is not None  # open
        step = min(n, self._max_batch)
        allocated = self._buffers.allocations
        outs = self._buffers.get(
            {t.name: t.with_batch(n) for t in self.spec.outputs}, avoid=held
        )
        if self._buffers.allocations != allocated:  # freed only after the stream passed its last use
            self.streams.record(outs.values(), stream)
        for start in range(0, n, step):
            stop = min(n, start + step)
            self._set_batch(stop - start)
            whole = stop - start == n
            for name, x in zip(self._in_dtypes, held):
                self._bind(name, x if whole else x[start:stop])
            for name, y in outs.items():
                self._bind(name, y if whole else y[start:stop])
            self._launch()
        return outs

    def _ordered(self) -> AbstractContextManager[Stream]:
        """Order the engines' stream after the caller's current stream, and back."""
        return ordered(self.streams, self.stream, self.device)

    def _as_spec(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Outputs in the spec's dtypes (a plan with INT32 indices or fp16 outputs is cast)."""
        for name, want in self._casts:
            out[name] = out[name].to(want)
        return out

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(file=str(self.path), max_batch=self._max_batch)
        return d


# ---------------------------------------------------------------------------- the set


def trt_engines(
    manifest: Manifest,
    device: torch.device,
    *,
    max_batch: int = DEFAULT_MAX_BATCH,
    stream: Stream | None = None,
    streams: DeviceStreams = CUDA,
    build_plans: PlanBuilder | None = None,
) -> dict[str, Engine]:
    """The nine parts of an export as TensorRT engines (plans load on ``__enter__``).

    Plans listed in the manifest are checked against this machine (TensorRT version, GPU
    compute capability, source ONNX hash) first: a mismatch raises :class:`EngineError`
    with the rebuild command. If the export has no plans at all and ``build_plans`` is
    given (the export package's ``add_trt_plans``, handed down by
    ``hms-run`` or the caller: the runtime does not import the export layer), they are
    built once from its ONNX files (``max_batch``: the profile's largest N) and
    cached in the export dir, the manifest updated atomically (under a file lock, so
    concurrent runs build once); ``manifest`` is refreshed in place.

    ``stream``: the caller-owned, non-default CUDA stream all nine engines run on
    (default: a new one). ``streams``: how streams are made and ordered (``torch.cuda``;
    the tests' TensorRT emulator passes its own, see :mod:`hms_deploy.runtime.streams`).
    """
    version = require_tensorrt()
    if streams.cuda:
        device = require_cuda(device)
    if stream is None:
        stream = streams.new_stream(device)
    if stream.cuda_stream == 0:
        raise EngineError("TensorRT engines need a non-default CUDA stream (the default one adds device syncs)")
    if not any("trt" in manifest.parts[name].files for name in PART_NAMES):
        if build_plans is None:
            raise plan_error(f"{manifest.dir}: the export has no TensorRT plans: ", manifest.dir)
        build_missing_plans(manifest, device, max_batch, build_plans)
    cc, gpu = streams.gpu(device)
    problems = [
        p for name in PART_NAMES
        if (p := check_plan_compatible(
            manifest.parts[name], version, cc, gpu_name=gpu, export_dir=manifest.dir)) is not None
    ]
    if problems:
        more = f" (and {len(problems) - 1} more parts)" if len(problems) > 1 else ""
        raise EngineError(problems[0] + more, remedy=plan_remedy(manifest.dir))
    specs = {name: manifest.parts[name].spec for name in PART_NAMES}
    return {
        name: TrtEngine(
            specs[name], manifest.path(name, "trt"), device, stream=stream, streams=streams,
            export_dir=manifest.dir,
        )
        for name in PART_NAMES
    }
