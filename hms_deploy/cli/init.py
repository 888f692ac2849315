"""``hms-init``: write an untrained checkpoint (optionally with local pretrained backbones)."""

from __future__ import annotations

import time
from pathlib import Path

import click

from hms_deploy.cli.common import debug_option, given, handle_errors
from hms_deploy.config import MOTION_CROPS


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--variant", required=True, help="Model variant: paper or tiny.")
@click.option("--num-classes", type=int, required=True, help="Number of classes C.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write ckpt.pt.")
@click.option("--labels", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Text file, one class name a line (count must equal --num-classes).")
@click.option("--steps", type=int, default=None, help="Steps T (default: the variant's).")
@click.option("--motion-size", "motion_crop", type=int, default=None,
              help="paper variant: SlowFast crop size in pixels, "
                   f"{' or '.join(map(str, MOTION_CROPS))}. [default: {MOTION_CROPS[0]}]")
@click.option("--audio-weights", type=click.Path(path_type=Path), default=None,
              help="timm checkpoint for MobileNetV1 (3-channel stems are adapted to 1 channel).")
@click.option("--appearance-weights", type=click.Path(path_type=Path), default=None,
              help="timm checkpoint for EfficientNet-B3.")
@click.option("--motion-weights", type=click.Path(path_type=Path), default=None,
              help="pytorchvideo SlowFast R50 .pyth or state dict.")
@click.option("--seed", type=int, default=None,
              help="Seed for the random initialisation. [default: 0]")
@debug_option
@handle_errors("hms-init")
def main(
    variant: str,
    num_classes: int,
    out: Path,
    labels: Path | None,
    steps: int | None,
    motion_crop: int | None,
    audio_weights: Path | None,
    appearance_weights: Path | None,
    motion_weights: Path | None,
    seed: int | None,
    debug: bool,
) -> None:
    """Create an untrained HMS checkpoint with its config, labels and measured part costs."""
    from hms_deploy.checkpoint import init_checkpoint, read_labels, save_checkpoint
    from hms_deploy.config import make_config

    config = make_config(variant, num_classes, **given(steps=steps, motion_crop=motion_crop))
    names = read_labels(labels) if labels else None
    t0 = time.perf_counter()
    ckpt = init_checkpoint(
        config, labels=names, **given(seed=seed),
        weights={"audio": audio_weights, "appearance": appearance_weights,
                 "motion": motion_weights},
    )
    path = save_checkpoint(ckpt, out)
    size_mb = path.stat().st_size / 2**20
    c = ckpt.costs
    click.echo(
        f"wrote {path} ({variant}, {num_classes} classes, T={config.steps}, {size_mb:.1f} MiB, "
        f"{time.perf_counter() - t0:.1f} s); GMAC/step: audio {c['audio_backbone']:.3g}, "
        f"appearance {c['appearance_backbone']:.3g}, motion {c['motion_backbone']:.3g}"
    )
