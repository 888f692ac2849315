"""``hms-synth``: write the synthetic dataset, the benchmark reference video or a demo sample."""

from __future__ import annotations

from pathlib import Path

import click

from hms_deploy.cli.common import debug_option, handle_errors

HELP = {"help_option_names": ["-h", "--help"]}


@click.group(context_settings=HELP)
def main() -> None:
    """Synthetic H.264/AAC videos for tests, demos and benchmarks."""


@main.command(context_settings=HELP)
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--per-class", type=int, default=10, show_default=True, help="Videos per class.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--split", is_flag=True, help="Also write train.csv, val.csv and test.csv.")
@click.option("--duration", type=float, default=4.0, show_default=True, help="Seconds.")
@click.option("--fps", type=float, default=15.0, show_default=True)
@click.option("--workers", type=int, default=1, show_default=True,
              help="Processes that render the videos (the videos do not depend on it).")
@debug_option
@handle_errors("hms-synth")
def dataset(out: Path, per_class: int, seed: int, split: bool, duration: float, fps: float,
            workers: int, debug: bool) -> None:
    """Write the 6-class dataset (audio / appearance / motion groups) into OUT."""
    from hms_deploy.data.synthetic import make_dataset

    csv_path = make_dataset(
        out, per_class=per_class, seed=seed, split=split, duration_s=duration, fps=fps,
        workers=workers,
    )
    click.echo(str(csv_path))


@main.command(context_settings=HELP)
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--duration", type=float, default=60.0, show_default=True, help="Seconds.")
@debug_option
@handle_errors("hms-synth")
def reference(out: Path, duration: float, debug: bool) -> None:
    """Write the benchmark video (60 s, 640x360, 30 fps, keyframe every 2 s) to OUT."""
    from hms_deploy.data.synthetic import make_reference_video

    click.echo(str(make_reference_video(out, duration_s=duration)))


@main.command(context_settings=HELP)
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--label", type=str, default=None, help="Class to show (default: by seed).")
@debug_option
@handle_errors("hms-synth")
def sample(out: Path, seed: int, label: str | None, debug: bool) -> None:
    """Write a 4 s demo sample to OUT and print the class it shows."""
    from hms_deploy.data.synthetic import make_sample_video

    click.echo(make_sample_video(out, seed, label=label))


if __name__ == "__main__":  # pragma: no cover
    main()
