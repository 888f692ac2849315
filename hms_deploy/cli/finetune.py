"""``hms-finetune``: fine-tune backbones of a checkpoint on a labelled video list."""

from __future__ import annotations

import json
from pathlib import Path

import click

from hms_deploy.cli.common import debug_option, flag_advice, given, handle_errors, set_threads
from hms_deploy.config import modalities_tag
from hms_deploy.train.config import VAL_FRACTION, FinetuneConfig, held_out_fraction

_FINETUNE = FinetuneConfig()  # the recipe's defaults


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="ckpt.pt (hms-init output) whose backbones are fine-tuned.")
@click.option("--list", "list_path", type=click.Path(dir_okay=False, path_type=Path),
              required=True, help="Training CSV 'path,label' (relative paths: its folder).")
@click.option("--val-list", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Validation CSV (early stopping, kept epoch); default: a stratified "
                   "--val-fraction of --list.")
@click.option("--val-fraction", type=float, default=None,
              help="Held out of --list for validation when --val-list is not given. "
                   f"[default: {VAL_FRACTION:g}]")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the checkpoint with the fine-tuned backbones.")
@click.option("--modalities", default=None,
              help="'+'-joined backbones to fine-tune: A (audio), I (appearance), M (motion). "
                   f"[default: {modalities_tag(_FINETUNE.modalities)}]")
@click.option("--epochs", type=int, default=None,
              help="At most this many epochs (the recipe: hms_deploy.train.config.FinetuneConfig). "
                   f"[default: {_FINETUNE.epochs}]")
@click.option("--lr", type=float, default=None,
              help=f"Adam learning rate (cosine decay). [default: {_FINETUNE.lr:g}]")
@click.option("--batch-size", type=int, default=None,
              help=f"Steps per batch. [default: {_FINETUNE.batch_size}]")
@click.option("--steps", type=int, default=None,
              help="Steps T per video to draw training steps from (default: the checkpoint's).")
@click.option("--workers", type=int, default=None,
              help=f"Decoding processes; 0 decodes in this process. [default: {_FINETUNE.workers}]")
@click.option("--no-colour-jitter", "no_jitter", is_flag=True,
              help="Do not jitter the colours of the visual inputs in training (the recipe "
                   "does; turn it off when colour shades tell your classes apart).")
@click.option("--seed", type=int, default=None,
              help=f"Seed of the split, initialisation and sampling. [default: {_FINETUNE.seed}]")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="JSON report: per-epoch loss and step accuracies.")
@click.option("--threads", type=int, default=None,
              help="torch intra-op threads in this process (default: torch's choice).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@debug_option
@handle_errors("hms-finetune")
def main(
    checkpoint: Path,
    list_path: Path,
    val_list: Path | None,
    val_fraction: float | None,
    out: Path,
    modalities: str | None,
    epochs: int | None,
    lr: float | None,
    batch_size: int | None,
    steps: int | None,
    workers: int | None,
    no_jitter: bool,
    seed: int | None,
    report_path: Path | None,
    threads: int | None,
    quiet: bool,
    debug: bool,
) -> None:
    """Fine-tune backbones on single steps of the videos of a CSV (the step before
    hms-extract: HMS trains on frozen features, so they must already tell the classes
    apart). The recipe (linear probe, schedule, colour jitter, early stopping, kept epoch,
    BatchNorm recalibration) is the one the synthetic quality study uses; bad videos are skipped and listed.
    """
    from hms_deploy.checkpoint import load_checkpoint, save_checkpoint
    from hms_deploy.config import parse_modalities
    from hms_deploy.data.datasets import read_list
    from hms_deploy.train.finetune import finetune_backbones, split_entries

    settings = given(seed=seed, workers=workers, epochs=epochs, lr=lr, batch_size=batch_size)
    if modalities is not None:
        settings["modalities"] = parse_modalities(modalities)
    cfg = FinetuneConfig(**settings, augment=not no_jitter)
    cfg.check()
    held_out = held_out_fraction(val_fraction, val_list, "val_list")
    set_threads(threads)
    ckpt = load_checkpoint(checkpoint)
    entries = read_list(list_path).entries
    if val_list is not None:
        train_entries, val_entries = entries, read_list(val_list).entries
    else:
        assert held_out is not None
        train_entries, val_entries = split_entries(entries, held_out, cfg.seed)
    new, report = finetune_backbones(ckpt, train_entries, cfg, val_entries=val_entries,
                                     steps=steps, progress=not quiet)
    save_checkpoint(new, out)
    report["warnings"] = [flag_advice(w) for w in report["warnings"]]
    if report_path is not None:
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(json.dumps(report, indent=2) + "\n")
    for w in report["warnings"]:
        click.echo(f"hms-finetune: warning: {w}", err=True)
    for e in report["decode_errors"][:10]:
        click.echo(f"  skipped: {e}", err=True)
    run = report["runs"][-1]
    kept = next((e["kept_epoch"] for e in run["epochs"] if "kept_epoch" in e), None)
    trained = [e for e in run["epochs"] if "epoch" in e]
    acc = run.get("val_step_accuracy")
    click.echo(
        f"wrote {out} ({'+'.join(cfg.modalities)} fine-tuned on {report['videos']} videos): "
        + (f"kept epoch {kept} of {len(trained)} run (at most {cfg.epochs}), "
           f"val step accuracy {acc:.4f} on {report['val_videos']} videos"
           if acc is not None else f"{len(trained)} epochs, no validation")
        + f", {report['seconds']:.0f} s")
