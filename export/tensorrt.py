"""Build (and check) TensorRT plans from the exported ONNX parts.

Written against the TensorRT 10 and 11 Python API (names that exist in both; see
docs/tensorrt.md §1): no ``EXPLICIT_BATCH`` (flags 0), no implicit INT8, and the precision
flags that 11 removed are only touched behind ``hasattr``. fp16 comes from the ONNX
file (``hms-export --precision fp16`` converts it with fp32 I/O) and is built as a
strongly typed network, which TensorRT 11 requires and 10.x supports.

One plan per part, ``<part>.plan``, each with one optimisation profile over batch
1..max_batch for every input, a workspace limit, and a timing cache file in the export
directory (``trt_timing.cache``) reused across parts and rebuilds; a cache TensorRT
rejects (made on another GPU) is dropped with a warning and replaced. The manifest
records, per plan, the TensorRT version, the GPU name and compute capability, flags
(``strongly_typed`` as the builder applied it: always on TensorRT 11), profile ranges and
the sha256 of the ONNX file it was built from (:mod:`.trt_plan`). All builds share the
process's one ``trt.Logger`` (the runtime backend's).

``import tensorrt`` happens only inside these functions, after the runtime's
:func:`~hms_deploy.runtime.backends.trt.require_tensorrt` (the one check: TensorRT >= 10,
not only ``tensorrt-stubs``), which raises :class:`~hms_deploy.errors.BackendUnavailable`
with an install hint.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from hms_deploy.config import HMSConfig
from hms_deploy.errors import BackendUnavailable, ExportError
from hms_deploy.outputs import replace_atomically
from hms_deploy.parts import PART_NAMES, PartSpec, part_specs
from hms_deploy.runtime import manifest as mf
from hms_deploy.runtime.backends.trt import require_tensorrt
from hms_deploy.runtime.streams import CUDA
from hms_deploy.runtime.trt_plan import (
    DEFAULT_MAX_BATCH,
    DEFAULT_WORKSPACE_BYTES,
    PLAN_SUFFIX,
    TIMING_CACHE_NAME,
    default_opt_batch,
    plan_metadata,
    profile_shapes,
    trt_dtype_name,
)

if TYPE_CHECKING:
    import tensorrt as trt

def gpu_info() -> tuple[tuple[int, int], str]:
    """(compute capability, name) of the current CUDA device (the runtime's
    :meth:`~hms_deploy.runtime.streams.DeviceStreams.gpu`), or :class:`BackendUnavailable`."""
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailable("TensorRT needs a CUDA GPU, and torch sees none (torch.cuda.is_available() is False)")
    return CUDA.gpu(torch.device("cuda", torch.cuda.current_device()))


def check_available() -> dict[str, Any]:
    """TensorRT version, GPU name and compute capability; :class:`BackendUnavailable` if absent."""
    version = require_tensorrt()
    cc, name = gpu_info()
    return {"tensorrt": version, "gpu": name, "compute_capability": f"{cc[0]}.{cc[1]}"}


@dataclass(frozen=True)
class BuildOptions:
    max_batch: int = DEFAULT_MAX_BATCH
    opt_batch: int | None = None
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES
    precision: str = "fp32"


def _parser_errors(parser: trt.OnnxParser) -> str:
    lines = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        lines.append(f"{err.node_name() or '?'} ({err.node_operator() or '?'}): {err.desc()}")
    return "; ".join(lines) or "no details"


def is_strongly_typed(trt_mod: ModuleType, net_flags: int) -> bool:
    """What the builder does with ``net_flags``: TensorRT >= 11 ignores the flag and types
    every network strongly; 10.x does so only when asked."""
    major = int(str(trt_mod.__version__).split(".")[0])
    return major >= 11 or bool(net_flags & (1 << int(trt_mod.NetworkDefinitionCreationFlag.STRONGLY_TYPED)))


def _use_timing_cache(config: trt.IBuilderConfig, path: Path | None) -> None:
    """Give the build the timing cache at ``path`` (if any); a cache TensorRT rejects (made
    on another GPU or by another TensorRT) is dropped with a warning for an empty one."""
    old = path.read_bytes() if path is not None and path.is_file() else b""
    if config.set_timing_cache(config.create_timing_cache(old), False):
        return
    if old:
        warnings.warn(f"TensorRT rejected the timing cache {path} (made on another GPU or by "
                      "another TensorRT version); building without it and replacing it",
                      RuntimeWarning, stacklevel=3)
    if not config.set_timing_cache(config.create_timing_cache(b""), False):
        raise ExportError("TensorRT refused an empty timing cache")


def _save_timing_cache(config: trt.IBuilderConfig, path: Path) -> None:
    cache = config.get_timing_cache()
    if cache is None:  # nothing usable to keep (TensorRT returns None after a rejected cache)
        warnings.warn(f"TensorRT returned no timing cache to save to {path}", RuntimeWarning, stacklevel=3)
        return
    replace_atomically(path, memoryview(cache.serialize()))


def build_plan(
    onnx_path: Path,
    spec: PartSpec,
    plan_path: Path,
    options: BuildOptions,
    *,
    onnx_sha256: str,
    timing_cache: Path | None = None,
) -> dict[str, Any]:
    """Build one plan from ``onnx_path``; returns its manifest metadata (:func:`plan_metadata`).

    Raises :class:`ExportError` naming the part with the parser's errors, or when the
    build fails; :class:`BackendUnavailable` without TensorRT or a GPU.
    """
    require_tensorrt()
    import tensorrt as trt_mod

    from hms_deploy.runtime.backends.trt import trt_logger

    cc, gpu_name = gpu_info()
    logger = trt_logger()  # one per process
    builder = trt_mod.Builder(logger)
    st_flag = int(trt_mod.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    net_flags = 1 << st_flag if options.precision == "fp16" else 0
    network = builder.create_network(net_flags)
    parser = trt_mod.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise ExportError(f"{spec.name}: TensorRT cannot parse {onnx_path.name}: {_parser_errors(parser)}")
    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    if inputs != spec.input_names:
        raise ExportError(f"{spec.name}: TensorRT network inputs {inputs}, expected {spec.input_names}")
    strongly_typed = is_strongly_typed(trt_mod, net_flags)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt_mod.MemoryPoolType.WORKSPACE, int(options.workspace_bytes))
    flags: list[str] = []
    if strongly_typed:
        flags.append("STRONGLY_TYPED")
    if options.precision != "fp16":
        # fp32 parity: TF32 (on by default) rounds matmul/conv inputs to 10 bits
        tf32 = getattr(trt_mod.BuilderFlag, "TF32", None)
        if tf32 is not None:
            config.clear_flag(tf32)
            flags.append("no TF32")
    opt = options.opt_batch or default_opt_batch(options.max_batch)
    profile = builder.create_optimization_profile()
    for name, (lo, mid, hi) in profile_shapes(spec, options.max_batch, opt).items():
        profile.set_shape(name, trt_mod.Dims(list(lo)), trt_mod.Dims(list(mid)), trt_mod.Dims(list(hi)))
    config.add_optimization_profile(profile)
    _use_timing_cache(config, timing_cache)

    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"{spec.name}: TensorRT build failed (see the TensorRT log above)")
    seconds = time.perf_counter() - t0
    replace_atomically(plan_path, memoryview(serialized))
    if timing_cache is not None:
        _save_timing_cache(config, timing_cache)
    io_dtypes = {network.get_input(i).name: trt_dtype_name(network.get_input(i).dtype)
                 for i in range(network.num_inputs)}
    io_dtypes.update({network.get_output(i).name: trt_dtype_name(network.get_output(i).dtype)
                      for i in range(network.num_outputs)})
    meta: dict[str, Any] = plan_metadata(
        spec=spec, plan_file=plan_path.name, onnx_sha256=onnx_sha256,
        tensorrt_version=str(trt_mod.__version__), gpu_name=gpu_name, compute_capability=cc,
        max_batch=options.max_batch, opt_batch=opt, workspace_bytes=options.workspace_bytes,
        precision=options.precision, flags=flags, strongly_typed=strongly_typed,
        build_seconds=round(seconds, 2), io_dtypes=io_dtypes,
    )
    return meta


def validate_plans(
    export_dir: Path, data: dict[str, Any], max_batch: int, precision: str,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The runtime's TensorRT engines over the new plans vs its ONNX Runtime engines (CPU)
    over the ONNX files: random inputs at N = 1 and N = min(3, max_batch), and gate
    agreement on 1000 random states; fp16 is reported as not validated."""
    import torch

    from hms_deploy.export.figures import Tolerance
    from hms_deploy.export.runners import engine_set_runner
    from hms_deploy.export.validate import gate_agreement, onnx_engine_set, random_parity
    from hms_deploy.runtime.backends.trt import TrtEngine
    from hms_deploy.runtime.bindings import new_stream
    from hms_deploy.runtime.engines import EngineSet

    cfg = HMSConfig.from_dict(data["config"])
    specs = part_specs(cfg)
    parts = data["parts"]
    costs = {n: float(parts[n]["gmac"]) for n in PART_NAMES}
    ref_set = onnx_engine_set({n: export_dir / parts[n]["files"]["onnx"] for n in PART_NAMES}, cfg, costs)
    dev = torch.device("cuda", torch.cuda.current_device())
    stream = new_stream(dev)
    cand_set = EngineSet(
        backend="trt", device=dev, config=cfg, labels=[str(i) for i in range(cfg.num_classes)],
        costs=costs, source=str(export_dir),
        engines={n: TrtEngine(specs[n], export_dir / parts[n]["files"]["trt"], dev, stream=stream,
                              export_dir=export_dir) for n in PART_NAMES},
    )
    tol = Tolerance(rtol=1e-3, atol=1e-5, cosine_min=0.999)
    batches = sorted({1, min(3, max_batch)})
    enforce = precision == "fp32"
    report: dict[str, Any] = {"reference": "onnxruntime CPUExecutionProvider", "batches": batches,
                              "tolerances": {"rtol": tol.rtol, "atol": tol.atol,
                                             "cosine_min": tol.cosine_min}, "parts": {}, "gates": {}}
    failure = None
    with ref_set as ref, cand_set as cand:
        for name in PART_NAMES:
            r = random_parity(ref, cand, specs[name], batches, tol, seed=11)
            for out, f in r["outputs"].items():
                ok = f.pop("ok")
                f["status"] = "passed" if ok and enforce else ("failed" if enforce else "not validated")
                if not ok and failure is None:
                    failure = f"{name}: TensorRT output '{out}' out of tolerance ({f})"
            report["parts"][name] = r
        for name in ("appearance_gate", "motion_gate"):
            g = gate_agreement(engine_set_runner(ref), engine_set_runner(cand), specs[name], 1000,
                               tol, seed=12, chunk=max_batch)
            ok = g.pop("ok")
            g.pop("logits", None)
            g["status"] = "passed" if ok and enforce else ("failed" if enforce else "not validated")
            if not ok and failure is None:
                failure = f"{name}: TensorRT decisions differ on {g['disagree_outside_ties']} of 1000 states"
            report["gates"][name] = g
    report["status"] = ("passed" if failure is None else "failed") if enforce else "not validated"
    if failure and enforce:
        raise ExportError(f"TensorRT parity check failed: {failure}")
    return report


