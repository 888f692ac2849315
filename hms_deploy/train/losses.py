"""The HMS objective (docs/method.md §4): L = L_ce + lambda * L_usage."""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def usage_loss(g_appearance: Tensor, g_motion: Tensor, gamma_i: float, gamma_m: float) -> Tensor:
    """``(mean_t G^I - gamma_I)^2 + (mean_t G^M - gamma_M)^2``, averaged over the batch.

    ``g_*`` are float decisions (N, T) (straight-through Gumbel samples in training);
    ``gamma_*`` target fractions of steps that run each modality.
    """
    ui = g_appearance.mean(dim=1)
    um = g_motion.mean(dim=1)
    return ((ui - gamma_i) ** 2 + (um - gamma_m) ** 2).mean()


def hms_loss(
    logits: Tensor, labels: Tensor, g_appearance: Tensor, g_motion: Tensor, *,
    lam: float, gamma_i: float, gamma_m: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(total, cross-entropy, usage) for logits (N, C), class indices (N,), decisions (N, T)."""
    ce = F.cross_entropy(logits, labels)
    usage = usage_loss(g_appearance, g_motion, gamma_i, gamma_m)
    return ce + lam * usage, ce, usage
