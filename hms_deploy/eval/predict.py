"""Predictions over stored features: HMS (argmax decisions), HMS under a GMAC budget, and
early-fusion baselines, with the GMAC each video used (docs/method.md §5).

The budgeted forward is :func:`hms_deploy.gating.gated_step` over :class:`BudgetStepOps`,
a :class:`~hms_deploy.model.hms.FeatureStepOps` whose ``decide_*`` veto a firing gate
when its tier no longer fits: the decisions, hierarchy and fusion are gating.py's.

Budget rule: :class:`hms_deploy.costs.BudgetLedger` (the runtime's scheduler keeps its
books there too); once a step cannot start, the prediction after the last finished step
is the video's, so ``used = video_cost(...) <= B`` always.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray

from hms_deploy import gating
from hms_deploy.costs import BudgetLedger, video_cost
from hms_deploy.data.feature_batches import FeatureSource
from hms_deploy.model.baselines import EarlyFusion
from hms_deploy.model.hms import HMS, FeatureStepOps

Tensor = torch.Tensor


@dataclass
class Predictions:
    """Per-video outputs.

    scores (N, C) class probabilities; appearance / motion (N, T) int8 0/1 decisions
    (None for a baseline; steps past ``steps[i]`` are 0); steps (N,) finished steps;
    gmacs (N,) GMAC used per video.
    """

    scores: NDArray[np.float32]
    appearance: NDArray[np.int8] | None
    motion: NDArray[np.int8] | None
    steps: NDArray[np.int64]
    gmacs: NDArray[np.float64]


def _hms_gmacs(costs: dict[str, float], steps: NDArray[np.int64], g_i: NDArray[np.int8],
               g_m: NDArray[np.int8]) -> NDArray[np.float64]:
    return np.array([
        video_cost(costs, steps=int(s), appearance=int(a), motion=int(m))
        for s, a, m in zip(steps, g_i.sum(1), g_m.sum(1))
    ])


@torch.no_grad()
def predict_hms(model: HMS, source: FeatureSource, costs: dict[str, float],
                batch_size: int = 64) -> Predictions:
    """Argmax decisions over all T steps, via the masked forward (same logits as the
    skipping reference, docs/method.md §3)."""
    model.eval()
    scores, gi, gm = [], [], []
    for _, feats, _ in source.batches(batch_size):
        out = model.masked_forward(feats, tau=None)
        scores.append(torch.softmax(out.logits, dim=1).numpy())
        gi.append(out.appearance.numpy().astype(np.int8))
        gm.append(out.motion.numpy().astype(np.int8))
    g_i, g_m = np.concatenate(gi), np.concatenate(gm)
    steps = np.full(len(source), g_i.shape[1], dtype=np.int64)
    return Predictions(np.concatenate(scores), g_i, g_m, steps, _hms_gmacs(costs, steps, g_i, g_m))


class BudgetStepOps(FeatureStepOps):
    """:class:`FeatureStepOps` under a GMAC budget (:class:`~hms_deploy.costs.BudgetLedger`).

    ``ledger.used`` (N,) float64 GMAC spent per video, ``active`` (N,) bool: videos still
    stepping. Gates run on the whole batch; an inactive video's decisions are then forced
    to 0 (and not charged), so its row is computed but never used.
    """

    def __init__(self, model: HMS, feats: dict[str, Tensor], costs: dict[str, float],
                 budget: float):
        super().__init__(model, feats)
        n = feats["audio"].shape[0]
        self.ledger = BudgetLedger(costs, n, budget)
        self.active = np.ones(n, dtype=bool)

    def start_step(self) -> NDArray[np.bool_]:
        """Charge the base cost of the next step to every video that can still afford it."""
        started = self.ledger.start_step(np.flatnonzero(self.active))
        self.active[:] = False
        self.active[started] = True
        return self.active.copy()

    def _veto(self, tier: str, rows: Tensor, fired: Tensor) -> Tensor:
        r = rows.numpy()
        return torch.from_numpy(self.ledger.veto(tier, r, fired.numpy().astype(bool) & self.active[r]))

    def decide_appearance(self, t: int, rows: Tensor, x_a: Tensor, h: Tensor, c: Tensor) -> Tensor:
        return self._veto("appearance", rows, super().decide_appearance(t, rows, x_a, h, c))

    def decide_motion(self, t: int, rows: Tensor, x_a: Tensor, x_i: Tensor, h: Tensor,
                      c: Tensor) -> Tensor:
        return self._veto("motion", rows, super().decide_motion(t, rows, x_a, x_i, h, c))


@torch.no_grad()
def budgeted_forward(model: HMS, feats: dict[str, Tensor], costs: dict[str, float],
                     budget: float) -> tuple[Tensor, NDArray[np.int8], NDArray[np.int8],
                                             NDArray[np.int64], NDArray[np.float64]]:
    """N videos in lockstep under ``budget`` GMAC each (``math.inf``: no budget).

    Returns (logits (N, C) after each video's last finished step, G^I (N, T) int8,
    G^M (N, T) int8, finished steps (N,), used GMAC (N,)).
    """
    model.eval()
    p_a = model.project("audio", feats["audio"])
    h_a = model.audio_path(p_a)
    n, steps, _ = p_a.shape
    ops = BudgetStepOps(model, feats, costs, budget)
    state = gating.GatedState.zeros(n, model.cfg.hidden_appearance, model.cfg.hidden_motion)
    g_i = np.zeros((n, steps), dtype=np.int8)
    g_m = np.zeros((n, steps), dtype=np.int8)
    finished = np.zeros(n, dtype=np.int64)
    for t in range(steps):
        active = ops.start_step()
        if not active.any():
            break
        new, d_i, d_m = gating.gated_step(ops, t, p_a[:, t], h_a[:, t], state)
        if active.all():
            state = new
        else:  # videos that stopped keep the state of their last finished step
            keep = torch.from_numpy(active).unsqueeze(1)
            state = gating.GatedState(*(torch.where(keep, a, b) for a, b in (
                (new.h_i, state.h_i), (new.c_i, state.c_i),
                (new.h_m, state.h_m), (new.c_m, state.c_m))))
        g_i[:, t], g_m[:, t] = d_i.numpy(), d_m.numpy()
        finished += active
    used = ops.ledger.used + np.where(finished > 0, ops.ledger.tiers["head"], 0.0)
    return model.head.logits(state.h_m), g_i, g_m, finished, used


@torch.no_grad()
def predict_budgeted(model: HMS, source: FeatureSource, costs: dict[str, float], budget: float,
                     batch_size: int = 64) -> Predictions:
    """:func:`budgeted_forward` over a feature source, batch by batch."""
    scores, gi, gm, st, us = [], [], [], [], []
    for _, feats, _ in source.batches(batch_size):
        logits, g_i, g_m, finished, used = budgeted_forward(model, feats, costs, budget)
        scores.append(torch.softmax(logits, dim=1).numpy())
        gi.append(g_i)
        gm.append(g_m)
        st.append(finished)
        us.append(used)
    return Predictions(np.concatenate(scores), np.concatenate(gi), np.concatenate(gm),
                       np.concatenate(st), np.concatenate(us))


@torch.no_grad()
def predict_early_fusion(model: EarlyFusion, source: FeatureSource, costs: dict[str, float],
                         batch_size: int = 64) -> Predictions:
    """An early-fusion baseline: every step of its modalities, one prediction."""
    from hms_deploy.model.baselines import early_fusion_cost

    model.eval()
    scores = []
    steps = source.store.steps
    for _, feats, _ in source.batches(batch_size):
        scores.append(torch.softmax(model(feats), dim=1).numpy())
    n = len(source)
    cost = early_fusion_cost(costs, model.modalities, steps)
    return Predictions(np.concatenate(scores) if scores
                       else np.zeros((0, model.cfg.num_classes), dtype=np.float32),
                       None, None, np.full(n, steps, dtype=np.int64), np.full(n, cost))
