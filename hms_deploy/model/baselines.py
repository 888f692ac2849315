"""Early-fusion baselines (paper Table 1): one LSTM over the concatenated projected features
of a modality subset, every step, then the classifier head.

A baseline is saved as ``Checkpoint(policy="early_fusion", modalities=[...])``. Its state
dict holds the encoders of the checkpoint it was trained from, unchanged (so its backbone
hash still matches the feature store), and its own weights under the prefix
``early_fusion.``. It can be trained (``hms-train --policy early_fusion``) and evaluated
(``hms-eval``), not exported or run (:meth:`Checkpoint.build_model` refuses it).

Cost (GMAC per video, docs/method.md §5 conventions): every step runs the subset's backbone
parts (encoder + projection, ``costs["<modality>_backbone"]``) and the fusion LSTM cell;
the head runs once: ``T * (sum of backbone parts + early_fusion_cell) + early_fusion_head``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from hms_deploy.config import HMSConfig, parse_modalities
from hms_deploy.errors import CheckpointError
from hms_deploy.model.hms import CellPart, HeadPart, Projection

PREFIX = "early_fusion."
class EarlyFusion(nn.Module):
    """Projections of the subset (Linear + ReLU, as HMS), an LSTM cell over their
    concatenation, and a linear head. Input: raw features ``{modality: (N, T, D)}``."""

    def __init__(self, cfg: HMSConfig, modalities: Sequence[str], hidden: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.modalities = parse_modalities(modalities)
        self.hidden = int(hidden or cfg.hidden_motion)
        self.projection = nn.ModuleDict({
            m: Projection(cfg.backbone(m).feat_dim, cfg.backbone(m).proj_dim)
            for m in self.modalities
        })
        in_dim = sum(cfg.backbone(m).proj_dim for m in self.modalities)
        self.cell = CellPart(in_dim, self.hidden)
        self.head = HeadPart(self.hidden, cfg.num_classes)

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits (N, C) after the last step."""
        x = torch.cat([self.projection[m](feats[m]) for m in self.modalities], dim=2)
        n, steps, _ = x.shape
        h = x.new_zeros(n, self.hidden)
        c = torch.zeros_like(h)
        for t in range(steps):
            h, c = self.cell(x[:, t], h, c)
        return self.head.logits(h)

    @torch.no_grad()
    def measure_costs(self) -> dict[str, float]:
        """GMAC per sample of the fusion cell (one step) and of the head, flop-counted."""
        out = {}
        in_dim = self.cell.cell.input_size
        for name, mod, args in (
            ("early_fusion_cell", self.cell,
             (torch.zeros(1, in_dim), torch.zeros(1, self.hidden), torch.zeros(1, self.hidden))),
            ("early_fusion_head", self.head, (torch.zeros(1, self.hidden),)),
        ):
            counter = FlopCounterMode(display=False)
            with counter:
                mod(*args)
            out[name] = counter.get_total_flops() / 2.0 / 1e9
        return out


def early_fusion_cost(costs: dict[str, float], modalities: Sequence[str], steps: int) -> float:
    """GMAC per video: ``T * (subset backbone parts + fusion cell) + head``."""
    per_step = sum(costs[f"{m}_backbone"] for m in parse_modalities(modalities))
    return steps * (per_step + costs["early_fusion_cell"]) + costs["early_fusion_head"]


class EarlyFusionCheckpoint(Protocol):
    """What :func:`build_early_fusion` reads of a :class:`~hms_deploy.checkpoint.Checkpoint`."""

    policy: str
    config: HMSConfig
    modalities: list[str]
    extra: dict[str, Any]
    state_dict: dict[str, torch.Tensor]


def build_early_fusion(ckpt: EarlyFusionCheckpoint) -> EarlyFusion:
    """The baseline of an ``early_fusion`` checkpoint, in eval mode."""
    if ckpt.policy != "early_fusion":
        raise CheckpointError(f"checkpoint policy is {ckpt.policy!r}, not 'early_fusion'")
    hidden = int(ckpt.extra.get("early_fusion_hidden", ckpt.config.hidden_motion))
    model = EarlyFusion(ckpt.config, ckpt.modalities, hidden)
    sd = {k[len(PREFIX):]: v for k, v in ckpt.state_dict.items() if k.startswith(PREFIX)}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"early-fusion weights do not fit: {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
    return model.eval()


def early_fusion_state_dict(
    model: EarlyFusion, encoders: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Checkpoint state dict: the source encoders unchanged + the baseline under ``early_fusion.``."""
    sd = {k: v for k, v in encoders.items() if ".encoder." in k}
    sd.update({PREFIX + k: v.detach().clone() for k, v in model.state_dict().items()})
    return sd
