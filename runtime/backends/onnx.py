"""The ONNX Runtime backend: one ``InferenceSession`` per part, on CPU or CUDA.

``onnxruntime`` is imported when an engine opens, never when this module (or
``hms_deploy``) is imported. CPU and GPU builds install the same module, so a missing
provider is reported with what to install instead.

CPU
    Inputs go in as numpy views of the (contiguous) torch tensors and outputs come back
    as ``torch.from_numpy`` views of the arrays ONNX Runtime allocated: no copies. This
    is faster on the small parts than binding preallocated outputs with an IOBinding
    (tiny model, 2 threads: ~9-35 us per call vs ~11-53 us; the per-call binding costs
    more than the allocation it saves), so outputs are fresh arrays on every call.
    ``iobinding=True`` binds preallocated, reused outputs on CPU too: the GPU backends'
    output lifetime (valid until the next call with the same N), for testing callers
    on a machine without a GPU.

CUDA (``onnxruntime-gpu``)
    Torch CUDA tensors are bound by pointer with an IOBinding; outputs are preallocated
    per (part, N) (:class:`~hms_deploy.runtime.bindings.OutputBuffers`) and bound by
    pointer too. Every session runs on the caller's non-default torch stream
    (``user_compute_stream``) and does not synchronise at the end of a run. The TensorRT
    execution provider is optional (``providers=("tensorrt", "cuda")``): engines are
    cached inside the export dir and built for one batch range (``max_batch``) given as
    min/opt/max shapes for every input, so changing N never rebuilds them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast

import torch

from hms_deploy.dtypes import TORCH_DTYPES
from hms_deploy.errors import BackendUnavailable, EngineError, first_line
from hms_deploy.parts import PART_NAMES, PartSpec, part_specs

from ..bindings import (
    OutputBuffers,
    bindable,
    new_stream,
    numpy_dtype,
    torch_dtype_from_ort,
)
from ..engine import Engine, output_shapes
from ..streams import CUDA, ordered
from ..trt_plan import DEFAULT_MAX_BATCH

if TYPE_CHECKING:
    from hms_deploy.runtime.manifest import Manifest

GPU_INSTALL_HINT = "pip uninstall -y onnxruntime && pip install onnxruntime-gpu"
# onnxruntime-gpu's TensorRT provider links TensorRT 10 (libnvinfer.so.10); a plain
# `pip install tensorrt` brings TensorRT 11 (libnvinfer.so.11), which it cannot load
TRT_EP_HINT = (
    "ONNX Runtime's TensorRT provider needs TensorRT 10's libraries (libnvinfer.so.10) next to "
    "onnxruntime-gpu: pip install 'tensorrt>=10,<11' (NVIDIA's index); `pip install tensorrt` "
    "brings TensorRT 11, which this provider cannot load (TensorRT 11 plans: engine trt)"
)

CPU_EP = "CPUExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"
TRT_EP = "TensorrtExecutionProvider"
PROVIDER_ALIASES = {
    "cpu": CPU_EP,
    "cuda": CUDA_EP,
    "tensorrt": TRT_EP,
    "trt": TRT_EP,
}

# TensorRT EP profile: N in [1, DEFAULT_MAX_BATCH] (the TensorRT plans' one maximum, trt_plan);
# larger N rebuilds


def import_onnxruntime() -> ModuleType:
    """``import onnxruntime`` or :class:`BackendUnavailable` saying what to install."""
    try:
        import onnxruntime
    except ImportError as e:
        raise BackendUnavailable(
            f"ONNX Runtime is not installed ({e}): pip install onnxruntime (CPU), "
            "or onnxruntime-gpu for CUDA"
        ) from None
    return cast(ModuleType, onnxruntime)


def default_threads() -> int:
    """All cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def part_threads(threads: int | Mapping[str, int] | None) -> dict[str, int]:
    """Intra-op threads per part name from ``threads`` (an int for every part, a mapping
    for some, None for none); parts absent from the result use :func:`default_threads`.

    Raises :class:`EngineError` for an unknown part name or a count < 1.
    """
    if threads is None:
        return {}
    if isinstance(threads, Mapping):
        unknown = sorted(set(threads) - set(PART_NAMES))
        if unknown:
            raise EngineError(f"threads: unknown parts {unknown}, expected some of {list(PART_NAMES)}")
        given = dict(threads)
    else:
        given = dict.fromkeys(PART_NAMES, threads)
    bad = {k: v for k, v in given.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1}
    if bad:
        raise EngineError(f"threads must be integers >= 1, got {bad}")
    return given


