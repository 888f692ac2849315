"""The cost model (HMS_SPEC.md 5), in GMAC (multiply-accumulates; the paper's "GFLOPs").

Per-part costs are measured from the configured graph with ``torch.utils.flop_counter``
(which counts 2 FLOPs per MAC), at batch 1, and stored in the checkpoint and manifest.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from hms_deploy.parts import PART_NAMES, part_specs

UNIT = "GMAC"

def example_inputs(cfg, n: int = 1, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Random inputs for every part, batch ``n``: {part: {input name: tensor}}."""
    from hms_deploy.export.parts import random_inputs

    return {name: random_inputs(ps, n, seed=seed) for name, ps in part_specs(cfg).items()}


@torch.no_grad()
def measure_part_costs(model, parts: Sequence[str] = PART_NAMES) -> dict[str, float]:
    """GMAC per sample of each part, measured at batch 1 on the CPU."""
    model = model.eval()
    inputs = example_inputs(model.cfg)
    costs = {}
    for name in parts:
        counter = FlopCounterMode(display=False)
        with counter:
            model.part(name)(*inputs[name].values())
        costs[name] = counter.get_total_flops() / 2.0 / 1e9
    return costs


def step_costs(costs: dict[str, float]) -> dict[str, float]:
    """What one step costs per tier (HMS_SPEC.md 5): base, appearance extra, motion extra."""
    return {
        "base": costs["audio_backbone"] + costs["audio_cell"] + costs["appearance_gate"],
        "appearance": costs["appearance_backbone"] + costs["appearance_cell"] + costs["motion_gate"],
        "motion": costs["motion_backbone"] + costs["motion_cell"],
        "head": costs["head"],
    }


def video_cost(
    costs: dict[str, float], *, steps: int, appearance: int, motion: int, predictions: int = 1
) -> float:
    """GMAC of one video: ``steps`` processed, ``appearance``/``motion`` = usage counts."""
    s = step_costs(costs)
    return (steps * s["base"] + appearance * s["appearance"] + motion * s["motion"]
            + predictions * s["head"])


def dense_cost(costs: dict[str, float], steps: int) -> float:
    """The same model with every gate on for all ``steps`` steps, one prediction."""
    return video_cost(costs, steps=steps, appearance=steps, motion=steps)
