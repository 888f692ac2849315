"""``hms-synth``: write the synthetic dataset, the benchmark reference video or a demo sample."""

from __future__ import annotations

from pathlib import Path

import click

from hms_deploy.cli.common import debug_option, given, handle_errors
from hms_deploy.data.synthetic import (
    CLIP_DURATION_S,
    CLIP_FPS,
    REFERENCE_DURATION_S,
    RENDER_WORKERS,
)

HELP = {"help_option_names": ["-h", "--help"]}


@click.group(context_settings=HELP)
def main() -> None:
    """Synthetic H.264/AAC videos for tests, demos and benchmarks."""


@main.command(context_settings=HELP)
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--per-class", type=int, default=10, show_default=True, help="Videos per class.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--split", is_flag=True, help="Also write train.csv, val.csv and test.csv.")
@click.option("--duration", type=float, default=None,
              help=f"Seconds per video. [default: {CLIP_DURATION_S:g}]")
@click.option("--fps", type=float, default=None, help=f"Frame rate. [default: {CLIP_FPS:g}]")
@click.option("--workers", type=int, default=None,
              help="Processes that render the videos (the videos do not depend on it). "
                   f"[default: {RENDER_WORKERS}]")
@debug_option
@handle_errors("hms-synth")
def dataset(out: Path, per_class: int, seed: int, split: bool, duration: float | None,
            fps: float | None, workers: int | None, debug: bool) -> None:
    """Write the 6-class dataset (audio / appearance / motion groups) into OUT."""
    from hms_deploy.data.synthetic import make_dataset

    csv_path = make_dataset(out, per_class=per_class, seed=seed, split=split,
                            **given(duration_s=duration, fps=fps, workers=workers))
    click.echo(str(csv_path))


@main.command(context_settings=HELP)
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--duration", type=float, default=None,
              help=f"Seconds. [default: {REFERENCE_DURATION_S:g}]")
@debug_option
@handle_errors("hms-synth")
def reference(out: Path, duration: float | None, debug: bool) -> None:
    """Write the benchmark video (60 s, 640x360, 30 fps, keyframe every 2 s) to OUT."""
    from hms_deploy.data.synthetic import make_reference_video

    click.echo(str(make_reference_video(out, **given(duration_s=duration))))


@main.command(context_settings=HELP)
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--seed", type=int, default=None, help="Seed of the sample. [default: 0]")
@click.option("--label", type=str, default=None, help="Class to show (default: by seed).")
@debug_option
@handle_errors("hms-synth")
def sample(out: Path, seed: int | None, label: str | None, debug: bool) -> None:
    """Write a 4 s demo sample to OUT and print the class it shows."""
    from hms_deploy.data.synthetic import make_sample_video

    click.echo(make_sample_video(out, **given(seed=seed), label=label))


if __name__ == "__main__":  # pragma: no cover
    main()