def resolve_providers(providers: Sequence[str] | None, device: torch.device) -> list[str]:
    """Provider names (aliases ``cpu``, ``cuda``, ``tensorrt`` allowed) in priority order.

    Default: CPU for a CPU device, CUDA (CPU fallback for nodes CUDA lacks) for CUDA.
    """
    if providers is None:
        names = [CPU_EP] if device.type == "cpu" else [CUDA_EP]
    else:
        names = [PROVIDER_ALIASES.get(p.lower(), p) for p in providers]
    gpu = [p for p in names if p in (CUDA_EP, TRT_EP)]
    if device.type == "cpu" and gpu:
        raise EngineError(f"providers {gpu} need a CUDA device, but the engines run on cpu")
    if device.type == "cuda":
        if not gpu:
            raise EngineError(
                f"device {device} needs a GPU provider (cuda or tensorrt), got providers {names}"
            )
        if TRT_EP in names and CUDA_EP not in names:
            names.insert(names.index(TRT_EP) + 1, CUDA_EP)  # the TensorRT EP's fallback
    if CPU_EP not in names:
        names.append(CPU_EP)
    return names


def check_available(ort: ModuleType, providers: Sequence[str]) -> None:
    """:class:`BackendUnavailable` naming the missing providers and the package to install."""
    available = list(ort.get_available_providers())
    missing = [p for p in providers if p not in available]
    if not missing:
        return
    if CUDA_EP in missing or TRT_EP in missing:
        hint = (
            f"this onnxruntime ({ort.__version__}) is the CPU build; for CUDA install the GPU "
            f"build: {GPU_INSTALL_HINT}"
        )
        if CUDA_EP not in missing:  # GPU build without TensorRT libraries
            hint = TRT_EP_HINT
    else:
        hint = "install an onnxruntime build that has them"
    raise BackendUnavailable(
        f"ONNX Runtime has no {', '.join(missing)} (available: {', '.join(available)}); {hint}",
        setting="engine" if hint is TRT_EP_HINT else None,
    )


def trt_profile_options(spec: PartSpec, max_batch: int) -> dict[str, str]:
    """TensorRT EP ``trt_profile_{min,opt,max}_shapes`` for every input of a part.

    The same profile as the export's TensorRT plans (:func:`hms_deploy.runtime.trt_plan.
    profile_shapes`: N from 1 to ``max_batch``, tuned for the middle), e.g.
    ``"x_a:1x32,h:1x32,c:1x32"``, so a new N never triggers an engine rebuild.
    """
    from hms_deploy.runtime.trt_plan import profile_shapes

    ranges = profile_shapes(spec, max_batch)
    return {
        f"trt_profile_{kind}_shapes": ",".join(
            f"{name}:{'x'.join(map(str, shapes[i]))}" for name, shapes in ranges.items()
        )
        for i, kind in enumerate(("min", "opt", "max"))
    }


