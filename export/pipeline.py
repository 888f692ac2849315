"""Export a checkpoint to an export directory, safely (what ``hms-export`` calls).

Safety: everything is written into a hidden staging directory next to the target
(``.<name>.partial-<pid>``), the manifest last; the staging directory is renamed to the
target only when every part exported and passed validation. A failed or interrupted
export removes its staging directory; one killed outright leaves only the hidden
staging directory, which the next export to the same target removes. An existing
non-empty target is refused unless ``force``; with ``force`` only a previous export
(a directory with a ``manifest.json``) is replaced, never an arbitrary folder.

One export at a time per target: an export (and :func:`add_trt_plans`) holds an
exclusive ``flock`` on ``.<name>.lock`` beside the resolved target from before the
checkpoint loads to the end (:func:`export_lock`; the file is removed when it ends); a second one refuses at once,
naming the holder (pid, host, start time), or with ``wait`` waits for it. A full disk
(or a file-size limit) while writing gives an :class:`ExportError` naming the target
and the file being written; nothing is left at the target.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hms_deploy.errors import ConfigError, ExportError, require_at_least
from hms_deploy.export.onnx import DEFAULT_OPSET, check_onnx_settings
from hms_deploy.export.validate import ValidationOptions
from hms_deploy.outputs import OutputLock, disk_full
from hms_deploy.runtime import manifest as mf
from hms_deploy.runtime.trt_plan import DEFAULT_MAX_BATCH, DEFAULT_WORKSPACE_BYTES, check_build

ENGINES = ("onnx", "trt")
Log = Callable[[str], None]


@dataclass(frozen=True)
class ExportOptions:
    """Options of :func:`export_checkpoint` (``max_batch``/``opt_batch``/``workspace_bytes``
    apply to TensorRT plans)."""

    engine: str = "onnx"
    precision: str = "fp32"
    opset: int = DEFAULT_OPSET
    max_batch: int = DEFAULT_MAX_BATCH
    opt_batch: int | None = None
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES
    force: bool = False
    wait: bool = False  # another export holds the target: wait for it instead of refusing
    external_data: bool | None = None
    validation: ValidationOptions = field(default_factory=ValidationOptions)

    def check(self) -> None:
        """The one check of these options (a :class:`ConfigError` naming the setting)."""
        if self.engine not in ENGINES:
            raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}",
                              setting="engine", value=self.engine, expected=" or ".join(ENGINES))
        check_onnx_settings(self.opset, self.precision)
        check_build(self.max_batch, self.opt_batch, self.workspace_bytes)
        require_at_least("steps", self.validation.steps, 1)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def producer_versions(opset: int | None, exporter: str | None) -> dict[str, Any]:
    import onnx
    import onnxruntime
    import torch

    from hms_deploy.version import __version__

    return {
        "hms_deploy": __version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "opset": opset,
        "exporter": exporter,
        "python": platform.python_version(),
    }


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_staging(out: Path) -> None:
    """Remove staging dirs of earlier exports to ``out`` whose process is gone."""
    for p in out.parent.glob(f".{out.name}.partial-*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


def check_out_dir(out: Path, force: bool) -> None:
    """Refuse a target that exists and is not empty (unless ``force`` and it is an export)."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ExportError(f"{out}: output directory is not empty; use force to replace it",
                                  setting="force", value=False)
        if not (out / mf.MANIFEST_NAME).is_file():
            raise ExportError(
                f"{out}: not empty and not an hms-export directory (no {mf.MANIFEST_NAME}); "
                "refusing to replace it even with force", setting="force", value=True
            )


def export_lock(out: str | os.PathLike[str], *, wait: bool = False, log: Log | None = None,
                command: str = "hms-export") -> OutputLock:
    """Lock the export target ``out`` (``.<name>.lock`` beside its resolved path).

    Raises :class:`~hms_deploy.outputs.OutputLocked` naming the holder if another export
    holds it, unless ``wait`` (then ``log`` says whom it waits for, and it blocks).
    """
    real = Path(os.path.realpath(out))
    real.parent.mkdir(parents=True, exist_ok=True)
    return OutputLock(real.parent / f".{real.name}.lock", out, command, remove=True).acquire(
        wait=wait, on_wait=log)


def _commit(staging: Path, out: Path) -> None:
    """Move the finished staging dir to ``out`` (replacing an old export)."""
    old = None
    if out.is_dir():
        if any(out.iterdir()):
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
        else:
            out.rmdir()
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_checkpoint(
    checkpoint: str | os.PathLike[str],
    out: str | os.PathLike[str] = "engines",
    options: ExportOptions | None = None,
    *,
    log: Log | None = None,
) -> mf.Manifest:
    """Export every part of an HMS checkpoint to ONNX (and TensorRT plans), validate, and
    write ``out/manifest.json``. Returns the loaded (verified) manifest.

    Raises :class:`~hms_deploy.errors.CheckpointError` for a missing/corrupt checkpoint,
    :class:`ExportError` for a refused target, a baseline checkpoint, a failed part, an
    out-of-tolerance parity figure or a full disk (naming the file),
    :class:`~hms_deploy.errors.BackendUnavailable` for ``engine="trt"`` without TensorRT or
    a GPU,
    :class:`~hms_deploy.outputs.OutputLocked` if another export holds ``out`` (unless
    ``options.wait``). Nothing is left at ``out`` on failure.
    """

    opts = options or ExportOptions()
    say = log or (lambda s: None)
    opts.check()
    out = Path(out)
    ckpt_path = Path(checkpoint)
    if opts.engine == "trt":
        from hms_deploy.export.tensorrt import check_available

        check_available()  # BackendUnavailable before any work
    lock = export_lock(out, wait=opts.wait, log=say)
    try:
        return _export_locked(ckpt_path, out, opts, say)
    finally:
        lock.release()


