"""``hms-train``: train HMS (or an early-fusion baseline) on a feature store."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from hms_deploy.cli.common import debug_option, flag_advice, given, handle_errors, set_threads


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--store", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Feature store written by hms-extract.")
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The checkpoint the store was extracted with (its backbones are kept).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the trained ckpt.pt (the best validation epoch).")
@click.option("--policy", type=click.Choice(["hms", "early_fusion"]), default="hms",
              show_default=True, help="HMS, or an LSTM over concatenated features (baseline).")
@click.option("--modalities", default="A+I+M", show_default=True,
              help="early_fusion: '+'-joined subset of A (audio), I (appearance), M (motion).")
@click.option("--preset", type=click.Choice(["auto", "small", "paper"]), default="auto",
              show_default=True,
              help="Defaults of --epochs/--lr/--lr-decay/--lambda: 'paper' (docs/method.md §4: 30 "
                   "epochs, lr 1e-4 x0.92/epoch, lambda 2; for large datasets), 'small' (60 "
                   "epochs, early fusion 40; lr 1e-3 x0.97/epoch; lambda 5; learns on a few "
                   "hundred videos); 'auto': small below 2000 training videos. Options given "
                   "explicitly win.")
@click.option("--epochs", type=int, default=None, help="Epochs (default: the preset's).")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--lr", type=float, default=None,
              help="Adam learning rate (default: the preset's).")
@click.option("--lr-decay", type=float, default=None,
              help="lr multiplier after every epoch (default: the preset's).")
@click.option("--tau", type=float, default=5.0, show_default=True,
              help="Initial Gumbel-softmax temperature.")
@click.option("--tau-decay", type=float, default=0.965, show_default=True,
              help="Temperature multiplier per epoch.")
@click.option("--lambda", "lam", type=float, default=None,
              help="Weight of the usage loss (default: the preset's).")
@click.option("--gamma-i", type=float, default=0.6, show_default=True,
              help="Target fraction of steps that run appearance.")
@click.option("--gamma-m", type=float, default=None,
              help="Target fraction of steps that run motion (default: the preset's: paper 0.05, "
                   "small 0).")
@click.option("--hidden", type=int, default=None,
              help="early_fusion: LSTM hidden size (default: the model's H_M).")
@click.option("--val-fraction", type=float, default=0.2, show_default=True,
              help="Stratified fraction of the store held out for validation.")
@click.option("--val-store", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Validate on this store instead of a split of --store.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--log", "log_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSON log, one entry per epoch (loss, CE, usage, val mAP, val GMAC/video).")
@click.option("--threads", type=int, default=None,
              help="torch intra-op threads in this process (default: torch's choice).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@debug_option
@handle_errors("hms-train")
def main(
    store: Path,
    checkpoint: Path,
    out: Path,
    policy: str,
    modalities: str,
    preset: str,
    epochs: int | None,
    batch_size: int,
    lr: float | None,
    lr_decay: float | None,
    tau: float,
    tau_decay: float,
    lam: float | None,
    gamma_i: float,
    gamma_m: float | None,
    hidden: int | None,
    val_fraction: float,
    val_store: Path | None,
    seed: int,
    log_path: Path | None,
    threads: int | None,
    quiet: bool,
    debug: bool,
) -> None:
    """Train projections, cells, gates and head on frozen features; keep the best epoch."""
    from hms_deploy.checkpoint import load_checkpoint
    from hms_deploy.data.features import open_store
    from hms_deploy.model.baselines import modalities_tag, parse_modalities
    from hms_deploy.train.loop import TrainConfig, train
    from hms_deploy.train.presets import preset_values, resolve_preset

    flags = given(epochs=epochs, lr=lr, lr_decay=lr_decay, lam=lam, gamma_m=gamma_m)

    def config(base: dict[str, Any]) -> TrainConfig:
        values = {**base, **flags}
        return TrainConfig(
            policy=policy, modalities=parse_modalities(modalities) if policy == "early_fusion"
            else ["audio", "appearance", "motion"],
            epochs=values["epochs"], batch_size=batch_size, lr=values["lr"],
            lr_decay=values["lr_decay"], tau=tau, tau_decay=tau_decay, lam=values["lam"],
            gamma_i=gamma_i, gamma_m=values["gamma_m"], val_fraction=val_fraction, seed=seed, hidden=hidden,
        )

    config(asdict(TrainConfig())).check()  # option errors (exit 2) before anything is loaded
    set_threads(threads)
    train_store = open_store(store)
    n_train = len(train_store) if val_store else round(len(train_store) * (1 - val_fraction))
    chosen = resolve_preset(preset, n_train)
    cfg = config({**asdict(TrainConfig()), **preset_values(chosen, policy)})
    cfg.check()
    if not quiet:
        click.echo(f"hms-train: preset {chosen}"
                   + (f" (auto: ~{n_train} training videos)" if preset == "auto" else "")
                   + f": {cfg.epochs} epochs, lr {cfg.lr:g} x{cfg.lr_decay:g}/epoch"
                   + (f", lambda {cfg.lam:g}, gamma_M {cfg.gamma_m:g}" if policy == "hms" else ""),
                   err=True)
    ckpt = load_checkpoint(checkpoint)
    if ckpt.policy != "hms":
        from hms_deploy.errors import CheckpointError

        raise CheckpointError(f"{checkpoint}: train from an HMS checkpoint (hms-init or "
                              f"hms-train output), not a {ckpt.policy!r} baseline")
    result = train(
        ckpt, train_store, cfg,
        val_store=open_store(val_store) if val_store else None,
        out=out, log_path=log_path, progress=not quiet,
    )
    for w in result.warnings:
        click.echo(f"hms-train: warning: {flag_advice(w)}", err=True)
    best = result.log[result.best_epoch - 1]
    what = policy if policy == "hms" else f"early_fusion {modalities_tag(cfg.modalities)}"
    click.echo(
        f"wrote {out} ({what}): best epoch {result.best_epoch}/{cfg.epochs}, val mAP "
        f"{best['val_map']:.4f}, top-1 {best['val_top1']:.4f}, "
        f"{best['val_gmacs_per_video']:.4g} GMAC/video"
    )
