"""The options of a run (steps T, policy, budget, online, top-k), checked against the model."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from hms_deploy.costs import BudgetLedger, step_costs
from hms_deploy.errors import ConfigError
from hms_deploy.runtime.checks import parse_no_audio_policy
from hms_deploy.runtime.engines import EngineSet
from hms_deploy.runtime.frames import DecodeOptions
from hms_deploy.runtime.policy import Policy, parse_policy

DEFAULT_APPEARANCE_BATCH = 8  # measured: benchmarks/results/appearance_batch_cpu_paper_onnx.md


@dataclass(frozen=True)
class RunOptions:
    """Validated options of a run (see :func:`resolve_options`)."""

    steps: int
    policy: Policy
    budget: float | None = None
    online: bool = False
    topk: int = 5
    audio_batch: int = 64  # patches per audio_backbone call
    # videos without audio (runtime/checks.py): None = refuse them ("error")
    no_audio: Policy | None = field(default_factory=lambda: parse_no_audio_policy(None))
    allow_truncated: bool = False  # classify the decodable part of a truncated file
    decode: DecodeOptions = field(default_factory=DecodeOptions)  # thread / skipping; same frames
    # appearance frames per backbone call when plans are known in advance (forced policies
    # without a budget; runtime/appearance_ahead.py); 1: one step at a time
    appearance_batch: int = DEFAULT_APPEARANCE_BATCH


def resolve_options(
    engine_set: EngineSet,
    *,
    steps: int | None = None,
    policy: str | Policy = "learned",
    budget: float | None = None,
    online: bool = False,
    topk: int = 5,
    audio_batch: int = 64,
    no_audio_policy: str | Policy | None = None,
    allow_truncated: bool = False,
    appearance_batch: int = DEFAULT_APPEARANCE_BATCH,
) -> RunOptions:
    """Check options against the model; :class:`ConfigError` with one clear line if bad.

    ``steps`` defaults to the model's T. A ``budget`` (GMAC) must be > 0 and afford at
    least one step (its base cost plus the head). ``no_audio_policy``: a policy or
    ``"error"`` (default ``dense-appearance``; :mod:`hms_deploy.runtime.checks`).
    ``appearance_batch``: appearance frames per backbone call where the plans are known
    in advance (:mod:`hms_deploy.runtime.appearance_ahead`; 1 = step by step).
    """
    if steps is None:
        steps = engine_set.config.steps
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ConfigError(f"steps must be an integer >= 1, got {steps!r}")
    pol = parse_policy(policy)
    if budget is not None:
        try:
            budget = float(budget)
        except (TypeError, ValueError):
            raise ConfigError(f"budget must be a number of GMAC > 0, got {budget!r}") from None
        if not budget > 0 or not math.isfinite(budget):
            raise ConfigError(f"budget must be a number of GMAC > 0, got {budget:g}")
        s = step_costs(engine_set.costs)
        first = s["base"] + s["head"]
        if budget < first * (1 - BudgetLedger.EPS):
            raise ConfigError(
                f"budget {budget:g} GMAC cannot afford one step (base {s['base']:.4g} GMAC "
                f"+ head {s['head']:.4g} GMAC = {first:.4g} GMAC)"
            )
    if isinstance(topk, bool) or not isinstance(topk, (int, np.integer)) or topk < 1:
        raise ConfigError(f"topk must be an integer >= 1, got {topk!r}")
    if audio_batch < 1:
        raise ConfigError(f"audio_batch must be >= 1, got {audio_batch}")
    if (isinstance(appearance_batch, bool) or not isinstance(appearance_batch, (int, np.integer))
            or appearance_batch < 1):
        raise ConfigError(f"appearance_batch must be an integer >= 1, got {appearance_batch!r}")
    return RunOptions(int(steps), pol, budget, bool(online), int(topk), int(audio_batch),
                      no_audio=parse_no_audio_policy(no_audio_policy),
                      allow_truncated=bool(allow_truncated),
                      appearance_batch=int(appearance_batch))
