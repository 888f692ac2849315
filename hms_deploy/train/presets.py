"""Named training settings for ``hms-train`` (``--preset``), and the small-validation check.

- ``paper``: docs/method.md §4 (:class:`~hms_deploy.train.config.TrainConfig`'s defaults: lr
  1e-4 decayed by 0.92 per epoch, 30 epochs, usage weight lambda 2), made for tens of
  thousands of videos (FCVID, ActivityNet).
- ``small``: for a few hundred videos, the synthetic quality study's settings
  (``benchmarks/synthetic_quality.py``, where the comparison with ``paper`` is): lr 1e-3
  decayed by 0.97, 60 epochs (early fusion: 40), lambda 5, and a motion usage target
  gamma_M of 0. The usage loss is per video, so at a small T a target of 0.05 (0.4 steps
  at T = 8) charges one motion step barely more than none ((1/8 - 0.05)^2 vs 0.05^2) and
  nothing moves a gate that runs motion once on every video whatever its class; with 0
  one step costs five times that difference, still far less than what a class that needs
  motion loses without it (``benchmarks/results/demo_diagnosis.md`` section 5).
- ``auto`` (``hms-train``'s default): ``small`` when the training videos number fewer
  than :data:`SMALL_DATA_VIDEOS`, else ``paper``.

Options given explicitly on the command line override the preset's values.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from hms_deploy.errors import Note
from hms_deploy.train.config import TrainConfig

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {"hms": {}, "early_fusion": {}},
    "small": {
        "hms": {"epochs": 60, "lr": 1e-3, "lr_decay": 0.97, "lam": 5.0, "gamma_m": 0.0},
        "early_fusion": {"epochs": 40, "lr": 1e-3, "lr_decay": 0.97},
    },
}
SMALL_DATA_VIDEOS = 2000  # below this many training videos, "auto" picks "small"

# A validation set smaller than this says little: with one video of a class its AP is
# 1.0 or 1/rank by chance, and mAP over a handful of videos can read 1.0 while top-1 is
# 0 (4 videos did). Below either bound hms-train / hms-finetune warn.
MIN_VAL_VIDEOS = 10
MIN_VAL_VIDEOS_PER_CLASS = 2


def resolve_preset(name: str, n_train_videos: int) -> str:
    """``auto`` -> ``small`` or ``paper`` by the number of training videos."""
    if name == "auto":
        return "small" if n_train_videos < SMALL_DATA_VIDEOS else "paper"
    if name not in PRESETS:
        from hms_deploy.errors import ConfigError

        raise ConfigError(f"preset {name!r}, expected auto or one of {sorted(PRESETS)}")
    return name


def preset_defaults(name: str) -> str:
    """A :class:`~hms_deploy.train.config.TrainConfig` field's value under each preset, for
    ``--help`` (``the preset's: paper 30, small 60 (early fusion 40)``)."""
    default = getattr(TrainConfig(), name)
    parts = []
    for preset, policies in PRESETS.items():
        value = policies["hms"].get(name, default)
        text = f"{preset} {value:g}"
        if policies["early_fusion"].get(name, value) != value:
            text += f" (early fusion {policies['early_fusion'][name]:g})"
        parts.append(text)
    return "the preset's: " + ", ".join(parts)


def preset_values(name: str, policy: str) -> dict[str, Any]:
    """The TrainConfig fields a preset sets for ``policy`` (``hms`` / ``early_fusion``)."""
    return dict(PRESETS[name][policy])


def small_validation_warning(labels: NDArray[np.int64], class_names: list[str], *,
                             setting: str = "val_store") -> Note | None:
    """A one-line warning when the validation set (``labels``: class index per video) has
    fewer than :data:`MIN_VAL_VIDEOS` videos or a class with fewer than
    :data:`MIN_VAL_VIDEOS_PER_CLASS`; else None. It names ``setting``, where the caller
    takes its validation videos from."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(class_names))
    thin = [f"{class_names[c]} ({int(n)})" for c, n in enumerate(counts)
            if n < MIN_VAL_VIDEOS_PER_CLASS]
    if len(labels) >= MIN_VAL_VIDEOS and not thin:
        return None
    what = f"{len(labels)} videos"
    if thin:
        shown = ", ".join(thin[:6]) + (f" and {len(thin) - 6} more" if len(thin) > 6 else "")
        what += f"; fewer than {MIN_VAL_VIDEOS_PER_CLASS} for {shown}"
    return Note(f"validation set too small to mean much ({what}; want >= {MIN_VAL_VIDEOS} "
                f"videos and >= {MIN_VAL_VIDEOS_PER_CLASS} per class): its mAP/accuracy and the "
                f"epoch kept are noise; give more videos ({setting})", settings=(setting,))
