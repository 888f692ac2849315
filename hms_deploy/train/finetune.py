"""Fine-tuning backbones on the target data: the separate, earlier step of docs/method.md §8.

HMS trains on frozen features, so the backbones must already produce discriminative
features for the target classes (the paper fine-tunes its ImageNet/Kinetics backbones on
FCVID/ActivityNet first). :func:`finetune_backbones` trains the encoders of the chosen
modalities with a temporary per-step classifier and cross-entropy, on single-step
inputs (the step's log-mel patch, frame and clip, labelled with its video's class), a
few random steps per video and epoch (:mod:`hms_deploy.train.step_classifier`):

- ``head="joint"`` (default): one classifier over the concatenated raw features of all
  three modalities (BatchNorm without affine, then Linear); the encoders not being
  fine-tuned are frozen (their features are computed once and looked up). Classes that
  another modality already separates stop contributing loss early, so the gradient
  reaching a fine-tuned encoder concentrates on what only it can tell apart (e.g. the
  motion encoder on left vs right drift);
- ``head="separate"``: one classifier per fine-tuned modality over its own feature.

The schedule (:class:`FinetuneConfig`): Adam with
a cosine learning-rate decay over ``epochs``, validation single-step accuracy after
every epoch, early stopping (``patience`` epochs without improvement, or
``stop_accuracy`` reached) and the best validation epoch's weights kept. Afterwards
BatchNorm statistics of the fine-tuned encoders are recomputed with the kept weights,
the classifier is dropped, and a new checkpoint is returned whose encoders of those
modalities are the fine-tuned ones. The graph is unchanged, so the part costs
are too; projections, cells, gates and head are kept as they were (train them
afterwards, on features extracted with the new encoders).
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from hms_deploy.checkpoint import Checkpoint
from hms_deploy.config import MODALITIES
from hms_deploy.data.datasets import ListEntry
from hms_deploy.data.extraction import build_encoders, iter_inputs
from hms_deploy.data.inputs import VideoInputs
from hms_deploy.errors import DatasetError
from hms_deploy.train.config import FinetuneConfig, check_val_fraction
from hms_deploy.train.step_classifier import (
    StepClassifier,
    StepData,
    draw_pairs,
    frozen_features,
    linear_probe,
    recalibrate_batchnorm,
    step_accuracy,
)


def decode_dataset(entries: Sequence[ListEntry], ckpt: Checkpoint, steps: int, workers: int,
                   progress: bool = True) -> tuple[list[VideoInputs], NDArray[np.int64], list[str]]:
    """Decode every entry (label must be one of the checkpoint's): inputs, labels, errors."""
    from tqdm import tqdm

    index = {name: i for i, name in enumerate(ckpt.labels)}
    videos: list[VideoInputs] = []
    labels: list[int] = []
    errors: list[str] = []
    good = []
    for e in entries:
        if e.label in index:
            good.append(e)
        else:
            errors.append(f"{e.key}: unknown label {e.label!r}")
    bar = tqdm(total=len(good), unit="video", desc="decode", disable=not progress,
               dynamic_ncols=True)
    for e, inputs, error in iter_inputs(good, ckpt.config, steps, workers):
        if error is None and inputs is not None:
            videos.append(inputs)
            labels.append(index[e.label])
        else:
            errors.append(error or f"{e.key}: no inputs")
        bar.update(1)
    bar.close()
    return videos, np.array(labels, dtype=np.int64), errors


Decoded = tuple[list[VideoInputs], NDArray[np.int64]]


def split_entries(entries: Sequence[ListEntry], fraction: float, seed: int
                  ) -> tuple[list[ListEntry], list[ListEntry]]:
    """Stratified (train, val) split of dataset rows by label (as ``hms-train``'s)."""
    from hms_deploy.data.feature_batches import stratified_split

    check_val_fraction(fraction)
    names = sorted({e.label for e in entries})
    labels = np.array([names.index(e.label) for e in entries], dtype=np.int64)
    try:
        tr, va = stratified_split(labels, fraction, seed, setting="val_list",
                                  expected="a validation list")
    except DatasetError as e:
        raise DatasetError(f"fine-tuning: {e}", setting=e.setting, expected=e.expected) from None
    return [entries[i] for i in tr], [entries[i] for i in va]


def _val_pairs(val: StepData, steps: int, cfg: FinetuneConfig) -> NDArray[np.int64]:
    """The fixed validation pairs: ``steps_per_video`` random steps of every video."""
    return draw_pairs(np.random.default_rng(cfg.seed + 1), len(val.videos), steps,
                      cfg.steps_per_video)


def _lr(cfg: FinetuneConfig, update: int, per_epoch: int, total: int) -> float:
    """The learning rate of update ``update`` (0-based) of ``total``."""
    warm = cfg.warmup_epochs * per_epoch
    scale = 1.0 if update >= warm else (update + 1) / warm
    if cfg.schedule == "cosine":
        scale *= 0.5 * (1.0 + math.cos(math.pi * update / total))
    return cfg.lr * scale


def _restart(encoders: dict[str, nn.Module], trainable: list[str],
             start: dict[str, dict[str, torch.Tensor]], variant: str, seed: int) -> None:
    """Put the trainable encoders back for another try. ``tiny`` encoders are random
    (no pretrained weights exist for them): they are drawn anew with ``seed``, since a
    try that stalls usually stalls again from the same random initialisation. Other
    encoders go back to the weights they started from (pretrained weights are kept)."""
    torch.manual_seed(seed)
    for m in trainable:
        if variant == "tiny":
            for mod in encoders[m].modules():
                reset = getattr(mod, "reset_parameters", None)
                if mod is not encoders[m] and callable(reset):
                    reset()
            for mod in encoders[m].modules():  # structured starts (TinySlowFast's filters)
                init = getattr(mod, "init_structured", None)
                if callable(init):
                    init()
        else:
            encoders[m].load_state_dict(start[m])


def _snapshot(model: StepClassifier) -> dict[str, torch.Tensor]:
    return copy.deepcopy(model.state_dict())


def _train_one(model: StepClassifier, train: StepData, val: StepData | None, steps: int,
               cfg: FinetuneConfig, rng: np.random.Generator, labels_names: list[str],
               progress: bool) -> list[dict[str, Any]]:
    """Train ``model`` in place (ends holding the best validation epoch's weights)."""
    from tqdm import tqdm

    videos, labels = train.videos, train.labels
    num_classes = len(labels_names)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    per_epoch = math.ceil(len(videos) * min(cfg.steps_per_video, steps) / cfg.batch_size)
    total_updates, update = cfg.epochs * per_epoch, 0
    val_pairs = None if val is None else _val_pairs(val, steps, cfg)
    name = "+".join(model.trainable)
    epochs: list[dict[str, Any]] = []
    weights = None  # per-video sampling weights (focus on the classes still confused)
    probe = None
    if cfg.probe_epochs > 0:
        probe = linear_probe(model, train, draw_pairs(rng, len(videos), steps,
                                                      cfg.steps_per_video),
                             epochs=cfg.probe_epochs, batch_size=cfg.batch_size, lr=1e-2,
                             seed=cfg.seed)
        if cfg.focus:
            weights = np.maximum(1.0 - probe, 0.05)[labels]
        epochs.append({"linear_probe": True,
                       "train_step_accuracy_per_class": dict(zip(labels_names, probe.tolist()))})
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    jitter = torch.Generator().manual_seed(cfg.seed + 7) if cfg.augment else None
    for epoch in range(cfg.epochs):
        pairs = draw_pairs(rng, len(videos), steps, cfg.steps_per_video, weights)
        model.train()
        total, seen, correct = 0.0, 0, 0
        class_hits, class_seen = np.zeros(num_classes), np.zeros(num_classes)
        bar = tqdm(total=len(pairs), unit="step", desc=f"finetune {name} {epoch + 1}/{cfg.epochs}",
                   disable=not progress, dynamic_ncols=True)
        for a in range(0, len(pairs), cfg.batch_size):
            p = pairs[a:a + cfg.batch_size]
            for g in opt.param_groups:
                g["lr"] = _lr(cfg, update, per_epoch, total_updates)
            update += 1
            if len(p) < 2:
                continue  # BatchNorm needs 2 samples
            y = torch.from_numpy(labels[p[:, 0]])
            logits = model(train, p, jitter)
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
        entry: dict[str, Any] = {
            "epoch": epoch + 1, "loss": total / max(1, seen), "lr_end": opt.param_groups[0]["lr"],
            "train_step_accuracy": correct / max(1, seen),
            "train_step_accuracy_per_class": dict(zip(labels_names, class_acc.tolist()))}
        epochs.append(entry)
        if val is None or val_pairs is None:
            continue
        acc, per_class = step_accuracy(model, val, val_pairs, cfg.batch_size)
        entry["val_step_accuracy"] = acc
        entry["val_step_accuracy_per_class"] = dict(zip(labels_names, per_class))
        if best is None or acc > best[0]:
            best = (acc, epoch + 1, _snapshot(model))
        if acc >= cfg.stop_accuracy or epoch + 1 - best[1] >= cfg.patience:
            break
    if best is not None:
        model.load_state_dict(best[2])
        epochs.append({"kept_epoch": best[1], "val_step_accuracy": best[0]})
    return epochs


def finetune_backbones(
    ckpt: Checkpoint,
    train_entries: Sequence[ListEntry],
    cfg: FinetuneConfig,
    *,
    val_entries: Sequence[ListEntry] | None = None,
    steps: int | None = None,
    progress: bool = True,
) -> tuple[Checkpoint, dict[str, Any]]:
    """Fine-tune the encoders of ``cfg.modalities`` on ``train_entries`` (dataset rows).

    Returns the new checkpoint (only those encoders' tensors differ) and a report with
    per-epoch loss and single-step accuracy (train; val on ``steps_per_video`` random
    steps of every ``val_entries`` video if given), the kept epoch and the final
    validation accuracy (``val_step_accuracy``, after BatchNorm recalibration).
    """
    cfg.check()
    steps = int(steps or ckpt.config.steps)
    t0 = time.perf_counter()
    train = decode_dataset(train_entries, ckpt, steps, cfg.workers, progress)
    val = decode_dataset(val_entries, ckpt, steps, cfg.workers, progress) if val_entries else None
    out, report = finetune_decoded(ckpt, train[:2], None if val is None else val[:2], cfg,
                                   steps=steps, progress=progress)
    report["decode_errors"] = train[2] + ([] if val is None else val[2])
    report["warnings"] = []
    if val is not None:
        from hms_deploy.train.presets import small_validation_warning

        w = small_validation_warning(val[1], list(ckpt.labels), setting="val_list")
        report["warnings"] += [] if w is None else [w]
    report["seconds"] = time.perf_counter() - t0
    # the checkpoint keeps the report with the warnings as plain text (builtins only)
    out.extra["finetune"] = {**report, "warnings": [str(w) for w in report["warnings"]]}
    return out, report


def finetune_decoded(ckpt: Checkpoint, train: Decoded, val: Decoded | None,
                     cfg: FinetuneConfig, *, steps: int, progress: bool = True,
                     ) -> tuple[Checkpoint, dict[str, Any]]:
    """:func:`finetune_backbones` on decoded videos (``(inputs, labels)`` per split)."""
    cfg.check()
    t0 = time.perf_counter()
    if not train[0]:
        raise DatasetError("fine-tuning: no decodable training video")
    if val is not None and not val[0]:
        val = None
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    encoders = build_encoders(ckpt.config, ckpt.state_dict)
    feat_dims = {m: ckpt.config.backbone(m).feat_dim for m in MODALITIES}
    new_state = dict(ckpt.state_dict)
    report: dict[str, Any] = {"config": asdict(cfg), "steps": steps, "videos": len(train[0]),
                              "val_videos": 0 if val is None else len(val[0]), "runs": []}
    if cfg.head == "joint":
        runs = [(list(MODALITIES), list(cfg.modalities))]
    else:
        runs = [([m], [m]) for m in cfg.modalities]
    for inputs, trainable in runs:
        model = StepClassifier(encoders, inputs, trainable, feat_dims, ckpt.config.num_classes)
        splits = [StepData(*train)] + ([] if val is None else [StepData(*val)])
        for data in splits:
            data.frozen = {m: frozen_features(encoders[m], data.videos, m, steps,
                                              4 * cfg.batch_size)
                           for m in inputs if m not in trainable}
        val_data = splits[1] if val is not None else None
        start = {m: copy.deepcopy(encoders[m].state_dict()) for m in trainable}
        tries: list[tuple[float, dict[str, torch.Tensor], list[dict[str, Any]]]] = []
        for attempt in range(cfg.restarts + 1):
            if attempt:
                _restart(encoders, trainable, start, ckpt.config.variant, cfg.seed + attempt)
                model = StepClassifier(encoders, inputs, trainable, feat_dims,
                                       ckpt.config.num_classes)
            log = _train_one(model, splits[0], val_data, steps, cfg, rng, list(ckpt.labels),
                             progress)
            acc = log[-1].get("val_step_accuracy", float("nan")) if "kept_epoch" in log[-1] \
                else float("nan")
            tries.append((acc, _snapshot(model), log))
            if not acc < cfg.restart_below:  # reached it, or no validation (NaN)
                break
        best_try = max(range(len(tries)), key=lambda i: (tries[i][0], -i))
        model.load_state_dict(tries[best_try][1])
        epochs = tries[best_try][2]
        if len(tries) > 1:
            epochs = [*epochs, {"restarts": len(tries) - 1, "kept_try": best_try + 1,
                                "tries_val_step_accuracy": [t[0] for t in tries],
                                "tries_epochs": [t[2] for t in tries]}]
        recal = draw_pairs(rng, len(train[0]), steps, cfg.bn_recalibration_steps)
        jitter = torch.Generator().manual_seed(cfg.seed + 8) if cfg.augment else None
        for m in trainable:
            recalibrate_batchnorm(encoders[m], train[0], m, recal, cfg.batch_size, jitter)
        run: dict[str, Any] = {"inputs": inputs, "trained": trainable, "epochs": epochs}
        if val_data is not None:
            acc, per_class = step_accuracy(model, val_data, _val_pairs(val_data, steps, cfg),
                                           cfg.batch_size)
            run["val_step_accuracy"] = acc
            run["val_step_accuracy_per_class"] = dict(zip(ckpt.labels, per_class))
        for m in trainable:
            encoders[m].eval()
            for k, v in encoders[m].state_dict().items():
                key = f"{m}_backbone.encoder.{k}"
                if key not in new_state:
                    raise RuntimeError(f"fine-tuned tensor {key} not in the checkpoint")
                new_state[key] = v.detach().clone()
        report["runs"].append(run)
    report["seconds"] = time.perf_counter() - t0
    extra = {**ckpt.extra, "finetune": report}
    out = Checkpoint(config=ckpt.config, state_dict=new_state, labels=list(ckpt.labels),
                     costs=dict(ckpt.costs), policy=ckpt.policy,
                     modalities=list(ckpt.modalities), extra=extra)
    return out, report