def add_plans_to_data(
    export_dir: Path, data: dict[str, Any], options: BuildOptions,
    log: Callable[[str], None] | None = None,
) -> None:
    """Build a plan for every part of the export described by ``data`` (the manifest dict,
    updated in place: ``parts[*].files/sha256/trt``, ``tensorrt``, ``producer``,
    ``parity.tensorrt``). New plans are written as ``*.plan`` only after all built; on
    failure they are removed and ``data`` is unchanged."""
    say = log or (lambda s: None)
    info = check_available()
    cfg_specs = part_specs(HMSConfig.from_dict(data["config"]))
    cache = export_dir / TIMING_CACHE_NAME
    staged: dict[str, Path] = {}
    metas: dict[str, dict[str, Any]] = {}
    try:
        for name in PART_NAMES:
            rec = data["parts"][name]
            onnx_path = export_dir / rec["files"]["onnx"]
            tmp_plan = export_dir / f".{name}{PLAN_SUFFIX}.building"
            staged[name] = tmp_plan
            say(f"building TensorRT plan for {name}")
            metas[name] = build_plan(onnx_path, cfg_specs[name], tmp_plan, options,
                                     onnx_sha256=rec["sha256"]["onnx"], timing_cache=cache)
        for name, tmp_plan in staged.items():
            final = export_dir / f"{name}{PLAN_SUFFIX}"
            os.replace(tmp_plan, final)
            metas[name]["plan"] = final.name
            staged[name] = final
        new_parts = {}
        for name in PART_NAMES:
            rec = dict(data["parts"][name])
            rec["files"] = {**rec["files"], "trt": f"{name}{PLAN_SUFFIX}"}
            rec["sha256"] = {**rec["sha256"], "trt": mf.sha256_file(export_dir / f"{name}{PLAN_SUFFIX}")}
            rec["trt"] = metas[name]
            new_parts[name] = rec
        trial = {**data, "parts": new_parts}
        report = validate_plans(export_dir, trial, options.max_batch, options.precision, say)
    except BaseException:
        for p in staged.values():
            p.unlink(missing_ok=True)
        raise
    data["parts"] = new_parts
    opt = options.opt_batch or default_opt_batch(options.max_batch)
    data["tensorrt"] = {
        "version": info["tensorrt"], "gpu": info["gpu"],
        "compute_capability": info["compute_capability"], "max_batch": options.max_batch,
        "opt_batch": opt, "workspace_bytes": options.workspace_bytes,
        "precision": options.precision, "timing_cache": TIMING_CACHE_NAME,
    }
    data["producer"] = {**data.get("producer", {}), "tensorrt": info["tensorrt"],
                        "gpu": info["gpu"], "compute_capability": info["compute_capability"]}
    data["parity"] = {**(data.get("parity") or {}), "tensorrt": report}
