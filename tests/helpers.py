"""Test helpers shared by several test files (model fixtures that make gate decisions mixed)."""

from __future__ import annotations

import math

import numpy as np
import torch

from hms_deploy.model.hms import HMS

MODALITIES = ("audio", "appearance", "motion")


def video_features(store, key: str) -> dict[str, np.ndarray]:
    """One video's float32 features in a FeatureStore: ``{modality: (T, D)}``."""
    return {m: a[0] for m, a in store.read([store.keys().index(key)]).items()}


@torch.no_grad()
def call_part(module, spec, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run a torch part on named inputs; its outputs by name (spec order)."""
    out = module(*[inputs[t.name] for t in spec.inputs])
    outs = out if isinstance(out, tuple) else (out,)
    assert len(outs) == len(spec.outputs), f"{spec.name}: {len(outs)} outputs"
    return {t.name: o for t, o in zip(spec.outputs, outs)}


def random_features(cfg, n: int, steps: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Raw per-step features (N, T, D) with a few magnitudes, like real backbone outputs."""
    g = torch.Generator().manual_seed(seed)
    return {
        m: torch.randn(n, steps, cfg.backbone(m).feat_dim, generator=g) * (0.5 + i)
        for i, m in enumerate(MODALITIES)
    }


@torch.no_grad()
def make_gates_mixed(
    model: HMS, feats: dict[str, torch.Tensor], *, appearance: float = 0.5, motion: float = 0.4,
    seed: int = 0,
) -> None:
    """Rescale and shift the gates so that decisions are mixed on ``feats``.

    Appearance fires on roughly ``appearance`` of the steps, motion on roughly ``motion``
    of the steps where appearance ran. Done by setting the "use" bias to a quantile of
    the logit margin observed on the masked forward, twice (the second pass accounts for
    the changed states).
    """
    g = torch.Generator().manual_seed(seed)
    for gate in (model.appearance_gate, model.motion_gate):
        w = gate.linear.weight
        w.copy_(torch.randn(w.shape, generator=g) / w.shape[1] ** 0.5 * 3.0)
        gate.linear.bias.zero_()
    for _ in range(3):
        margins: dict[str, list[torch.Tensor]] = {"appearance_gate": [], "motion_gate": []}
        hooks = []
        for name, seen in margins.items():
            def hook(mod, args, out, seen=seen):
                seen.append(out[1][:, 1] - out[1][:, 0])
            hooks.append(model.part(name).register_forward_hook(hook))
        out = model.masked_forward(feats)
        for h in hooks:
            h.remove()
        m_i = torch.cat(margins["appearance_gate"])
        gi = out.appearance.flatten().bool()
        m_m = torch.stack(margins["motion_gate"], 1).flatten()[gi]
        model.appearance_gate.linear.bias[1] -= torch.quantile(m_i, 1 - appearance)
        if m_m.numel():
            model.motion_gate.linear.bias[1] -= torch.quantile(m_m, 1 - motion)


def appearance_calls(appearance, motion, per_call: int) -> int:
    """``appearance_backbone`` calls of one forced plan with ``per_call`` steps per call
    (runtime/appearance_ahead.py), written independently: the appearance steps split into
    segments that end at a step whose motion runs (its clip must be read before later
    frames), each segment in ceil(len / per_call) calls."""
    calls = seg = 0
    for a, m in zip(list(appearance), list(motion)):
        if a:
            seg += 1
            if m:
                calls += math.ceil(seg / per_call)
                seg = 0
    return calls + math.ceil(seg / per_call)
