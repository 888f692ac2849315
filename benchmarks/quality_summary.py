"""The synthetic quality study over seeds: mean and spread of every figure, and the
targets checked on the means (per-seed targets are checked by the study itself)."""

from __future__ import annotations

import numpy as np


def _mean_std(values: list[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max())}


def summarize(per_seed: dict[str, dict]) -> dict:
    """Mean and standard deviation (ddof 1) over seeds, and the targets on the means."""
    runs = list(per_seed.values())
    groups = runs[0]["motion_usage_by_group"]
    summary = {
        "hms_map": _mean_std([r["hms"]["map"] for r in runs]),
        "early_fusion_map": _mean_std([r["early_fusion"]["map"] for r in runs]),
        "hms_top1": _mean_std([r["hms"]["top1"] for r in runs]),
        "early_fusion_top1": _mean_std([r["early_fusion"]["top1"] for r in runs]),
        "hms_gmacs_per_video": _mean_std([r["hms"]["gmacs_per_video"] for r in runs]),
        "early_fusion_gmacs_per_video": _mean_std(
            [r["early_fusion"]["gmacs_per_video"] for r in runs]),
        "gmac_ratio_hms_to_early_fusion": _mean_std(
            [r["gmac_ratio_hms_to_early_fusion"] for r in runs]),
        "motion_usage_by_group": {g: _mean_std([r["motion_usage_by_group"][g] for r in runs])
                                  for g in groups},
    }
    accs = [r["finetune_val_step_accuracy"] for r in runs]
    if all(a is not None for a in accs):
        summary["finetune_val_step_accuracy"] = _mean_std(accs)
    m = {k: v["mean"] for k, v in summary.items() if "mean" in v}
    usage = {g: v["mean"] for g, v in summary["motion_usage_by_group"].items()}
    targets = {
        "mean_hms_map_at_least_0.95": m["hms_map"] >= 0.95,
        "mean_hms_map_within_1pt_of_early_fusion": m["hms_map"] >= m["early_fusion_map"] - 0.01,
        "mean_hms_gmacs_at_most_60pct_of_early_fusion":
            m["hms_gmacs_per_video"] <= 0.6 * m["early_fusion_gmacs_per_video"],
        "mean_motion_group_motion_usage_at_least_10pct": usage["motion"] >= 0.10,
        "mean_motion_group_at_least_2x_audio_group": usage["motion"] >= 2.0 * usage["audio"],
    }
    if "finetune_val_step_accuracy" in summary:
        targets["mean_finetune_val_step_accuracy_at_least_0.9"] = (
            summary["finetune_val_step_accuracy"]["mean"] >= 0.9)
    missed = {seed: [k for k, ok in r["targets"].items() if not ok]
              for seed, r in per_seed.items()}
    return {"summary": summary, "targets_on_mean": targets,
            "targets_missed": {"per_seed": {s: v for s, v in missed.items() if v},
                               "mean": [k for k, ok in targets.items() if not ok]},
            "targets_met": all(targets.values()) and all(r["targets_met"] for r in runs)}
