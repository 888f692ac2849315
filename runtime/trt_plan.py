"""TensorRT logic that needs no TensorRT: profiles, plan metadata, compatibility, dtype names.

Everything here is pure Python, so it is tested on machines without
TensorRT; the export package builds plans with it and the TensorRT backend checks them.

A TensorRT plan loads only on the TensorRT build and the GPU (compute capability) it was
built for, and TensorRT offers no pre-check; a plan from another card of the same
compute capability (H100 and H200 are both sm_90) even loads, tuned for the other card.
So every plan's manifest entry records the TensorRT version, the GPU name and compute
capability, the builder flags, the profile ranges and the sha256 of the ONNX file it was
built from; :func:`check_plan_compatible` keys plans on TensorRT version + GPU name +
compute capability and says how to rebuild on a mismatch.
"""

from __future__ import annotations

from typing import Any

from hms_deploy.errors import ConfigError, EngineError, Remedy, require_at_least
from hms_deploy.parts import PartSpec

# The one optimisation-profile maximum of TensorRT plans and of ONNX Runtime's TensorRT
# provider: N in [1, DEFAULT_MAX_BATCH] runs in one launch (lockstep N = 32 included);
# larger N runs in chunks of it.
DEFAULT_MAX_BATCH = 32
DEFAULT_WORKSPACE_BYTES = 4 << 30
PLAN_SUFFIX = ".plan"
TIMING_CACHE_NAME = "trt_timing.cache"


Shape = tuple[int, ...]


def trt_dtype_name(trt_dtype: Any) -> str:
    """``trt.DataType.HALF`` (or its name, or ``"DataType.HALF"``) -> ``"HALF"``."""
    name = getattr(trt_dtype, "name", None)
    if not isinstance(name, str):
        name = str(trt_dtype)
    return name.rsplit(".", 1)[-1].upper()


