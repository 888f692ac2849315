"""Fine-tuning backbones on the target data: the separate, earlier step of HMS_SPEC.md 8.

HMS trains on frozen features, so the backbones must already produce discriminative
features for the target classes (the paper fine-tunes its ImageNet/Kinetics backbones on
FCVID/ActivityNet first). :func:`finetune_backbones` trains the encoders of the chosen
modalities with a temporary per-step classifier and cross-entropy, on single-step
inputs (the step's log-mel patch, frame and clip, labelled with its video's class), a
few random steps per video and epoch:

- ``head="joint"`` (default): one classifier over the concatenated raw features of all
  three modalities (BatchNorm without affine, then Linear); the encoders not being
  fine-tuned run frozen. Classes that another modality already separates stop
  contributing loss early, so the gradient reaching a fine-tuned encoder concentrates on
  what only it can tell apart (e.g. the motion encoder on left vs right drift);
- ``head="separate"``: one classifier per fine-tuned modality over its own feature.

Afterwards BatchNorm statistics of the fine-tuned encoders are recomputed with the final
weights, the classifier is dropped, and a new checkpoint is returned whose encoders of
those modalities are the fine-tuned ones. The graph is unchanged, so the measured part
costs are too; projections, cells, gates and head are kept as they were (train them
afterwards, on features extracted with the new encoders).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from hms_deploy.checkpoint import Checkpoint
from hms_deploy.config import MODALITIES
from hms_deploy.data.extraction import build_encoders, iter_inputs
from hms_deploy.data.inputs import VideoInputs
from hms_deploy.errors import ConfigError, DatasetError


@dataclass
class FinetuneConfig:
    """Which encoders to fine-tune and how (single-step inputs, Adam)."""

    modalities: list[str] = field(default_factory=lambda: ["motion"])
    epochs: int = 3
    steps_per_video: int = 4  # random steps drawn per video and epoch
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0
    workers: int = 1  # decoding processes
    bn_recalibration_steps: int = 2  # random steps per video for the final BatchNorm statistics
    head: str = "joint"  # "joint": one classifier over all three modalities' features;
    #                      "separate": one classifier per fine-tuned modality, on its own
    focus: bool = True  # after the first epoch, draw videos of class c with probability
    #                     proportional to max(1 - train accuracy of c, 0.05)

    def check(self) -> None:
        bad = [m for m in self.modalities if m not in MODALITIES]
        if bad or not self.modalities:
            raise ConfigError(f"fine-tune modalities {self.modalities}: expected names from "
                              f"{MODALITIES}")
        if self.head not in ("joint", "separate"):
            raise ConfigError(f"fine-tune head {self.head!r}, expected 'joint' or 'separate'")
        if min(self.epochs, self.steps_per_video, self.batch_size) < 1 or not self.lr > 0:
            raise ConfigError("fine-tune epochs, steps_per_video, batch_size and lr must be > 0")


def _step_input(inputs: VideoInputs, modality: str, t: int) -> np.ndarray:
    if modality == "audio":
        return inputs.mel[t]
    if modality == "appearance":
        return inputs.frames[t]
    return inputs.clips(np.array([t]))[0]


def _batch(videos: list[VideoInputs], pairs: np.ndarray, modality: str) -> torch.Tensor:
    return torch.from_numpy(np.stack([_step_input(videos[i], modality, t) for i, t in pairs]))


def decode_dataset(entries, ckpt: Checkpoint, steps: int, workers: int,
                   progress: bool = True) -> tuple[list[VideoInputs], np.ndarray, list[str]]:
    """Decode every entry (label must be one of the checkpoint's): inputs, labels, errors."""
    from tqdm import tqdm

    index = {name: i for i, name in enumerate(ckpt.labels)}
    videos, labels, errors = [], [], []
    good = []
    for e in entries:
        if e.label in index:
            good.append(e)
        else:
            errors.append(f"{e.key}: unknown label {e.label!r}")
    bar = tqdm(total=len(good), unit="video", desc="decode", disable=not progress,
               dynamic_ncols=True)
    for e, inputs, error in iter_inputs(good, ckpt.config, steps, workers):
        if error is None:
            videos.append(inputs)
            labels.append(index[e.label])
        else:
            errors.append(error)
        bar.update(1)
    bar.close()
    return videos, np.array(labels, dtype=np.int64), errors


class StepClassifier(nn.Module):
    """Encoders of ``inputs`` -> concatenated raw features -> BatchNorm (no affine) -> Linear.

    The encoders of ``trainable`` are trained; the others run frozen, in eval mode.
    """

    def __init__(self, encoders: dict[str, nn.Module], inputs: list[str], trainable: list[str],
                 feat_dims: dict[str, int], num_classes: int):
        super().__init__()
        self.inputs, self.trainable = list(inputs), list(trainable)
        self.encoders = nn.ModuleDict({m: encoders[m] for m in inputs})
        for m in inputs:
            self.encoders[m].requires_grad_(m in trainable)
        dim = sum(feat_dims[m] for m in inputs)
        self.norm = nn.BatchNorm1d(dim, affine=False)
        self.linear = nn.Linear(dim, num_classes)

    def set_mode(self, training: bool) -> None:
        self.train(training)
        for m in self.inputs:
            if m not in self.trainable:
                self.encoders[m].eval()

    def forward(self, videos: list[VideoInputs], pairs: np.ndarray) -> torch.Tensor:
        feats = []
        for m in self.inputs:
            x = _batch(videos, pairs, m)
            if m in self.trainable:
                feats.append(self.encoders[m](x))
            else:
                with torch.no_grad():
                    feats.append(self.encoders[m](x))
        return self.linear(self.norm(torch.cat(feats, dim=1)))


@torch.no_grad()
def _accuracy(model: StepClassifier, videos: list[VideoInputs], labels: np.ndarray,
              pairs: np.ndarray, batch_size: int) -> tuple[float, list[float]]:
    """Single-step accuracy over ``pairs``, overall and per class (NaN: class absent)."""
    model.set_mode(False)
    hits = np.zeros(len(pairs), dtype=bool)
    for a in range(0, len(pairs), batch_size):
        p = pairs[a:a + batch_size]
        hits[a:a + len(p)] = model(videos, p).argmax(1).numpy() == labels[p[:, 0]]
    y = labels[pairs[:, 0]]
    per_class = [float(hits[y == c].mean()) if (y == c).any() else float("nan")
                 for c in range(int(model.linear.out_features))]
    return float(hits.mean()) if len(hits) else float("nan"), per_class


@torch.no_grad()
def _recalibrate_batchnorm(encoder: nn.Module, videos: list[VideoInputs], modality: str,
                           pairs: np.ndarray, batch_size: int) -> None:
    """Recompute BatchNorm running statistics as plain averages over ``pairs`` with the
    final weights ("precise BN"): the running averages of training lag the weights."""
    bns = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or len(pairs) == 0:
        return
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    encoder.train()
    for a in range(0, len(pairs), batch_size):
        encoder(_batch(videos, pairs[a:a + batch_size], modality))
    for bn, mom in zip(bns, saved):
        bn.momentum = mom
    encoder.eval()


def _draw_pairs(rng: np.random.Generator, n_videos: int, steps: int, k: int,
                weights: np.ndarray | None = None) -> np.ndarray:
    """(video, step) pairs, shuffled: ``k`` distinct random steps of every video, or with
    ``weights`` (per video) ``n_videos * k`` pairs of videos drawn in proportion to them."""
    if weights is not None:
        vids = rng.choice(n_videos, n_videos * k, p=weights / weights.sum())
        return np.stack([vids, rng.integers(0, steps, vids.size)], axis=1)
    k = min(k, steps)
    pairs = np.array([(i, t) for i in range(n_videos) for t in rng.choice(steps, k, replace=False)])
    return pairs[rng.permutation(len(pairs))]


def finetune_backbones(
    ckpt: Checkpoint,
    train_entries,
    cfg: FinetuneConfig,
    *,
    val_entries=None,
    steps: int | None = None,
    progress: bool = True,
) -> tuple[Checkpoint, dict[str, Any]]:
    """Fine-tune the encoders of ``cfg.modalities`` on ``train_entries`` (dataset rows).

    Returns the new checkpoint (only those encoders' tensors differ) and a report with
    per-epoch loss and single-step accuracy (train; val on the same number of random
    steps of ``val_entries`` if given), before and after.
    """
    from tqdm import tqdm

    cfg.check()
    t0 = time.perf_counter()
    steps = int(steps or ckpt.config.steps)
    videos, labels, errors = decode_dataset(train_entries, ckpt, steps, cfg.workers, progress)
    if not videos:
        raise DatasetError("fine-tuning: no decodable training video")
    val = decode_dataset(val_entries, ckpt, steps, cfg.workers, progress) if val_entries else None
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    encoders = build_encoders(ckpt.config, ckpt.state_dict)
    feat_dims = {m: ckpt.config.backbone(m).feat_dim for m in MODALITIES}
    new_state = dict(ckpt.state_dict)
    report: dict[str, Any] = {"config": asdict(cfg), "steps": steps, "videos": len(videos),
                              "decode_errors": errors, "runs": []}
    if cfg.head == "joint":
        runs = [(list(MODALITIES), list(cfg.modalities))]
    else:
        runs = [([m], [m]) for m in cfg.modalities]
    val_pairs = (_draw_pairs(np.random.default_rng(cfg.seed + 1), len(val[0]), steps,
                             cfg.steps_per_video) if val and val[0] else None)
    for inputs, trainable in runs:
        model = StepClassifier(encoders, inputs, trainable, feat_dims, ckpt.config.num_classes)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=cfg.lr)
        name = "+".join(trainable)
        epochs = []
        weights = None  # per-video sampling weights (focus on the classes still confused)
        for epoch in range(cfg.epochs):
            pairs = _draw_pairs(rng, len(videos), steps, cfg.steps_per_video, weights)
            model.set_mode(True)
            total, seen, correct = 0.0, 0, 0
            class_hits = np.zeros(ckpt.config.num_classes)
            class_seen = np.zeros(ckpt.config.num_classes)
            bar = tqdm(total=len(pairs), unit="step",
                       desc=f"finetune {name} {epoch + 1}/{cfg.epochs}", disable=not progress,
                       dynamic_ncols=True)
            for a in range(0, len(pairs), cfg.batch_size):
                p = pairs[a:a + cfg.batch_size]
                if len(p) < 2:
                    continue  # BatchNorm needs 2 samples
                y = torch.from_numpy(labels[p[:, 0]])
                logits = model(videos, p)
                loss = nn.functional.cross_entropy(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(p)
                seen += len(p)
                ok = (logits.argmax(1) == y).numpy()
                correct += int(ok.sum())
                np.add.at(class_hits, y.numpy(), ok)
                np.add.at(class_seen, y.numpy(), 1)
                bar.update(len(p))
            bar.close()
            class_acc = np.where(class_seen > 0, class_hits / np.maximum(class_seen, 1), 1.0)
            if cfg.focus:
                weights = np.maximum(1.0 - class_acc, 0.05)[labels]
            entry = {"epoch": epoch + 1, "loss": total / max(1, seen),
                     "train_step_accuracy": correct / max(1, seen),
                     "train_step_accuracy_per_class": dict(zip(ckpt.labels, class_acc.tolist()))}
            if val_pairs is not None:
                acc, per_class = _accuracy(model, val[0], val[1], val_pairs, cfg.batch_size)
                entry["val_step_accuracy"] = acc
                entry["val_step_accuracy_per_class"] = dict(zip(ckpt.labels, per_class))
            epochs.append(entry)
        recal = _draw_pairs(rng, len(videos), steps, cfg.bn_recalibration_steps)
        for m in trainable:
            _recalibrate_batchnorm(encoders[m], videos, m, recal, cfg.batch_size)
        if val_pairs is not None:
            acc, per_class = _accuracy(model, val[0], val[1], val_pairs, cfg.batch_size)
            epochs.append({"after_bn_recalibration": True, "val_step_accuracy": acc,
                           "val_step_accuracy_per_class": dict(zip(ckpt.labels, per_class))})
        for m in trainable:
            encoders[m].eval()
            for k, v in encoders[m].state_dict().items():
                key = f"{m}_backbone.encoder.{k}"
                if key not in new_state:
                    raise RuntimeError(f"fine-tuned tensor {key} not in the checkpoint")
                new_state[key] = v.detach().clone()
        report["runs"].append({"inputs": inputs, "trained": trainable, "epochs": epochs})
    report["seconds"] = time.perf_counter() - t0
    extra = {**ckpt.extra, "finetune": {k: v for k, v in report.items() if k != "decode_errors"}}
    out = Checkpoint(config=ckpt.config, state_dict=new_state, labels=list(ckpt.labels),
                     costs=dict(ckpt.costs), policy=ckpt.policy,
                     modalities=list(ckpt.modalities), extra=extra)
    return out, report
