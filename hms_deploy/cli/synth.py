"""``hms-synth``: write the synthetic dataset, the benchmark reference video or a demo sample."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from hms_deploy.errors import HMSError, first_line


def _one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except HMSError as e:
            click.echo(f"hms-synth: error: {first_line(e)}", err=True)
            sys.exit(1)

    return wrapper


@click.group()
def main() -> None:
    """Synthetic H.264/AAC videos for tests, demos and benchmarks."""


@main.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--per-class", type=int, default=10, show_default=True, help="Videos per class.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--split", is_flag=True, help="Also write train.csv, val.csv and test.csv.")
@click.option("--duration", type=float, default=4.0, show_default=True, help="Seconds.")
@click.option("--fps", type=float, default=15.0, show_default=True)
@_one_line_errors
def dataset(out: Path, per_class: int, seed: int, split: bool, duration: float, fps: float) -> None:
    """Write the 6-class dataset (audio / appearance / motion groups) into OUT."""
    from hms_deploy.data.synthetic import make_dataset

    csv_path = make_dataset(
        out, per_class=per_class, seed=seed, split=split, duration_s=duration, fps=fps
    )
    click.echo(str(csv_path))


@main.command()
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--duration", type=float, default=60.0, show_default=True, help="Seconds.")
@_one_line_errors
def reference(out: Path, duration: float) -> None:
    """Write the benchmark video (60 s, 640x360, 30 fps, keyframe every 2 s) to OUT."""
    from hms_deploy.data.synthetic import make_reference_video

    click.echo(str(make_reference_video(out, duration_s=duration)))


@main.command()
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--label", type=str, default=None, help="Class to show (default: by seed).")
@_one_line_errors
def sample(out: Path, seed: int, label: str | None) -> None:
    """Write a 4 s demo sample to OUT and print the class it shows."""
    from hms_deploy.data.synthetic import make_sample_video

    click.echo(make_sample_video(out, seed, label=label))


if __name__ == "__main__":  # pragma: no cover
    main()
