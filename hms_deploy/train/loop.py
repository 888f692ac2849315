"""Training on frozen features (docs/method.md §4): HMS or an early-fusion baseline.

Only projections, cells, gates and head are trained; the encoders of the source
checkpoint are carried into the output unchanged. Features are standardised per
dimension with statistics of the training videos; the standardisation is folded into the
projections' Linear layers when a checkpoint is written, so the model graph (and every
export) is unchanged and the checkpoint consumes raw features. Adam, lr multiplied by ``lr_decay``
after every epoch, Gumbel temperature ``tau * tau_decay**epoch``; after every epoch the
model is validated with argmax decisions and the checkpoint with the best validation mAP
(ties: the lower validation cross-entropy, then the earlier epoch) is kept. The
cross-entropy breaks ties because on a small validation set mAP saturates at 1.0 within
a few epochs while the model still spreads its probability over every class; a tie-break
on cost would keep such an early, barely-trained epoch.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from hms_deploy.checkpoint import Checkpoint, save_checkpoint
from hms_deploy.config import MODALITIES
from hms_deploy.data.feature_batches import FeatureSource, stratified_split
from hms_deploy.data.features import FeatureStore
from hms_deploy.data.store_meta import backbone_hash
from hms_deploy.errors import DatasetError
from hms_deploy.metrics import mean_average_precision, top1_accuracy
from hms_deploy.model.baselines import EarlyFusion
from hms_deploy.model.hms import HMS
from hms_deploy.train.config import TrainConfig
from hms_deploy.train.losses import hms_loss


@dataclass
class TrainResult:
    checkpoint: Checkpoint
    best_epoch: int
    best_val_map: float
    log: list[dict[str, Any]]
    warnings: list[str] = field(default_factory=list)  # e.g. a too small validation set


def _write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def _encoder_state(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    return {k: v for k, v in ckpt.state_dict.items() if ".encoder." in k}


def build_trainable(ckpt: Checkpoint, cfg: TrainConfig) -> HMS | EarlyFusion:
    """The model to train: HMS (weights from ``ckpt``) or a fresh early-fusion baseline."""
    if cfg.policy == "hms":
        model = HMS(ckpt.config)
        model.load_state_dict(ckpt.state_dict, strict=False)
        for m in MODALITIES:
            getattr(model, f"{m}_backbone").encoder.requires_grad_(False)
        return model
    return EarlyFusion(ckpt.config, cfg.modalities, cfg.hidden)


def trainable_parameters(model: nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if ".encoder." not in n and p.requires_grad]


def validate(model: HMS | EarlyFusion, source: FeatureSource, costs: dict[str, float]) -> dict[str, Any]:
    """mAP, top-1, GMAC/video and usage with argmax decisions."""
    from hms_deploy.eval.predict import predict_early_fusion, predict_hms

    if isinstance(model, HMS):
        pred = predict_hms(model, source, costs)
    else:
        pred = predict_early_fusion(model, source, costs)
    labels = source.labels.numpy()
    p_true = pred.scores[np.arange(len(labels)), labels] if len(labels) else np.ones(0)
    out: dict[str, Any] = {
        "val_map": mean_average_precision(pred.scores, labels),
        "val_top1": top1_accuracy(pred.scores, labels),
        "val_ce": float(-np.log(np.clip(p_true, 1e-12, None)).mean()) if len(labels) else 0.0,
        "val_gmacs_per_video": float(pred.gmacs.mean()),
    }
    if pred.appearance is not None and pred.motion is not None:
        out["val_usage"] = {"appearance": float(pred.appearance.mean()),
                            "motion": float(pred.motion.mean())}
    return out


def fold_normalization(state_dict: dict[str, torch.Tensor], key: str,
                       stats: tuple[NDArray[np.float64], NDArray[np.float64]]) -> None:
    """Fold ``x_n = (x - mean) / std`` into the Linear ``key`` (``key.weight``, ``key.bias``),
    in place: ``W x_n + b = (W / std) x + (b - (W / std) mean)``, computed in float64."""
    mu, sd = (torch.from_numpy(np.asarray(a, dtype=np.float64)) for a in stats)
    w = state_dict[f"{key}.weight"].double()
    b = state_dict[f"{key}.bias"].double()
    w_raw = w / sd.unsqueeze(0)
    state_dict[f"{key}.weight"] = w_raw.float()
    state_dict[f"{key}.bias"] = (b - w_raw @ mu).float()


def make_checkpoint(ckpt: Checkpoint, model: HMS | EarlyFusion, cfg: TrainConfig, store: FeatureStore,
                    stats: dict[str, tuple[NDArray[np.float64], NDArray[np.float64]]],
                    extra: dict[str, Any]) -> Checkpoint:
    """The output checkpoint: trained weights (feature standardisation folded into the
    projections) + the source encoders unchanged; T = the store's."""
    config = ckpt.config.replace(steps=store.steps)
    info = {"training": {**asdict(cfg), **extra}, "store_backbone_hash": store.meta.backbone_hash}
    if isinstance(model, HMS):
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for m, st in stats.items():
            fold_normalization(sd, f"{m}_backbone.projection.linear", st)
        for k, v in _encoder_state(ckpt).items():  # the encoders travel unchanged
            if not torch.equal(sd[k], v):
                raise RuntimeError(f"encoder weight {k} changed during training")
            sd[k] = v
        return Checkpoint(config=config, state_dict=sd, labels=list(ckpt.labels),
                          costs=dict(ckpt.costs), policy="hms", modalities=list(MODALITIES),
                          extra={**ckpt.extra, **info})
    from hms_deploy.model.baselines import early_fusion_state_dict

    costs = {**ckpt.costs, **model.measure_costs()}
    sd = early_fusion_state_dict(model, _encoder_state(ckpt))
    for m, st in stats.items():
        fold_normalization(sd, f"early_fusion.projection.{m}.linear", st)
    return Checkpoint(config=config, state_dict=sd,
                      labels=list(ckpt.labels), costs=costs, policy="early_fusion",
                      modalities=list(model.modalities),
                      extra={**info, "early_fusion_hidden": model.hidden})