def _export_locked(ckpt_path: Path, out: Path, opts: ExportOptions, say: Log) -> mf.Manifest:
    from hms_deploy.checkpoint import load_checkpoint
    from hms_deploy.export.modules import export_parts
    from hms_deploy.export.onnx import export_part
    from hms_deploy.export.validate import validate_export

    check_out_dir(out, opts.force)
    ckpt = load_checkpoint(ckpt_path)
    if ckpt.policy != "hms":
        raise ExportError(
            f"{ckpt_path}: holds a {ckpt.policy!r} baseline over {ckpt.modalities}, not an HMS "
            "model; only HMS checkpoints can be exported"
        )
    model = ckpt.build_model()
    parts = export_parts(model, ckpt.costs)
    cfg = ckpt.config

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(out)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    t0 = time.perf_counter()
    try:
        exported = {}
        for name, part in parts.items():
            info = export_part(part, staging, opset=opts.opset, precision=opts.precision,
                               external_data=opts.external_data)
            exported[name] = info
            say(f"exported {name} ({info.nodes} nodes, {info.seconds:.1f} s)")
        onnx_paths = {n: staging / e.files["onnx"] for n, e in exported.items()}
        parity = validate_export(parts, onnx_paths, cfg, precision=opts.precision,
                                 options=opts.validation, log=say)
        say(f"validation {parity['status']} ({parity['seconds']:.1f} s)")
        opsets = {e.opset for e in exported.values()}
        exporters = sorted({e.exporter for e in exported.values()})
        records = {
            name: mf.part_record(
                part.spec, files=exported[name].files, root=staging, gmac=part.gmac,
                precision=opts.precision, opset=exported[name].opset, exporter=exported[name].exporter,
            )
            for name, part in parts.items()
        }
        data: dict[str, Any] = {
            "created": _now(),
            "precision": opts.precision,
            "T": cfg.steps,
            "labels": list(ckpt.labels),
            "cost_unit": "GMAC",
            "config": cfg.to_dict(),
            "preprocessing": mf.preprocessing(cfg),
            "checkpoint": {"file": ckpt_path.name, "sha256": mf.sha256_file(ckpt_path),
                           "policy": ckpt.policy},
            "producer": producer_versions(max(opsets), ", ".join(exporters)),
            "parts": records,
            "tensorrt": None,
            "parity": parity,
        }
        if opts.engine == "trt":
            from hms_deploy.export.tensorrt import BuildOptions, add_plans_to_data

            add_plans_to_data(
                staging, data,
                BuildOptions(max_batch=opts.max_batch, opt_batch=opts.opt_batch,
                             workspace_bytes=opts.workspace_bytes, precision=opts.precision),
                log=say,
            )
        data["export_seconds"] = round(time.perf_counter() - t0, 1)
        mf.write_manifest(staging, data)
        _commit(staging, out)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        full = disk_full(e)
        if full is not None:
            raise ExportError(
                f"{out}: cannot write the export: {full.strerror or full} (writing "
                f"{full.filename or staging}); nothing was written to {out} (the partial "
                "files were removed): free some space and export again"
            ) from e
        raise
    return mf.load_manifest(out, verify=True)


def add_trt_plans(
    export_dir: str | os.PathLike[str],
    *,
    max_batch: int = DEFAULT_MAX_BATCH,
    opt_batch: int | None = None,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
    log: Log | None = None,
    wait: bool = False,
) -> mf.Manifest:
    """Build TensorRT plans for an existing ONNX export on this machine's GPU.

    Verifies every file's hash first, builds the plans next to the ONNX files, validates
    them against ONNX Runtime, and replaces ``manifest.json`` atomically. Plans of a
    failed build are removed; an existing manifest is left as it was. Holds the
    directory's export lock (:func:`export_lock`; ``wait`` as in :class:`ExportOptions`).
    """
    from hms_deploy.export.tensorrt import check_available

    check_build(max_batch, opt_batch, workspace_bytes)
    check_available()
    lock = export_lock(export_dir, wait=wait, log=log)
    try:
        return _add_plans_locked(export_dir, max_batch, opt_batch, workspace_bytes, log)
    finally:
        lock.release()


def _add_plans_locked(export_dir: str | os.PathLike[str], max_batch: int, opt_batch: int | None,
                      workspace_bytes: int, log: Log | None) -> mf.Manifest:
    from hms_deploy.export.tensorrt import BuildOptions, add_plans_to_data

    man = mf.load_manifest(export_dir, verify=True)
    data = dict(man.data)
    data["parts"] = {k: dict(v) for k, v in man.data["parts"].items()}
    add_plans_to_data(
        man.dir, data,
        BuildOptions(max_batch=max_batch, opt_batch=opt_batch, workspace_bytes=workspace_bytes,
                     precision=man.precision),
        log=log,
    )
    mf.write_manifest(man.dir, data)
    return mf.load_manifest(man.dir, verify=True)

