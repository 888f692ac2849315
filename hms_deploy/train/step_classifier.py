"""The per-step classifier the backbone fine-tune trains, and its sampling helpers.

A training example is one step of one video: the step's log-mel patch, frame and motion
clip, labelled with the video's class (``pairs``: (N, 2) int arrays of (video, step)).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from hms_deploy.data.inputs import VideoInputs


@dataclass
class StepData:
    """One split: decoded videos, their class indices, and the frozen encoders' features
    (``{modality: (videos, steps, D)}``, from :func:`frozen_features`)."""

    videos: list[VideoInputs]
    labels: NDArray[np.int64]
    frozen: dict[str, torch.Tensor] = field(default_factory=dict)


def step_input(inputs: VideoInputs, modality: str, t: int) -> NDArray[np.float32] | NDArray[np.uint8]:
    assert inputs.mel is not None and inputs.frames is not None  # decoded (decode_all)
    if modality == "audio":
        return inputs.mel[t]
    if modality == "appearance":
        return inputs.frames[t]
    return inputs.clips(np.array([t]))[0]


def batch_inputs(videos: list[VideoInputs], pairs: NDArray[np.int64], modality: str,
                 jitter: torch.Generator | None = None) -> torch.Tensor:
    """The inputs of ``pairs``; with ``jitter`` visual ones are colour-jittered
    (:func:`colour_jitter`, float32)."""
    x = torch.from_numpy(np.stack([step_input(videos[i], modality, t) for i, t in pairs]))
    if jitter is not None and modality != "audio":
        x = colour_jitter(x, jitter)
    return x


@torch.no_grad()
def frozen_features(encoder: nn.Module, videos: list[VideoInputs], modality: str, steps: int,
                    batch_size: int) -> torch.Tensor:
    """Features of a frozen (eval-mode) encoder for every step: (videos, steps, D) float32.

    Computed once: a frozen encoder gives the same feature for a step in every epoch, so
    the fine-tune looks them up instead of running the encoder again (same result, about
    a third of the time saved with the joint head).
    """
    encoder.eval()
    pairs = np.array([(i, t) for i in range(len(videos)) for t in range(steps)])
    out = [encoder(batch_inputs(videos, pairs[a:a + batch_size], modality))
           for a in range(0, len(pairs), batch_size)]
    return torch.cat(out).reshape(len(videos), steps, -1)


class StepClassifier(nn.Module):
    """Encoders of ``inputs`` -> concatenated raw features -> BatchNorm (no affine) -> Linear.

    The encoders of ``trainable`` are trained; the features of the others are read from
    the split's ``frozen`` tables.
    """

    def __init__(self, encoders: dict[str, nn.Module], inputs: list[str], trainable: list[str],
                 feat_dims: dict[str, int], num_classes: int):
        super().__init__()
        self.inputs, self.trainable = list(inputs), list(trainable)
        self.encoders = nn.ModuleDict({m: encoders[m] for m in trainable})
        for m in trainable:
            self.encoders[m].requires_grad_(True)
        dim = sum(feat_dims[m] for m in inputs)
        self.norm = nn.BatchNorm1d(dim, affine=False)
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, data: StepData, pairs: NDArray[np.int64],
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Logits of ``pairs``; with ``generator`` (training) the visual inputs of the
        trained encoders are colour-jittered (:func:`colour_jitter`)."""
        feats = []
        idx = torch.from_numpy(pairs)
        for m in self.inputs:
            if m in self.trainable:
                feats.append(self.encoders[m](batch_inputs(data.videos, pairs, m, generator)))
            else:
                feats.append(data.frozen[m][idx[:, 0], idx[:, 1]])
        return self.linear(self.norm(torch.cat(feats, dim=1)))


def colour_jitter(x: torch.Tensor, generator: torch.Generator, gain: float = 0.2,
                  offset: float = 20.0) -> torch.Tensor:
    """uint8 RGB ``(N, 3, ...)`` -> float32 in [0, 255] with a random per-sample, per-channel
    gain in ``1 +- gain`` and offset in ``+- offset`` (the same over all its pixels and
    frames). The encoders normalise float input as they do uint8.

    Fine-tuning on a few videos per class, the trained encoder can separate classes by a
    nuisance that happens to differ between their training videos (tint, colour) instead
    of what defines them: with 12 training videos per class, a motion encoder that reached
    1.0 validation step accuracy read one new move_right sample as move_left on all 8
    steps (P(right) < 0.25) and another move_left sample as move_right on 2. Jitter of the
    colours, which no class here is defined by at this scale, takes that shortcut away.
    """
    n, c = x.shape[:2]
    shape = (n, c) + (1,) * (x.dim() - 2)
    g = 1.0 + gain * (2.0 * torch.rand(shape, generator=generator) - 1.0)
    o = offset * (2.0 * torch.rand(shape, generator=generator) - 1.0)
    return (x.to(torch.float32) * g + o).clamp_(0.0, 255.0)