def default_opt_batch(max_batch: int) -> int:
    """The profile's optimisation batch: the middle of 1..max_batch (rounded up).

    HMS sub-batches vary from step to step (only the videos whose gate fired), so the
    kernels are tuned for a typical, not the largest, batch.
    """
    return max(1, (max_batch + 1) // 2)


def check_build(max_batch: int, opt_batch: int | None = None, workspace_bytes: int | None = None) -> int:
    """The one check of a plan build's settings (a :class:`ConfigError` naming the setting;
    ``workspace_bytes`` only when given); returns the profile's optimisation batch
    (``opt_batch`` or :func:`default_opt_batch`)."""
    require_at_least("max_batch", max_batch, 1)
    opt = default_opt_batch(max_batch) if opt_batch is None else opt_batch
    if not 1 <= opt <= max_batch:
        raise ConfigError(f"opt_batch must be in 1..{max_batch}, got {opt}", setting="opt_batch",
                          value=opt, expected=f"1..{max_batch}")
    require_at_least("workspace_bytes", workspace_bytes, 1)
    return opt


def profile_shapes(
    spec: PartSpec, max_batch: int, opt_batch: int | None = None
) -> dict[str, tuple[Shape, Shape, Shape]]:
    """``{input name: (min, opt, max)}`` over batch 1..max_batch for every input of ``spec``."""
    opt = check_build(max_batch, opt_batch)
    return {t.name: (t.with_batch(1), t.with_batch(opt), t.with_batch(max_batch)) for t in spec.inputs}


def parse_cc(cc: Any) -> tuple[int, int]:
    """Compute capability from ``(8, 9)``, ``"8.9"``, ``"sm_89"`` or ``89`` -> ``(8, 9)``."""
    if isinstance(cc, (tuple, list)) and len(cc) == 2:
        return int(cc[0]), int(cc[1])
    s = str(cc).strip().lower().removeprefix("sm_").removeprefix("sm")
    if "." in s:
        major, minor = s.split(".", 1)
        return int(major), int(minor)
    if s.isdigit() and len(s) >= 2:
        return int(s[:-1]), int(s[-1])
    raise ValueError(f"not a compute capability: {cc!r}")


def cc_string(cc: Any) -> str:
    major, minor = parse_cc(cc)
    return f"{major}.{minor}"


def sm_name(cc: Any) -> str:
    major, minor = parse_cc(cc)
    return f"sm_{major}{minor}"


def plan_metadata(
    *,
    spec: PartSpec,
    plan_file: str,
    onnx_sha256: str,
    tensorrt_version: str,
    gpu_name: str,
    compute_capability: Any,
    max_batch: int,
    opt_batch: int,
    workspace_bytes: int,
    precision: str,
    flags: list[str],
    strongly_typed: bool,
    build_seconds: float | None = None,
    io_dtypes: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The ``parts[name]["trt"]`` entry of the manifest for one plan (plain JSON types)."""
    profile = {
        name: {"min": list(a), "opt": list(b), "max": list(c)}
        for name, (a, b, c) in profile_shapes(spec, max_batch, opt_batch).items()
    }
    return {
        "plan": plan_file,
        "tensorrt_version": tensorrt_version,
        "gpu": gpu_name,
        "compute_capability": cc_string(compute_capability),
        "onnx_sha256": onnx_sha256,
        "precision": precision,
        "strongly_typed": strongly_typed,
        "flags": sorted(flags),
        "workspace_bytes": int(workspace_bytes),
        "max_batch": int(max_batch),
        "opt_batch": int(opt_batch),
        "profile": profile,
        "io_dtypes": dict(io_dtypes or {}),
        "build_seconds": build_seconds,
    }


def plan_remedy(export_dir: Any = None) -> Remedy:
    """The step that (re)builds the TensorRT plans of ``export_dir`` (``DIR`` if unknown)."""
    return Remedy("trt_plans", str(export_dir) if export_dir is not None else "DIR")


def rebuild_hint(export_dir: Any = None) -> str:
    """The end of an error whose ``remedy`` is :func:`plan_remedy` of ``export_dir``."""
    return f"rebuild with `{plan_remedy(export_dir).text}`"


def plan_error(message: str, export_dir: Any = None, after: str = "") -> EngineError:
    """The error of a plan that is missing or cannot be used: ``message``, then how to
    (re)build the plans (:func:`rebuild_hint`, then ``after``), with that step as its
    ``remedy``."""
    return EngineError(f"{message}{rebuild_hint(export_dir)}{after}",
                       remedy=plan_remedy(export_dir))


def check_plan_compatible(
    entry: Any,
    trt_version: str,
    gpu_cc: Any,
    *,
    gpu_name: str | None = None,
    export_dir: Any = None,
) -> str | None:
    """None if ``entry``'s plan can load here; otherwise one line that says how to rebuild
    (an error made of it takes ``remedy=plan_remedy(export_dir)``).

    ``entry`` is a :class:`~hms_deploy.runtime.manifest.PartEntry` (or its JSON dict).
    A plan is used only on the exact TensorRT version, GPU name (when ``gpu_name`` is
    given) and compute capability it was built for, and only if it was built from the
    ONNX file now in the export (same sha256).
    """
    name = getattr(entry, "name", None) or (entry.get("name") if isinstance(entry, dict) else None)
    meta = getattr(entry, "trt", None) if not isinstance(entry, dict) else entry.get("trt")
    hashes = getattr(entry, "sha256", None) if not isinstance(entry, dict) else entry.get("sha256")
    label = f"{name}: " if name else ""
    if not meta:
        return f"{label}no TensorRT plan in the export: build one with " \
               f"`{plan_remedy(export_dir).text}`"
    built_v = str(meta.get("tensorrt_version", "?"))
    built_gpu = str(meta.get("gpu", "?"))
    try:
        built_cc = sm_name(meta.get("compute_capability", ""))
    except ValueError:
        built_cc = "sm_?"
    here_cc = sm_name(gpu_cc)
    here_gpu = f"GPU {gpu_name} " if gpu_name else "a GPU "
    mismatch = built_v != str(trt_version) or built_cc != here_cc or (
        gpu_name is not None and built_gpu != gpu_name)
    if mismatch:
        return (
            f"{label}plan built for TensorRT {built_v} on GPU {built_gpu} ({built_cc}); this "
            f"machine has TensorRT {trt_version} on {here_gpu}({here_cc}): {rebuild_hint(export_dir)}"
        )
    onnx_hash = (hashes or {}).get("onnx") if isinstance(hashes, dict) else None
    if onnx_hash and meta.get("onnx_sha256") and meta["onnx_sha256"] != onnx_hash:
        return (
            f"{label}plan was built from a different ONNX file than the one in the export: "
            f"{rebuild_hint(export_dir)}"
        )
    return None
