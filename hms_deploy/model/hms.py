"""The HMS model in PyTorch: encoders, projections, cells, gates, head, and its two forwards.

- :meth:`HMS.masked_forward` (training; every branch computed and masked) and
- :func:`reference_forward` (the step-by-step reference that really skips)

both run the semantics of :mod:`hms_deploy.gating` over per-step *raw* features
(N, T, D) per modality, as stored by ``hms-extract``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hms_deploy import gating
from hms_deploy.config import HMSConfig
from hms_deploy.model.backbones import AudioEncoder, ClipEncoder, FrameEncoder
from hms_deploy.parts import PART_NAMES

Tensor = torch.Tensor


class Projection(nn.Module):
    """Linear + ReLU from a raw backbone feature x to the projected feature p."""

    def __init__(self, feat_dim: int, proj_dim: int):
        super().__init__()
        self.linear = nn.Linear(feat_dim, proj_dim)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.linear(x))


class BackbonePart(nn.Module):
    """Exportable backbone part: raw input -> encoder -> projection -> ``feat`` (N, P)."""

    def __init__(self, encoder: nn.Module, projection: Projection):
        super().__init__()
        self.encoder = encoder
        self.projection = projection

    def forward(self, x: Tensor) -> Tensor:
        return self.projection(self.encoder(x))


class CellPart(nn.Module):
    """Single-step LSTM cell over concatenated inputs: ``(*x, h, c) -> (h_next, c_next)``."""

    def __init__(self, input_dim: int, hidden: int):
        super().__init__()
        self.cell = nn.LSTMCell(input_dim, hidden)

    def forward(self, *inputs: Tensor) -> tuple[Tensor, Tensor]:
        *xs, h, c = inputs
        x = xs[0] if len(xs) == 1 else torch.cat(xs, dim=1)
        h_next, c_next = self.cell(x, (h, c))
        return h_next, c_next


class GatePart(nn.Module):
    """A single Linear layer to 2 logits plus the argmax: ``(*inputs) -> (decision, logits)``."""

    def __init__(self, input_dim: int):
        super().__init__()
        self.linear = nn.Linear(input_dim, 2)

    def forward(self, *inputs: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.linear(torch.cat(inputs, dim=1))
        return gating.decide(logits), logits


class HeadPart(nn.Module):
    """``h`` (N, H_M) -> ``probs`` (N, C) = softmax(W_c h + b_c)."""

    def __init__(self, hidden: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(hidden, num_classes)

    def logits(self, h: Tensor) -> Tensor:
        return self.linear(h)

    def forward(self, h: Tensor) -> Tensor:
        return torch.softmax(self.linear(h), dim=1)


@dataclass
class ForwardOutput:
    """Result of a forward over T steps for N videos.

    logits (N, C) after the last step; decisions float (N, T) 0/1; gate_logits (N, T, 2)
    per gate (the motion gate's are computed on every step in the masked forward and only
    where appearance ran in the reference, NaN elsewhere).
    """

    logits: Tensor
    appearance: Tensor
    motion: Tensor
    step_logits: Tensor | None = None  # (N, T, C), head after every step, if requested


class HMS(nn.Module):
    """HMS with keyword-named parts; :meth:`part` returns each of the nine exportable parts."""

    def __init__(self, cfg: HMSConfig):
        super().__init__()
        self.cfg = cfg
        pa, pi, pm = cfg.audio.proj_dim, cfg.appearance.proj_dim, cfg.motion.proj_dim
        ha, hi, hm = cfg.hidden_audio, cfg.hidden_appearance, cfg.hidden_motion
        self.audio_backbone = BackbonePart(
            AudioEncoder(cfg.audio), Projection(cfg.audio.feat_dim, pa))
        self.appearance_backbone = BackbonePart(
            FrameEncoder(cfg.appearance), Projection(cfg.appearance.feat_dim, pi))
        self.motion_backbone = BackbonePart(
            ClipEncoder(cfg.motion, cfg.clip), Projection(cfg.motion.feat_dim, pm))
        self.audio_cell = CellPart(pa, ha)
        self.appearance_cell = CellPart(pa + pi, hi)
        self.motion_cell = CellPart(pa + pi + pm, hm)
        self.appearance_gate = GatePart(pa + 2 * hi)
        self.motion_gate = GatePart(pa + pi + 2 * hm)
        self.head = HeadPart(hm, cfg.num_classes)

    def part(self, name: str) -> nn.Module:
        if name not in PART_NAMES:
            raise KeyError(f"unknown part {name!r}, expected one of {PART_NAMES}")
        return getattr(self, name)

    def project(self, modality: str, x: Tensor) -> Tensor:
        """Raw feature (..., D) -> projected feature (..., P)."""
        return getattr(self, f"{modality}_backbone").projection(x)

    def audio_path(self, p_a: Tensor) -> Tensor:
        """aLSTM over all steps (never gated): p^A (N, T, P_A) -> h^A (N, T, H_A)."""
        n, steps, _ = p_a.shape
        h = p_a.new_zeros(n, self.cfg.hidden_audio)
        c = torch.zeros_like(h)
        out = []
        for t in range(steps):
            h, c = self.audio_cell(p_a[:, t], h, c)
            out.append(h)
        return torch.stack(out, dim=1)

    def masked_forward(
        self,
        feats: dict[str, Tensor],
        *,
        tau: float | None = None,
        generator: torch.Generator | None = None,
        return_step_logits: bool = False,
    ) -> ForwardOutput:
        """Training forward over raw features ``feats[modality]`` (N, T, D_modality).

        ``tau=None`` uses argmax decisions (evaluation); otherwise hard Gumbel-softmax at
        temperature ``tau`` with straight-through gradients.
        """
        p = {m: self.project(m, feats[m]) for m in ("audio", "appearance", "motion")}
        n, steps, _ = p["audio"].shape
        h_a = self.audio_path(p["audio"])
        if tau is None:
            decision: gating.DecisionFn = gating.argmax_decision
        else:
            def decision(logits: Tensor) -> Tensor:
                return gating.gumbel_decide(logits, tau, generator)
        state = gating.GatedState.zeros(
            n, self.cfg.hidden_appearance, self.cfg.hidden_motion,
            device=h_a.device, dtype=h_a.dtype,
        )
        g_i_all, g_m_all, step_logits = [], [], []
        for t in range(steps):
            state, g_i, g_m, _, _ = gating.masked_step(
                x_a=p["audio"][:, t], x_i=p["appearance"][:, t], x_m=p["motion"][:, t],
                h_a=h_a[:, t], state=state,
                appearance_gate=self.appearance_gate, motion_gate=self.motion_gate,
                appearance_cell=self.appearance_cell, motion_cell=self.motion_cell,
                decision=decision,
            )
            g_i_all.append(g_i)
            g_m_all.append(g_m)
            if return_step_logits:
                step_logits.append(self.head.logits(state.h_m))
        return ForwardOutput(
            logits=self.head.logits(state.h_m),
            appearance=torch.stack(g_i_all, dim=1),
            motion=torch.stack(g_m_all, dim=1),
            step_logits=torch.stack(step_logits, dim=1) if return_step_logits else None,
        )


class FeatureStepOps:
    """:class:`hms_deploy.gating.StepOps` over precomputed raw features and the torch parts.

    ``calls`` counts how often each projection/cell/gate ran, so tests can prove skipping.
    """

    def __init__(self, model: HMS, feats: dict[str, Tensor]):
        self.model = model
        self.feats = feats
        self.calls = {"appearance_feature": 0, "motion_feature": 0, "appearance_cell": 0,
                      "motion_cell": 0, "appearance_gate": 0, "motion_gate": 0}

    def decide_appearance(self, t: int, rows: Tensor, x_a: Tensor, h: Tensor, c: Tensor) -> Tensor:
        self.calls["appearance_gate"] += 1
        return self.model.appearance_gate(x_a, h, c)[0].cpu()

    def appearance_feature(self, t: int, rows: Tensor) -> Tensor:
        self.calls["appearance_feature"] += 1
        return self.model.project("appearance", self.feats["appearance"][rows, t])

    def appearance_cell(self, x_a: Tensor, x_i: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        self.calls["appearance_cell"] += 1
        return self.model.appearance_cell(x_a, x_i, h, c)

    def decide_motion(
        self, t: int, rows: Tensor, x_a: Tensor, x_i: Tensor, h: Tensor, c: Tensor
    ) -> Tensor:
        self.calls["motion_gate"] += 1
        return self.model.motion_gate(x_a, x_i, h, c)[0].cpu()

    def motion_feature(self, t: int, rows: Tensor) -> Tensor:
        self.calls["motion_feature"] += 1
        return self.model.project("motion", self.feats["motion"][rows, t])

    def motion_cell(
        self, x_a: Tensor, x_i: Tensor, x_m: Tensor, h: Tensor, c: Tensor
    ) -> tuple[Tensor, Tensor]:
        self.calls["motion_cell"] += 1
        return self.model.motion_cell(x_a, x_i, x_m, h, c)


@torch.no_grad()
def reference_forward(model: HMS, feats: dict[str, Tensor]) -> tuple[ForwardOutput, FeatureStepOps]:
    """Step-by-step forward that really skips, over raw features (N, T, D) per modality."""
    p_a = model.project("audio", feats["audio"])
    h_a = model.audio_path(p_a)
    n, steps, _ = p_a.shape
    ops = FeatureStepOps(model, feats)
    state = gating.GatedState.zeros(
        n, model.cfg.hidden_appearance, model.cfg.hidden_motion, device=p_a.device
    )
    g_i_all, g_m_all = [], []
    for t in range(steps):
        state, g_i, g_m = gating.gated_step(ops, t, p_a[:, t], h_a[:, t], state)
        g_i_all.append(g_i)
        g_m_all.append(g_m)
    out = ForwardOutput(
        logits=model.head.logits(state.h_m),
        appearance=torch.stack(g_i_all, dim=1).float(),
        motion=torch.stack(g_m_all, dim=1).float(),
    )
    return out, ops
