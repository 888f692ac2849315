"""The cost model (docs/method.md §5), in GMAC (multiply-accumulates; the paper's "GFLOPs").

Per-part costs are measured from the configured graph with ``torch.utils.flop_counter``
(which counts 2 FLOPs per MAC), at batch 1, and stored in the checkpoint and manifest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from torch.utils.flop_counter import FlopCounterMode

from hms_deploy.parts import PART_NAMES, part_specs, random_inputs

if TYPE_CHECKING:
    from hms_deploy.config import HMSConfig
    from hms_deploy.model.hms import HMS

UNIT = "GMAC"

def example_inputs(cfg: HMSConfig, n: int = 1, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Random inputs for every part, batch ``n``: {part: {input name: tensor}}."""
    return {name: random_inputs(ps, n, seed=seed) for name, ps in part_specs(cfg).items()}


@torch.no_grad()
def measure_part_costs(model: HMS, parts: Sequence[str] = PART_NAMES) -> dict[str, float]:
    """GMAC per sample of each part, measured at batch 1 on the CPU."""
    model = model.eval()
    inputs = example_inputs(model.cfg)
    costs: dict[str, float] = {}
    for name in parts:
        counter = FlopCounterMode(display=False)
        with counter:
            model.part(name)(*inputs[name].values())
        costs[name] = counter.get_total_flops() / 2.0 / 1e9
    return costs


def step_costs(costs: dict[str, float]) -> dict[str, float]:
    """What one step costs per tier (docs/method.md §5): base, appearance extra, motion extra."""
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


class BudgetLedger:
    """GMAC spent per video under the test-time budget rule (docs/method.md §5), for N videos.

    With ``used`` the work launched so far for a video, ``head`` the head's cost and B
    the budget: a step starts only if ``used + base + head <= B``; a modality whose gate
    fires runs only if ``used + its tier cost + head <= B``, else it is vetoed (recorded
    0 and fused). The head is always reserved, so the prediction of the last finished
    step can be emitted and ``used <= B`` holds. ``budget=None`` (or inf) refuses
    nothing. Comparisons allow a relative ``EPS`` of slack (float sums of part costs).

    ``used`` (N,) float64 GMAC; ``vetoed[tier]`` (N,) int64 gate firings refused.
    The runtime's scheduler and the budgeted evaluation both keep their books here.
    """

    EPS = 1e-9

    def __init__(self, costs: dict[str, float], n: int, budget: float | None):
        self.tiers = step_costs(costs)
        self.budget = None if budget is None or math.isinf(budget) else float(budget)
        self.used = np.zeros(n, dtype=np.float64)
        self.vetoed = {"appearance": np.zeros(n, np.int64), "motion": np.zeros(n, np.int64)}

    def fits(self, rows: ArrayLike, extra: float) -> NDArray[np.bool_]:
        """bool (len(rows),): can each of these videos launch ``extra`` GMAC more?"""
        idx = np.asarray(rows, dtype=np.int64)
        if self.budget is None:
            return np.ones(idx.size, dtype=np.bool_)
        ok: NDArray[np.bool_] = self.used[idx] + extra + self.tiers["head"] <= self.budget * (1 + self.EPS)
        return ok

    def start_step(self, rows: ArrayLike) -> NDArray[np.int64]:
        """The videos of ``rows`` that can afford the next step's base cost, charged for it."""
        idx = np.asarray(rows, dtype=np.int64)
        ok = idx[self.fits(idx, self.tiers["base"])]
        self.used[ok] += self.tiers["base"]
        return ok

    def veto(self, tier: str, rows: ArrayLike, fired: ArrayLike) -> NDArray[np.int64]:
        """Decisions int64 (len(rows),) after the budget: fired and affordable; charged."""
        idx = np.asarray(rows, dtype=np.int64)
        want = np.asarray(fired).astype(np.bool_)
        ok = want & self.fits(idx, self.tiers[tier])
        self.vetoed[tier][idx[want & ~ok]] += 1
        self.used[idx[ok]] += self.tiers[tier]
        return ok.astype(np.int64)

    def charge(self, rows: ArrayLike, tier: str) -> None:
        """Charge one unit of ``tier`` (e.g. ``head`` for an emitted prediction)."""
        self.used[np.asarray(rows, dtype=np.int64)] += self.tiers[tier]

    def dense_steps_affordable(self, rows: ArrayLike, *, online: bool = False) -> int | None:
        """How many more steps with every modality on all of ``rows`` can surely afford
        (None: unbounded); a runtime may compute the ungated audio path that far ahead."""
        if self.budget is None:
            return None
        dense_step = self.tiers["base"] + self.tiers["appearance"] + self.tiers["motion"]
        if online:
            dense_step += self.tiers["head"]
        room = float(np.min(self.budget - self.used[np.asarray(rows, dtype=np.int64)]
                            - self.tiers["head"]))
        return math.floor(room / dense_step * (1 + self.EPS))
