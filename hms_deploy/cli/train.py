"""``hms-train``: train HMS (or an early-fusion baseline) on a feature store."""

from __future__ import annotations

from pathlib import Path

import click

from hms_deploy.cli.common import debug_option, flag_advice, given, handle_errors, set_threads
from hms_deploy.train.config import POLICIES, TrainConfig, held_out_fraction
from hms_deploy.train.presets import PRESETS, SMALL_DATA_VIDEOS, preset_defaults

_TRAIN = TrainConfig()  # the defaults of the training settings


def _default(name: str) -> str:
    return f"[default: {getattr(_TRAIN, name):g}]"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--store", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Feature store written by hms-extract.")
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The checkpoint the store was extracted with (its backbones are kept).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the trained ckpt.pt (the best validation epoch).")
@click.option("--policy", default=None,
              help=f"{' or '.join(POLICIES)}: HMS, or an LSTM over concatenated features "
                   f"(baseline). [default: {_TRAIN.policy}]")
@click.option("--modalities", default=None,
              help="early_fusion: '+'-joined subset of A (audio), I (appearance), M (motion). "
                   "[default: A+I+M]")
@click.option("--preset", type=click.Choice(["auto", *PRESETS]), default="auto",
              show_default=True,
              help="Defaults of --epochs/--lr/--lr-decay/--lambda/--gamma-m: 'paper' "
                   "(docs/method.md §4; for large datasets), 'small' (learns on a few hundred "
                   f"videos); 'auto': small below {SMALL_DATA_VIDEOS} training videos. Options "
                   "given explicitly win.")
@click.option("--epochs", type=int, default=None,
              help=f"Epochs. [default: {preset_defaults('epochs')}]")
@click.option("--batch-size", type=int, default=None, help=f"Videos per batch. {_default('batch_size')}")
@click.option("--lr", type=float, default=None,
              help=f"Adam learning rate. [default: {preset_defaults('lr')}]")
@click.option("--lr-decay", type=float, default=None,
              help=f"lr multiplier after every epoch. [default: {preset_defaults('lr_decay')}]")
@click.option("--tau", type=float, default=None,
              help=f"HMS: initial Gumbel-softmax temperature. {_default('tau')}")
@click.option("--tau-decay", type=float, default=None,
              help=f"HMS: temperature multiplier after every epoch. {_default('tau_decay')}")
@click.option("--lambda", "lam", type=float, default=None,
              help=f"HMS: weight of the usage loss. [default: {preset_defaults('lam')}]")
@click.option("--gamma-i", type=float, default=None,
              help=f"HMS: target fraction of steps that run appearance. {_default('gamma_i')}")
@click.option("--gamma-m", type=float, default=None,
              help="HMS: target fraction of steps that run motion. "
                   f"[default: {preset_defaults('gamma_m')}]")
@click.option("--hidden", type=int, default=None,
              help="early_fusion: LSTM hidden size (default: the model's H_M).")
@click.option("--val-fraction", type=float, default=None,
              help="Stratified fraction of the store held out for validation. "
                   f"{_default('val_fraction')}")
@click.option("--val-store", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Validate on this store instead of a split of --store.")
@click.option("--seed", type=int, default=None, help=f"Seed of the split, initialisation and batches. {_default('seed')}")
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
    policy: str | None,
    modalities: str | None,
    preset: str,
    epochs: int | None,
    batch_size: int | None,
    lr: float | None,
    lr_decay: float | None,
    tau: float | None,
    tau_decay: float | None,
    lam: float | None,
    gamma_i: float | None,
    gamma_m: float | None,
    hidden: int | None,
    val_fraction: float | None,
    val_store: Path | None,
    seed: int | None,
    log_path: Path | None,
    threads: int | None,
    quiet: bool,
    debug: bool,
) -> None:
    """Train projections, cells, gates and head on frozen features; keep the best epoch."""
    from hms_deploy.checkpoint import load_checkpoint
    from hms_deploy.config import modalities_tag, parse_modalities
    from hms_deploy.data.features import open_store
    from hms_deploy.train.loop import train
    from hms_deploy.train.presets import preset_values, resolve_preset

    flags = given(policy=policy, epochs=epochs, batch_size=batch_size, lr=lr, lr_decay=lr_decay,
                  tau=tau, tau_decay=tau_decay, lam=lam, gamma_i=gamma_i, gamma_m=gamma_m,
                  hidden=hidden, val_fraction=val_fraction, seed=seed)
    if modalities is not None:
        flags["modalities"] = parse_modalities(modalities)
    held_out = held_out_fraction(val_fraction, val_store, "val_store")
    TrainConfig.from_settings(flags)  # option errors (exit 2) before anything is loaded
    set_threads(threads)
    train_store = open_store(store)
    n_train = len(train_store) if held_out is None else round(len(train_store) * (1 - held_out))
    chosen = resolve_preset(preset, n_train)
    cfg = TrainConfig.from_settings(flags, preset_values(chosen, flags.get("policy", _TRAIN.policy)))
    if not quiet:
        click.echo(f"hms-train: preset {chosen}"
                   + (f" (auto: ~{n_train} training videos)" if preset == "auto" else "")
                   + f": {cfg.epochs} epochs, lr {cfg.lr:g} x{cfg.lr_decay:g}/epoch"
                   + (f", lambda {cfg.lam:g}, gamma_M {cfg.gamma_m:g}" if cfg.policy == "hms" else ""),
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
    what = cfg.policy if cfg.policy == "hms" else f"early_fusion {modalities_tag(cfg.modalities)}"
    click.echo(
        f"wrote {out} ({what}): best epoch {result.best_epoch}/{cfg.epochs}, val mAP "
        f"{best['val_map']:.4f}, top-1 {best['val_top1']:.4f}, "
        f"{best['val_gmacs_per_video']:.4g} GMAC/video"
    )