@torch.no_grad()
def step_accuracy(model: StepClassifier, data: StepData, pairs: NDArray[np.int64],
                  batch_size: int) -> tuple[float, list[float]]:
    """Single-step accuracy over ``pairs``, overall and per class (NaN: class absent)."""
    model.eval()
    hits = np.zeros(len(pairs), dtype=bool)
    for a in range(0, len(pairs), batch_size):
        p = pairs[a:a + batch_size]
        hits[a:a + len(p)] = model(data, p).argmax(1).numpy() == data.labels[p[:, 0]]
    y = data.labels[pairs[:, 0]]
    per_class = [float(hits[y == c].mean()) if (y == c).any() else float("nan")
                 for c in range(int(model.linear.out_features))]
    return float(hits.mean()) if len(hits) else float("nan"), per_class


@torch.no_grad()
def recalibrate_batchnorm(encoder: nn.Module, videos: list[VideoInputs], modality: str,
                          pairs: NDArray[np.int64], batch_size: int,
                          generator: torch.Generator | None = None) -> None:
    """Recompute BatchNorm running statistics as plain averages over ``pairs`` with the
    final weights ("precise BN"): the running averages of training lag the weights.
    With ``generator`` the inputs are colour-jittered as in training (the statistics
    then describe the distribution the weights were trained on; measured: statistics of
    un-jittered inputs took the kept epoch's 0.979 validation step accuracy to 0.938)."""
    bns = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or len(pairs) == 0:
        return
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    encoder.train()
    for a in range(0, len(pairs), batch_size):
        encoder(batch_inputs(videos, pairs[a:a + batch_size], modality, generator))
    for bn, mom in zip(bns, saved):
        bn.momentum = mom
    encoder.eval()


def draw_pairs(rng: np.random.Generator, n_videos: int, steps: int, k: int,
               weights: NDArray[np.float64] | None = None) -> NDArray[np.int64]:
    """(video, step) pairs, shuffled: ``k`` distinct random steps of every video, or with
    ``weights`` (per video) ``n_videos * k`` pairs of videos drawn in proportion to them."""
    if weights is not None:
        vids = rng.choice(n_videos, n_videos * k, p=weights / weights.sum())
        return np.stack([vids, rng.integers(0, steps, vids.size)], axis=1)
    k = min(k, steps)
    pairs = np.array([(i, t) for i in range(n_videos) for t in rng.choice(steps, k, replace=False)])
    return pairs[rng.permutation(len(pairs))]


def linear_probe(model: StepClassifier, data: StepData, pairs: NDArray[np.int64], *, epochs: int,
                 batch_size: int, lr: float, seed: int) -> NDArray[np.float64]:
    """Fit the classifier (norm + linear) alone on the current features of ``pairs``, the
    encoders fixed ("LP" of LP-FT, Kumar et al. 2022). Returns per-class accuracy of the
    fitted probe on ``pairs`` (1.0 for absent classes).

    Fine-tuning then starts from a head that already separates what the features separate,
    so from the first update the encoder's gradient comes from the classes it must learn
    to tell apart, not from a random head (which also distorts the features it trains).
    The trainable encoders' BatchNorm statistics are first recomputed on ``pairs`` (their
    initial running statistics describe no data) and their features taken in eval mode.
    """
    for m in model.trainable:
        recalibrate_batchnorm(model.encoders[m], data.videos, m, pairs, batch_size)
    feats = []
    with torch.no_grad():
        idx = torch.from_numpy(pairs)
        for m in model.inputs:
            if m in model.trainable:
                model.encoders[m].eval()
                feats.append(torch.cat([
                    model.encoders[m](batch_inputs(data.videos, pairs[a:a + 4 * batch_size], m))
                    for a in range(0, len(pairs), 4 * batch_size)]))
            else:
                feats.append(data.frozen[m][idx[:, 0], idx[:, 1]])
    x = torch.cat(feats, dim=1)
    y = torch.from_numpy(data.labels[pairs[:, 0]])
    head = nn.Sequential(model.norm, model.linear)
    opt = torch.optim.Adam(model.linear.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    head.train()
    probe_batch = max(2, 8 * batch_size)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for a in range(0, len(y), probe_batch):
            b = order[a:a + probe_batch]
            if len(b) < 2:
                continue
            loss = nn.functional.cross_entropy(head(x[b]), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    head.eval()
    with torch.no_grad():
        hits = (head(x).argmax(1) == y).numpy()
    classes = int(model.linear.out_features)
    return np.array([hits[y.numpy() == c].mean() if (y.numpy() == c).any() else 1.0
                     for c in range(classes)])