class OnnxEngine(Engine):
    """One part as an ONNX Runtime session (created in ``open``, dropped in ``close``)."""

    backend = "onnx"

    def __init__(
        self,
        spec: PartSpec,
        onnx_path: str | os.PathLike[str],
        device: torch.device,
        *,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        stream: torch.cuda.Stream | None = None,
        trt_fp16: bool = False,
        trt_cache_dir: str | os.PathLike[str] | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        iobinding: bool | None = None,
    ):
        super().__init__(spec, device)
        self.iobinding = device.type == "cuda" if iobinding is None else iobinding
        if device.type == "cuda" and not self.iobinding:
            raise EngineError(f"{spec.name}: CUDA engines bind torch tensors; iobinding=False is CPU only")
        self.path = Path(onnx_path)
        self.providers = resolve_providers(providers, device)
        self.threads = threads
        self.stream = stream
        self.trt_fp16 = trt_fp16
        self.trt_cache_dir = Path(trt_cache_dir) if trt_cache_dir is not None else None
        self.max_batch = max_batch
        self._session: Any = None
        self._run_options: Any = None
        self._in_dtypes: dict[str, torch.dtype] = {}
        self._out_dtypes: dict[str, torch.dtype] = {}
        self._buffers: OutputBuffers | None = None
        self._io: Any = None  # IOBinding (CUDA)
        self._np_dtypes: dict[str, Any] = {}  # element types to bind, inputs and outputs (CUDA)
        self._held: list[torch.Tensor] = []  # inputs the device may still read (CUDA)
        self._out_names: list[str] = []
        self._casts: list[tuple[str, torch.dtype]] = []  # outputs whose graph dtype differs

    # ------------------------------------------------------------------ lifecycle

    def _provider_options(self) -> list[dict[str, str]]:
        opts: list[dict[str, str]] = []
        for p in self.providers:
            if p == CPU_EP:
                opts.append({})
                continue
            assert self.stream is not None and self.device.index is not None  # set by open()
            o = {
                "device_id": str(self.device.index),
                "has_user_compute_stream": "1",
                "user_compute_stream": str(self.stream.cuda_stream),
            }
            if p == TRT_EP:
                cache = self.trt_cache_dir or self.path.parent / "ort_trt_cache"
                cache.mkdir(parents=True, exist_ok=True)
                o.update(
                    trt_fp16_enable="1" if self.trt_fp16 else "0",
                    trt_engine_cache_enable="1",
                    trt_engine_cache_path=str(cache),
                    trt_timing_cache_enable="1",
                    trt_timing_cache_path=str(cache),
                    **trt_profile_options(self.spec, self.max_batch),
                )
            opts.append(o)
        return opts

    def open(self) -> None:
        ort = import_onnxruntime()
        check_available(ort, self.providers)
        if not self.path.is_file():
            raise EngineError(f"{self.name}: ONNX file {self.path} not found")
        if self.device.type == "cuda":
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            if self.stream is None:
                self.stream = new_stream(self.device)
            if self.stream.cuda_stream == 0:
                raise EngineError(
                    f"{self.name}: ONNX Runtime treats the default CUDA stream as 'no stream'; "
                    "pass a non-default torch.cuda.Stream"
                )
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads or default_threads()
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3  # errors only: node placement notices are not ours to fix
        # Spinning pool threads steal the cores that decoding (PyAV) needs between calls.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            session = ort.InferenceSession(
                str(self.path), sess_options=so, providers=self.providers,
                provider_options=self._provider_options(),
            )
        except Exception as e:  # noqa: BLE001 - ORT raises its own pybind exception types
            raise EngineError(f"{self.name}: ONNX Runtime cannot load {self.path}: {first_line(e, typed=False)}") from None
        got = [p for p in self.providers if p != CPU_EP and p not in session.get_providers()]
        if got:
            raise BackendUnavailable(
                f"{self.name}: ONNX Runtime could not start {', '.join(got)} (session runs on "
                f"{session.get_providers()}); check the CUDA/cuDNN libraries that onnxruntime-gpu "
                "needs (python -c 'import onnxruntime; onnxruntime.preload_dlls()')"
            )
        self._in_dtypes = self._check_io(session.get_inputs(), self.spec.inputs, "input")
        self._out_dtypes = self._check_io(session.get_outputs(), self.spec.outputs, "output")
        self._out_names = self.spec.output_names
        self._casts = [
            (t.name, TORCH_DTYPES[t.dtype]) for t in self.spec.outputs
            if self._out_dtypes[t.name] != TORCH_DTYPES[t.dtype]
        ]
        self._session = session
        if self.iobinding:
            run_options = ort.RunOptions()
            if self.device.type == "cuda":
                # enqueue on the caller's stream and return; readers order on that stream
                run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
            self._run_options = run_options
            self._buffers = OutputBuffers(self.name, self._out_dtypes, self.device)
            self._io = session.io_binding()
            self._np_dtypes = {
                name: numpy_dtype(dtype, where=f"{self.name}: '{name}'")
                for name, dtype in (*self._in_dtypes.items(), *self._out_dtypes.items())
            }

    def _check_io(self, args: Sequence[Any], specs: Sequence[Any], kind: str) -> dict[str, torch.dtype]:
        """Session I/O against the part spec: names, per-sample shapes; returns dtypes by name."""
        by_name = {a.name: a for a in args}
        want = [t.name for t in specs]
        if sorted(by_name) != sorted(want):
            raise EngineError(
                f"{self.name}: {self.path.name} has {kind}s {sorted(by_name)}, expected {want}"
            )
        dtypes: dict[str, torch.dtype] = {}
        for t in specs:
            a = by_name[t.name]
            where = f"{self.name}: {kind} '{t.name}' of {self.path.name}"
            dims = list(a.shape)
            per_sample = dims[1:]
            if len(dims) != len(t.shape) + 1 or any(
                isinstance(d, int) and d != w for d, w in zip(per_sample, t.shape)
            ):
                raise EngineError(f"{where} has shape {dims}, expected {t.describe()}")
            dtype = torch_dtype_from_ort(a.type, where=where)
            if dtype != TORCH_DTYPES[t.dtype] and not (dtype.is_floating_point and t.dtype.startswith("float")):
                raise EngineError(f"{where} has dtype {dtype}, expected {t.dtype}")
            dtypes[t.name] = dtype
        return dtypes

    def close(self) -> None:
        if self._session is not None and self.device.type == "cuda" and self.stream is not None:
            self.stream.synchronize()  # kernels still queued may use the session's memory
        self._session = None
        self._run_options = None
        self._held = []
        self._io = None
        if self._buffers is not None:
            self._buffers.clear()
        self._buffers = None

    # ------------------------------------------------------------------ running

    def run(self, inputs: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
        out = self._run_bound(inputs, n) if self.iobinding else self._run_cpu(inputs)
        for name, want in self._casts:  # a graph with other output precision: the spec's dtype
            out[name] = out[name].to(want)
        return out

    def _run_cpu(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        feeds = {}
        for name, dtype in self._in_dtypes.items():
            x = inputs[name]
            if x.dtype != dtype or not x.is_contiguous():
                x = bindable(self.name, name, x, device=self.device, dtype=dtype)
            # a view of the tensor's memory; held by ``inputs`` until run() returns
            feeds[name] = x.detach().numpy() if x.requires_grad else x.numpy()
        try:
            arrays = self._session.run(self._out_names, feeds)
        except Exception as e:  # noqa: BLE001
            raise EngineError(f"{self.name}: ONNX Runtime failed: {first_line(e, typed=False)}") from None
        return dict(zip(self._out_names, map(torch.from_numpy, arrays)))

    def _run_bound(self, inputs: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
        assert self._buffers is not None  # set by open()
        kind = self.device.type
        dev_id = self.device.index or 0
        held = [
            bindable(self.name, name, inputs[name], device=self.device, dtype=dtype)
            for name, dtype in self._in_dtypes.items()
        ]
        shapes = output_shapes(self.spec, n)
        outs = self._buffers.get(shapes, avoid=held)
        io, np_dtypes = self._io, self._np_dtypes
        for name, x in zip(self._in_dtypes, held):
            io.bind_input(name, kind, dev_id, np_dtypes[name], tuple(x.shape), x.data_ptr())
        for name, y in outs.items():
            io.bind_output(name, kind, dev_id, np_dtypes[name], tuple(y.shape), y.data_ptr())
        if kind != "cuda":
            self._run_iobinding(io)
            return dict(outs)
        stream = self.stream
        assert stream is not None  # set by open()
        with ordered(CUDA, stream, self.device):
            self._run_iobinding(io)
            CUDA.record(held, stream)  # the allocator keeps them until the stream is past this run
        self._held = held
        return dict(outs)

    def _run_iobinding(self, io: Any) -> None:
        try:
            self._session.run_with_iobinding(io, self._run_options)
        except Exception as e:  # noqa: BLE001
            raise EngineError(f"{self.name}: ONNX Runtime failed: {first_line(e, typed=False)}") from None

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(file=str(self.path), providers=list(self.providers))
        return d


def onnx_engines(
    manifest: Manifest,
    device: torch.device,
    *,
    providers: Sequence[str] | None = None,
    threads: int | Mapping[str, int] | None = None,
    stream: torch.cuda.Stream | None = None,
    trt_fp16: bool = False,
    max_batch: int = DEFAULT_MAX_BATCH,
    iobinding: bool | None = None,
) -> dict[str, Engine]:
    """The nine parts of an export as ONNX Runtime engines (sessions open on ``__enter__``).

    ``providers``: ONNX Runtime provider names or aliases (``cpu``, ``cuda``,
    ``tensorrt``); default CPU on a CPU device, CUDA on a CUDA device. ``threads``:
    intra-op threads per session (default: all cores), or a mapping part name -> threads
    (parts it does not name get all cores; see :func:`part_threads`). ``stream``: the non-default torch
    CUDA stream all nine sessions run on (default: a new one, shared). ``trt_fp16`` and
    ``max_batch`` configure the TensorRT execution provider (engine cache in
    ``<export dir>/ort_trt_cache``). ``iobinding``: bind preallocated outputs (always
    on CUDA; on CPU it gives the GPU's output lifetime, for tests).
    """
    names = resolve_providers(providers, device)  # bad combinations fail here, not on open
    if device.type == "cuda":
        check_available(import_onnxruntime(), names)  # the install hint before any CUDA call
        if stream is None:
            stream = new_stream(device)
    specs = part_specs(manifest.config)
    per_part = part_threads(threads)
    engines: dict[str, Engine] = {}
    for name in PART_NAMES:
        path = manifest.path(name, "onnx")
        engines[name] = OnnxEngine(
            specs[name], path, device, providers=providers, threads=per_part.get(name),
            stream=stream,
            trt_fp16=trt_fp16, trt_cache_dir=path.parent / "ort_trt_cache", max_batch=max_batch,
            iobinding=iobinding,
        )
    return engines
