"""``hms-extract``: raw backbone features of a dataset list into a resumable feature store."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from hms_deploy.cli.common import (
    debug_option,
    fail,
    handle_errors,
    ray_layout,
    ray_options,
    set_threads,
)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--checkpoint", "checkpoint", type=click.Path(dir_okay=False, path_type=Path),
              required=True, help="ckpt.pt whose backbones (encoders) extract the features.")
@click.option("--list", "list_path", type=click.Path(dir_okay=False, path_type=Path),
              required=True,
              help="CSV with a header 'path,label'; relative paths resolve against its folder.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Feature store directory (created, or resumed if it exists).")
@click.option("--steps", type=int, default=None, help="Steps T per video (default: the checkpoint's).")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16",
              show_default=True, help="Storage precision of the features.")
@click.option("--batch-size", type=int, default=16, show_default=True,
              help="Steps per backbone call.")
@click.option("--shard-size", type=int, default=256, show_default=True,
              help="Videos per shard file (new stores only).")
@click.option("--threads", type=int, default=None,
              help="torch intra-op threads in this process (default: torch's choice).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@functools.partial(ray_options, workers_help=(
    "Decoding processes (decode, log-mel, resize/crop; default 1; 0 decodes in this process); "
    "with --ray: actors that decode and encode (default: one per CPU / threads per worker)."))
@debug_option
@handle_errors("hms-extract")
def main(checkpoint, list_path, out, steps, dtype, batch_size, shard_size, threads, quiet,
         ray, ray_address, workers, threads_per_worker, debug):
    """Extract per-step raw audio/appearance/motion features for every video of a CSV.

    A rerun skips videos already in the store and retries failed ones. Videos that fail
    (missing, not a video, corrupt, unknown label) are listed in OUT/errors.jsonl; the
    others are still extracted, and the exit code is 1 if any failed.
    """
    from hms_deploy.checkpoint import load_checkpoint
    from hms_deploy.data.datasets import read_list
    from hms_deploy.data.features import extract

    set_threads(threads)
    layout = ray_layout(ray, ray_address, workers, threads_per_worker)
    source = None
    if layout is not None:
        from hms_deploy.runtime.ray_batch import ray_feature_source

        source = ray_feature_source(checkpoint, layout, batch_size=batch_size)
    ckpt = load_checkpoint(checkpoint)
    dataset = read_list(list_path)
    report = extract(
        ckpt, dataset, out, steps=steps, workers=1 if workers is None else workers, dtype=dtype,
        batch_size=batch_size, shard_size=shard_size, progress=not quiet, source=source,
    )
    click.echo(f"{out}: {report.summary()}")
    for w in report.warnings:
        click.echo(f"hms-extract: warning: {w}", err=True)
    if report.failed:
        for key, error in report.failed[:10]:
            click.echo(f"  failed: {error}", err=True)
        if len(report.failed) > 10:
            click.echo(f"  ... and {len(report.failed) - 10} more (see {out / 'errors.jsonl'})",
                       err=True)
        fail("hms-extract", f"{len(report.failed)} of {report.total} videos failed "
                            f"(listed in {out / 'errors.jsonl'})")
