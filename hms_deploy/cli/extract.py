"""``hms-extract``: raw backbone features of a dataset list into a resumable feature store."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from hms_deploy.cli.common import (
    EXIT_SIGINT,
    EXIT_SIGTERM,
    EXIT_STOPPED,
    debug_option,
    fail,
    flag_advice,
    given,
    handle_errors,
    ray_layout,
    ray_options,
    set_threads,
)
from hms_deploy.data.extraction import ENCODE_BATCH, check_extract_settings
from hms_deploy.data.store_meta import DEFAULT_DTYPE, DEFAULT_SHARD_SIZE, DTYPES
from hms_deploy.errors import HMSError
from hms_deploy.outputs import Terminated, sigterm_raises


def _stopped(e: BaseException, dataset: object, out: Path) -> None:
    """One line for a run that stopped early: why, and how many videos are not in the store."""
    from hms_deploy.data.features import StoreLocked, StoreMismatch, open_store

    entries = getattr(dataset, "entries", [])
    total = len(entries) + len(getattr(dataset, "problems", []))
    try:
        keys = set(open_store(out).keys())
    except HMSError:
        keys = set()
    left = total - sum(e.key in keys for e in entries)
    if isinstance(e, (StoreLocked, StoreMismatch)):  # refused before any video
        fail("hms-extract", f"{' '.join(flag_advice(e).split())}; {total} video(s) not "
             "attempted", EXIT_STOPPED)
    if isinstance(e, KeyboardInterrupt):
        why, code = "interrupted (SIGINT)", EXIT_SIGINT
    elif isinstance(e, Terminated):
        why, code = "terminated (SIGTERM)", EXIT_SIGTERM
    elif isinstance(e, OSError):
        why = f"cannot write {e.filename or out}: {e.strerror or e}"
        code = EXIT_STOPPED
    else:
        why, code = " ".join(flag_advice(e).split()), EXIT_STOPPED
    fail("hms-extract", f"{why}; {left} of {total} video(s) not in the store "
                        "(rerun with the same --out to resume)", code)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--checkpoint", "checkpoint", type=click.Path(dir_okay=False, path_type=Path),
              required=True, help="ckpt.pt whose backbones (encoders) extract the features.")
@click.option("--list", "list_path", type=click.Path(dir_okay=False, path_type=Path),
              required=True,
              help="CSV with a header 'path,label'; relative paths resolve against its folder.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Feature store directory (created, or resumed if it exists).")
@click.option("--steps", type=int, default=None, help="Steps T per video (default: the checkpoint's).")
@click.option("--dtype", default=None,
              help=f"Storage precision of the features: {' or '.join(DTYPES)}. "
                   f"[default: {DEFAULT_DTYPE}]")
@click.option("--batch-size", type=int, default=None,
              help=f"Steps per backbone call. [default: {ENCODE_BATCH}]")
@click.option("--shard-size", type=int, default=None,
              help=f"Videos per shard file (new stores only). [default: {DEFAULT_SHARD_SIZE}]")
@click.option("--threads", type=int, default=None,
              help="torch intra-op threads in this process (default: torch's choice).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@functools.partial(ray_options, workers_help=(
    "Decoding processes (decode, log-mel, resize/crop; default 1; 0 decodes in this process); "
    "with --ray: actors that decode and encode (default: one per CPU / threads per worker)."),
    workers_min=0)
@debug_option
@handle_errors("hms-extract")
def main(
    checkpoint: Path,
    list_path: Path,
    out: Path,
    steps: int | None,
    dtype: str | None,
    batch_size: int | None,
    shard_size: int | None,
    threads: int | None,
    quiet: bool,
    ray: bool,
    ray_address: str | None,
    workers: int | None,
    threads_per_worker: int,
    debug: bool,
) -> None:
    """Extract per-step raw audio/appearance/motion features for every video of a CSV.

    A rerun skips videos already in the store whose file is unchanged (same size and
    modification time; a changed file is extracted again and its record superseded) and
    retries failed ones. Videos that fail (missing, not a video, corrupt, unknown label)
    are listed in OUT/errors.jsonl (rewritten by every run: one line per failure); the
    others are still extracted. One writer per store (OUT/.lock; a second run refuses).

    \b
    Exit codes:
      0    every video is in the store
      1    the run completed and some videos failed (OUT/errors.jsonl)
      2    usage error
      3    the run stopped (or could not start) before attempting every video: the
           store is locked by another run, made with other settings, or cannot be
           written (disk full); the message says how many videos are not in the store
      130  interrupted (SIGINT); 143 terminated (SIGTERM). Rerun to resume.
    """
    from hms_deploy.checkpoint import load_checkpoint
    from hms_deploy.data.datasets import read_list
    from hms_deploy.data.extraction import extract
    from hms_deploy.data.features import StoreLocked, lock_store

    settings = given(dtype=dtype, batch_size=batch_size, shard_size=shard_size)
    check_extract_settings(steps=steps, **settings)  # before anything is opened
    set_threads(threads)
    layout = ray_layout(ray, ray_address, workers, threads_per_worker, local_workers=True)
    source = None
    if layout is not None:
        from hms_deploy.runtime.ray_batch import ray_feature_source

        source = ray_feature_source(checkpoint, layout, batch_size=batch_size)
    dataset = read_list(list_path)
    try:  # the store's lock before the model loads: a second writer refuses at once
        lock = lock_store(out)
    except StoreLocked as e:
        _stopped(e, dataset, out)
    click.get_current_context().call_on_close(lock.release)  # if the store never takes it
    ckpt = load_checkpoint(checkpoint)
    try:
        with sigterm_raises():
            report = extract(
                ckpt, dataset, out, steps=steps, **given(workers=workers), **settings,
                progress=not quiet, source=source, lock=lock,
            )
    except (KeyboardInterrupt, Terminated, OSError, HMSError) as e:
        if debug and not isinstance(e, (KeyboardInterrupt, Terminated)):
            raise
        _stopped(e, dataset, out)
    click.echo(f"{out}: {report.summary()}")
    for w in report.warnings:
        click.echo(f"hms-extract: warning: {flag_advice(w)}", err=True)
    if report.failed:
        for key, error in report.failed[:10]:
            click.echo(f"  failed: {error}", err=True)
        if len(report.failed) > 10:
            click.echo(f"  ... and {len(report.failed) - 10} more (see {out / 'errors.jsonl'})",
                       err=True)
        fail("hms-extract", f"{len(report.failed)} of {report.total} videos failed "
                            f"(listed in {out / 'errors.jsonl'})")
