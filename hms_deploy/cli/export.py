"""``hms-export``: export a checkpoint's nine parts to ONNX (and TensorRT plans), validated.

One export per target at a time: a second ``hms-export`` to the same ``--out`` (or
``--engines``) refuses at once naming the holder (pid, host, start time) and exits 3,
or with ``--wait`` waits for it. A full disk names the file it could not write (exit 1).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from hms_deploy.cli.common import EXIT_STOPPED, debug_option, fail, handle_errors
from hms_deploy.outputs import OutputLocked, sigterm_raises


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="ckpt.pt to export (not needed with --engines).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("engines"),
              show_default=True, help="Export directory (must be empty or absent unless --force).")
@click.option("--engine", type=click.Choice(["onnx", "trt"]), default="onnx", show_default=True,
              help="onnx: ONNX files only; trt: also build TensorRT plans on this GPU.")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="fp16: half-precision graphs with fp32 inputs/outputs (validate on a GPU).")
@click.option("--engines", "engines_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="With --engine trt: add TensorRT plans to this existing ONNX export.")
@click.option("--max-batch", type=click.IntRange(min=1), default=None,
              help="TensorRT profile: largest batch N (smallest is 1; default: the runtime's one "
                   "profile maximum, trt_plan.DEFAULT_MAX_BATCH, enough for lockstep N = 32).")
@click.option("--opt-batch", type=click.IntRange(min=1), default=None,
              help="TensorRT profile: batch to tune for (default: half of --max-batch).")
@click.option("--workspace-gb", type=float, default=4.0, show_default=True,
              help="TensorRT builder workspace limit in GiB.")
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset (17-20).")
@click.option("--steps", type=click.IntRange(min=1), default=10, show_default=True,
              help="Steps T of the end-to-end parity check.")
@click.option("--video", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Video for the realistic and end-to-end checks (default: a generated clip).")
@click.option("--force", is_flag=True, default=False,
              help="Replace an existing export in --out.")
@click.option("--triton-repo", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write a Triton model repository (Python-backend model 'hms' over a "
                   "copy of the export) here; with --engines DIR alone, from that export.")
@click.option("--wait", is_flag=True, default=False,
              help="If another hms-export is writing the same directory, wait for it to "
                   "finish instead of refusing (exit 3).")
@click.option("--quiet", "-q", is_flag=True, default=False, help="Print only the summary line.")
@debug_option
@handle_errors("hms-export")
def main(
    checkpoint: Path | None,
    out: Path,
    engine: str,
    precision: str,
    engines_dir: Path | None,
    max_batch: int,
    opt_batch: int | None,
    workspace_gb: float,
    opset: int,
    steps: int,
    video: Path | None,
    force: bool,
    wait: bool,
    triton_repo: Path | None,
    quiet: bool,
    debug: bool,
) -> None:
    """Export the nine HMS parts of a checkpoint to DIR (ONNX, optional TensorRT plans),
    check them against PyTorch, and write DIR/manifest.json.

    \b
    Exit codes: 0 done; 1 a failure (checkpoint, part, parity, full disk: the message
    names the file); 2 usage error; 3 another hms-export holds the directory (its pid,
    host and start time are named; --wait waits for it); 130 interrupted.
    """

    def log(msg: str) -> None:
        if not quiet:
            click.echo(msg, err=True)

    serve_batch = max_batch  # the Triton model's max_batch_size: its own default unless given
    if max_batch is None:
        from hms_deploy.runtime.trt_plan import DEFAULT_MAX_BATCH

        max_batch = DEFAULT_MAX_BATCH
    # SIGTERM -> KeyboardInterrupt while exporting, so that the staging dir is cleaned up
    with sigterm_raises(KeyboardInterrupt):
        if triton_repo is not None and engines_dir is not None and engine == "onnx":
            done = engines_dir  # an existing export: only the repository
        else:
            try:
                done = _main(checkpoint, out, engine, precision, engines_dir, max_batch,
                             opt_batch, workspace_gb, opset, steps, video, force, wait, log)
            except OutputLocked as e:
                fail("hms-export", f"{e}; --wait waits for it", EXIT_STOPPED)
        if triton_repo is not None:
            _triton_repo(done, triton_repo, engine, serve_batch, force)


def _triton_repo(engines_dir: Path, repo: Path, engine: str, max_batch: int | None, force: bool) -> None:
    from hms_deploy.runtime.serve.repository import RepositoryOptions, write_repository

    batch: dict[str, Any] = {"max_batch": max_batch} if max_batch else {}
    options = RepositoryOptions(engine=engine, device="cuda" if engine == "trt" else "cpu", **batch)
    write_repository(repo, engines_dir, options, force=force)
    click.echo(f"wrote Triton model repository {repo} (model 'hms', max_batch_size {options.max_batch}); "
               f"serve it with `tritonserver --model-repository {repo}` or {repo}/launch.sh")


def _main(checkpoint: Path | None, out: Path, engine: str, precision: str,
          engines_dir: Path | None, max_batch: int, opt_batch: int | None, workspace_gb: float,
          opset: int, steps: int, video: Path | None, force: bool, wait: bool,
          log: Callable[[str], None]) -> Path:
    """Export (or add plans); returns the export directory."""
    from hms_deploy.errors import ConfigError
    from hms_deploy.export.onnx import MAX_OPSET, MIN_OPSET
    from hms_deploy.export.pipeline import (
        ExportOptions,
        add_trt_plans,
        export_checkpoint,
    )
    from hms_deploy.export.validate import ValidationOptions

    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ConfigError(f"--opset must be in {MIN_OPSET}..{MAX_OPSET}, got {opset}")
    workspace = int(workspace_gb * (1 << 30))
    if engines_dir is not None:
        if engine != "trt":
            raise ConfigError("--engines DIR adds TensorRT plans to an export: use it with --engine trt")
        if checkpoint is not None:
            raise ConfigError("--engines DIR works on an existing export: drop --checkpoint")
        man = add_trt_plans(engines_dir, max_batch=max_batch, opt_batch=opt_batch,
                            workspace_bytes=workspace, log=log, wait=wait)
        trt = man.tensorrt or {}
        click.echo(f"added TensorRT {trt.get('version')} plans for {trt.get('gpu')} "
                   f"(sm {trt.get('compute_capability')}) to {man.dir}; manifest {man.sha256[:12]}")
        return Path(engines_dir)
    if checkpoint is None:
        raise ConfigError("--checkpoint is required (or --engines DIR --engine trt)")
    if steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {steps}")
    options = ExportOptions(
        engine=engine, precision=precision, opset=opset, max_batch=max_batch, opt_batch=opt_batch,
        workspace_bytes=workspace, force=force, wait=wait,
        validation=ValidationOptions(steps=steps, video=video),
    )
    man = export_checkpoint(checkpoint, out, options, log=log)
    parity = man.parity
    kinds = "ONNX + TensorRT" if man.has("trt") else "ONNX"
    gm = {n: man.parts[f"{n}_backbone"].gmac for n in ("audio", "appearance", "motion")}
    click.echo(
        f"wrote {man.dir} ({kinds}, {man.precision}, opset {man.producer.get('opset')}, "
        f"{len(man.labels)} classes, T={man.steps}); parity {parity.get('status')}; "
        f"GMAC/sample audio {gm['audio']:.3g}, appearance {gm['appearance']:.3g}, "
        f"motion {gm['motion']:.3g}; manifest {man.sha256[:12]}"
    )
    sys.stdout.flush()
    return Path(out)