def train(
    ckpt: Checkpoint,
    store: FeatureStore,
    cfg: TrainConfig,
    *,
    val_store: FeatureStore | None = None,
    out: str | os.PathLike[str] | None = None,
    log_path: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train on ``store`` (features extracted with ``ckpt``'s backbones); see the module doc.

    Validation uses ``val_store`` if given, else a stratified ``cfg.val_fraction`` of
    ``store``. With ``out`` the best checkpoint is written (atomically) whenever it
    improves; with ``log_path`` the per-epoch log is rewritten after every epoch.
    """
    from tqdm import tqdm

    cfg.check()
    want = backbone_hash(ckpt.config, ckpt.state_dict)
    store.check_backbones(want)
    if store.labels != list(ckpt.labels):
        raise DatasetError(f"{store.root}: store labels differ from the checkpoint's")
    if len(store) == 0:
        raise DatasetError(f"{store.root}: the store holds no video")
    torch.manual_seed(cfg.seed)
    labels = store.label_indices()
    if val_store is not None:
        val_store.check_backbones(want, "checkpoint (validation store)")
        if val_store.steps != store.steps or val_store.labels != store.labels:
            raise DatasetError(f"{val_store.root}: T or labels differ from the training store")
        train_idx = np.arange(len(store))
        val_src = FeatureSource(val_store, None, _mods(cfg))
    else:
        train_idx, val_idx = stratified_split(labels, cfg.val_fraction, cfg.seed)
        val_src = FeatureSource(store, val_idx, _mods(cfg))
    train_src = FeatureSource(store, train_idx, _mods(cfg))
    from hms_deploy.train.presets import small_validation_warning

    small_val = small_validation_warning(val_src.labels.numpy(), list(store.labels))
    warnings: list[str] = [] if small_val is None else [small_val]
    # Standardise features with training statistics; folded into the projections on save.
    stats = train_src.statistics()
    train_src.set_normalizer(stats)
    val_src.set_normalizer(stats)

    model = build_trainable(ckpt, cfg)
    costs = dict(ckpt.costs)
    if isinstance(model, EarlyFusion):
        costs.update(model.measure_costs())
    params = trainable_parameters(model)
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=cfg.lr_decay)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    log: list[dict[str, Any]] = []
    best: tuple[float, float] | None = None  # (val mAP, -val cross-entropy)
    best_epoch, best_ckpt = -1, None
    bar = tqdm(total=cfg.epochs, unit="epoch", desc=f"train {cfg.policy}", disable=not progress,
               dynamic_ncols=True)
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        tau = cfg.tau * cfg.tau_decay ** epoch
        lr = opt.param_groups[0]["lr"]
        model.train()
        sums = {"loss": 0.0, "ce": 0.0, "usage": 0.0, "appearance": 0.0, "motion": 0.0}
        seen = 0
        for _, feats, y in train_src.batches(cfg.batch_size, shuffle=True, generator=rng):
            if isinstance(model, HMS):
                out_ = model.masked_forward(feats, tau=tau, generator=gen)
                loss, ce, usage = hms_loss(out_.logits, y, out_.appearance, out_.motion,
                                           lam=cfg.lam, gamma_i=cfg.gamma_i, gamma_m=cfg.gamma_m)
                sums["appearance"] += float(out_.appearance.detach().mean()) * len(y)
                sums["motion"] += float(out_.motion.detach().mean()) * len(y)
            else:
                ce = torch.nn.functional.cross_entropy(model(feats), y)
                loss, usage = ce, torch.zeros(())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for k, v in (("loss", loss), ("ce", ce), ("usage", usage)):
                sums[k] += float(v.detach()) * len(y)
            seen += len(y)
        sched.step()
        model.eval()
        val = validate(model, val_src, costs)
        entry: dict[str, Any] = {
            "epoch": epoch + 1, "lr": lr, "tau": tau if cfg.policy == "hms" else None,
            "loss": sums["loss"] / seen, "ce": sums["ce"] / seen, "usage": sums["usage"] / seen,
        }
        if cfg.policy == "hms":
            entry["train_usage"] = {"appearance": sums["appearance"] / seen,
                                    "motion": sums["motion"] / seen}
        entry.update(val)
        score = (val["val_map"] if not math.isnan(val["val_map"]) else -1.0, -val["val_ce"])
        improved = best is None or score > best
        entry["best"] = improved
        entry["time_s"] = time.perf_counter() - t0
        log.append(entry)
        if improved:
            best, best_epoch = score, epoch + 1
            best_ckpt = make_checkpoint(ckpt, model, cfg, store, stats, {
                "best_epoch": best_epoch, "val_map": val["val_map"],
                "val_gmacs_per_video": val["val_gmacs_per_video"],
            })
            if out is not None:
                save_checkpoint(best_ckpt, out)
        if log_path is not None:
            _write_json_atomic(Path(log_path), {"config": asdict(cfg), "epochs": log,
                                                "best_epoch": best_epoch, "warnings": warnings})
        bar.update(1)
        bar.set_postfix(loss=f"{entry['loss']:.3f}", val_map=f"{val['val_map']:.3f}",
                        gmac=f"{val['val_gmacs_per_video']:.3g}", refresh=False)
    bar.close()
    assert best_ckpt is not None and best is not None
    return TrainResult(best_ckpt, best_epoch, best[0], log, warnings)


def _mods(cfg: TrainConfig) -> list[str]:
    return list(MODALITIES) if cfg.policy == "hms" else list(cfg.modalities)
