"""``hms-export``: export a checkpoint's nine parts to ONNX (and TensorRT plans), validated.

One export per target at a time: a second ``hms-export`` to the same ``--out`` (or
``--engines``) refuses at once naming the holder (pid, host, start time) and exits 3,
or with ``--wait`` waits for it. A full disk names the file it could not write (exit 1).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import click

from hms_deploy.cli.common import EXIT_STOPPED, debug_option, fail, given, handle_errors
from hms_deploy.errors import ConfigError
from hms_deploy.export.onnx import MAX_OPSET, MIN_OPSET
from hms_deploy.export.pipeline import ExportOptions
from hms_deploy.outputs import OutputLocked, sigterm_raises

_EXPORT = ExportOptions()  # the defaults of the export's settings


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="ckpt.pt to export (not needed with --engines).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("engines"),
              show_default=True, help="Export directory (must be empty or absent unless --force).")
@click.option("--engine", default=None,
              help=f"onnx: ONNX files only; trt: also build TensorRT plans on this GPU. "
                   f"[default: {_EXPORT.engine}]")
@click.option("--precision", default=None,
              help=f"fp32 or fp16 (half-precision graphs with fp32 inputs/outputs; validate on "
                   f"a GPU). [default: {_EXPORT.precision}]")
@click.option("--engines", "engines_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="With --engine trt: add TensorRT plans to this existing ONNX export.")
@click.option("--max-batch", type=int, default=None,
              help=f"TensorRT profile: largest batch N (smallest is 1; the runtime's one profile "
                   f"maximum, enough for lockstep N = 32). Given with --triton-repo, also the served "
                   f"model's max_batch_size. [default: {_EXPORT.max_batch}]")
@click.option("--opt-batch", type=int, default=None,
              help="TensorRT profile: batch to tune for (default: half of --max-batch).")
@click.option("--workspace-gb", type=float, default=None,
              help=f"TensorRT builder workspace limit in GiB. [default: {_EXPORT.workspace_bytes / 2**30:g}]")
@click.option("--opset", type=int, default=None,
              help=f"ONNX opset ({MIN_OPSET}-{MAX_OPSET}). [default: {_EXPORT.opset}]")
@click.option("--steps", type=int, default=None,
              help=f"Steps T of the end-to-end parity check. [default: {_EXPORT.validation.steps}]")
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
    engine: str | None,
    precision: str | None,
    engines_dir: Path | None,
    max_batch: int | None,
    opt_batch: int | None,
    workspace_gb: float | None,
    opset: int | None,
    steps: int | None,
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

    from hms_deploy.export.validate import ValidationOptions

    if workspace_gb is not None and not workspace_gb > 0:  # GiB: the command's unit
        raise ConfigError(f"--workspace-gb must be > 0, got {workspace_gb:g}")
    options = ExportOptions(  # its defaults and checks are the only ones
        force=force, wait=wait, validation=ValidationOptions(video=video, **given(steps=steps)),
        **given(engine=engine, precision=precision, opset=opset, max_batch=max_batch,
                opt_batch=opt_batch,
                workspace_bytes=None if workspace_gb is None else int(workspace_gb * 2**30)),
    )
    options.check()
    # SIGTERM -> KeyboardInterrupt while exporting, so that the staging dir is cleaned up
    with sigterm_raises(KeyboardInterrupt):
        if triton_repo is not None and engines_dir is not None and options.engine == "onnx":
            done = engines_dir  # an existing export: only the repository
        else:
            try:
                done = _main(checkpoint, out, engines_dir, options, log)
            except OutputLocked as e:
                fail("hms-export", f"{e}; --wait waits for it", EXIT_STOPPED)
        if triton_repo is not None:  # the model's max_batch_size: its own default unless given
            _triton_repo(done, triton_repo, options.engine, max_batch, force)


def _triton_repo(engines_dir: Path, repo: Path, engine: str, max_batch: int | None, force: bool) -> None:
    from hms_deploy.runtime.serve.options import RepositoryOptions
    from hms_deploy.runtime.serve.repository import write_repository

    options = RepositoryOptions(engine=engine, device="cuda" if engine == "trt" else "cpu",
                                **given(max_batch=max_batch))
    write_repository(repo, engines_dir, options, force=force)
    click.echo(f"wrote Triton model repository {repo} (model 'hms', max_batch_size {options.max_batch}); "
               f"serve it with `tritonserver --model-repository {repo}` or {repo}/launch.sh")


def _main(checkpoint: Path | None, out: Path, engines_dir: Path | None, options: ExportOptions,
          log: Callable[[str], None]) -> Path:
    """Export (or add plans); returns the export directory."""
    from hms_deploy.export.pipeline import add_trt_plans, export_checkpoint

    if engines_dir is not None:
        if options.engine != "trt":
            raise ConfigError("--engines DIR adds TensorRT plans to an export: use it with --engine trt")
        if checkpoint is not None:
            raise ConfigError("--engines DIR works on an existing export: drop --checkpoint")
        man = add_trt_plans(engines_dir, max_batch=options.max_batch, opt_batch=options.opt_batch,
                            workspace_bytes=options.workspace_bytes, log=log, wait=options.wait)
        trt = man.tensorrt or {}
        click.echo(f"added TensorRT {trt.get('version')} plans for {trt.get('gpu')} "
                   f"(sm {trt.get('compute_capability')}) to {man.dir}; manifest {man.sha256[:12]}")
        return Path(engines_dir)
    if checkpoint is None:
        raise ConfigError("--checkpoint is required (or --engines DIR --engine trt)")
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
