"""``hms-eval`` as a library: metrics, costs, usage and the test-time budget curve
(docs/method.md §5-§6) of a checkpoint on a feature store."""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from hms_deploy.checkpoint import Checkpoint
from hms_deploy.costs import UNIT, dense_cost, step_costs
from hms_deploy.data.feature_batches import FeatureSource
from hms_deploy.data.features import FeatureStore
from hms_deploy.data.store_meta import backbone_hash
from hms_deploy.errors import ConfigError, DatasetError, require_at_least
from hms_deploy.eval.predict import (
    Predictions,
    predict_budgeted,
    predict_early_fusion,
    predict_hms,
)
from hms_deploy.metrics import average_precision_per_class, top1_accuracy
from hms_deploy.model.hms import HMS
from hms_deploy.version import __version__


def _metrics(pred: Predictions, labels: NDArray[np.int64], interpolated: bool) -> dict[str, Any]:
    ap = average_precision_per_class(pred.scores, labels, interpolated=interpolated)
    return {
        "map": ap.mean,
        "n_classes_excluded": ap.n_excluded,
        "top1": top1_accuracy(pred.scores, labels),
        "gmacs_per_video": float(pred.gmacs.mean()) if pred.gmacs.size else float("nan"),
        "mean_steps": float(pred.steps.mean()) if pred.steps.size else float("nan"),
    }


def _usage_fractions(pred: Predictions) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Per video: fraction of *processed* steps that ran appearance / motion."""
    assert pred.appearance is not None and pred.motion is not None  # an HMS model's
    steps = np.maximum(pred.steps, 1)
    return pred.appearance.sum(1) / steps, pred.motion.sum(1) / steps


def default_budgets(costs: dict[str, float], used: NDArray[np.float64]) -> list[float]:
    """Eight budgets, geometric from 5 % of the mean unbudgeted GMAC/video to the most any
    video used (where the curve meets the unbudgeted point); never below one step."""
    s = step_costs(costs)
    lo = max(s["base"] + s["head"], 0.05 * float(np.mean(used)))
    hi = max(float(np.max(used)), 2 * lo)
    return [float(b) for b in np.geomspace(lo, hi, 8)]


SAMPLE_VIDEOS = 12  # videos in the per-step usage heat map


def check_evaluate_settings(*, sample_videos: int | None = None) -> None:
    """The settings of :func:`evaluate` (one left at None is not checked)."""
    require_at_least("sample_videos", sample_videos, 0)


def evaluate(
    ckpt: Checkpoint,
    store: FeatureStore,
    *,
    budgets: Sequence[float] | None = None,
    interpolated: bool = False,
    groups: dict[str, str] | None = None,
    sample_videos: int = SAMPLE_VIDEOS,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Evaluate ``ckpt`` (HMS or early fusion) on every video of ``store``.

    Returns a JSON-ready dict: ``map`` (non-interpolated unless ``interpolated``),
    ``n_classes_excluded``, ``top1``, ``gmacs_per_video`` (mean GMAC used, cost model on
    the argmax decisions), ``dense_gmacs_per_video``; for HMS also ``usage`` (fraction of
    steps running appearance / motion), ``usage_per_class``, ``budget_curve`` (one entry
    per budget, plus ``inf``), ``samples`` (per-step decisions of some videos) and, with
    ``groups`` ({class: group}), ``usage_by_group``.
    """
    check_evaluate_settings(sample_videos=sample_videos)
    t0 = time.perf_counter()
    store.check_backbones(backbone_hash(ckpt.config, ckpt.state_dict))
    if store.labels != list(ckpt.labels):
        raise DatasetError(f"{store.root}: store labels differ from the checkpoint's")
    if len(store) == 0:
        raise DatasetError(f"{store.root}: the store holds no video")
    steps = store.steps
    labels = store.label_indices()
    costs = dict(ckpt.costs)
    result: dict[str, Any] = {
        "store": str(store.root), "videos": len(store), "steps": steps,
        "policy": ckpt.policy, "modalities": list(ckpt.modalities), "unit": UNIT,
        "interpolated": bool(interpolated), "labels": list(ckpt.labels),
    }
    if ckpt.policy == "early_fusion":
        from hms_deploy.config import modalities_tag
        from hms_deploy.model.baselines import build_early_fusion

        fusion = build_early_fusion(ckpt)
        source = FeatureSource(store, None, fusion.modalities)
        pred = predict_early_fusion(fusion, source, costs, batch_size)
        result.update(_metrics(pred, labels, interpolated))
        result["name"] = f"early fusion {modalities_tag(fusion.modalities)}"
        result["dense_gmacs_per_video"] = result["gmacs_per_video"]
    elif ckpt.policy == "hms":
        model = ckpt.build_model()
        source = FeatureSource(store)
        pred = predict_hms(model, source, costs, batch_size)
        result.update(_metrics(pred, labels, interpolated))
        result["max_gmacs_per_video"] = float(pred.gmacs.max())
        result["name"] = "HMS"
        result["dense_gmacs_per_video"] = dense_cost(costs, steps)
        result.update(_usage(pred, labels, list(ckpt.labels), groups))
        result["samples"] = _samples(pred, labels, store, sample_videos)
        if budgets is None:
            budgets = default_budgets(costs, pred.gmacs)
        result["budget_curve"] = budget_curve(model, source, costs, labels, budgets,
                                              interpolated, batch_size)
    else:
        raise ConfigError(f"cannot evaluate a {ckpt.policy!r} checkpoint")
    result["seconds"] = time.perf_counter() - t0
    result["versions"] = _versions()
    return result


def budget_curve(model: HMS, source: FeatureSource, costs: dict[str, float], labels: NDArray[np.int64],
                 budgets: Sequence[float], interpolated: bool = False,
                 batch_size: int = 64) -> list[dict[str, Any]]:
    """mAP etc. at each budget (GMAC per video, ``inf`` allowed); sorted, ``inf`` last."""
    s = step_costs(costs)
    floor = s["base"] + s["head"]
    out = []
    for b in sorted({float(x) for x in budgets} | {math.inf}):
        if b < floor * (1 - 1e-9):
            raise ConfigError(
                f"budget {b:g} GMAC cannot afford one step (base {s['base']:.4g} + head "
                f"{s['head']:.4g} GMAC)"
            )
        pred = predict_budgeted(model, source, costs, b, batch_size)
        if pred.gmacs.max(initial=0.0) > b * (1 + 1e-9):
            raise RuntimeError(f"budget {b} exceeded: {pred.gmacs.max()}")  # the rule's guarantee
        ui, um = _usage_fractions(pred)
        out.append({"budget": None if math.isinf(b) else b, **_metrics(pred, labels, interpolated),
                    "max_gmacs": float(pred.gmacs.max()),
                    "usage": {"appearance": float(ui.mean()), "motion": float(um.mean())}})
    return out


def _usage(pred: Predictions, labels: NDArray[np.int64], names: list[str],
           groups: dict[str, str] | None) -> dict[str, Any]:
    ui, um = _usage_fractions(pred)
    per_class = {}
    for c, name in enumerate(names):
        sel = labels == c
        if sel.any():
            per_class[name] = {"appearance": float(ui[sel].mean()), "motion": float(um[sel].mean()),
                               "videos": int(sel.sum())}
    out: dict[str, Any] = {
        "usage": {"appearance": float(ui.mean()), "motion": float(um.mean())},
        "usage_per_class": per_class,
    }
    if groups:
        by_group: dict[str, dict[str, float]] = {}
        for g in sorted(set(groups.values())):
            sel = np.isin(labels, [c for c, n in enumerate(names) if groups.get(n) == g])
            if sel.any():
                by_group[g] = {"appearance": float(ui[sel].mean()), "motion": float(um[sel].mean()),
                               "videos": int(sel.sum())}
        out["usage_by_group"] = by_group
    return out


def _samples(pred: Predictions, labels: NDArray[np.int64], store: FeatureStore,
             k: int) -> list[dict[str, Any]]:
    """Per-step decisions of up to ``k`` videos, spread over the classes (for Fig. 6)."""
    assert pred.appearance is not None and pred.motion is not None  # an HMS model's
    order: list[int] = []
    per_class = [list(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    while len(order) < k and any(per_class):
        for lst in per_class:
            if lst and len(order) < k:
                order.append(int(lst.pop(0)))
    out = []
    for i in order:
        r = store.records[i]
        out.append({
            "key": r.key, "label": r.label,
            "predicted": store.labels[int(pred.scores[i].argmax())],
            "appearance": pred.appearance[i].tolist(), "motion": pred.motion[i].tolist(),
        })
    return out


def _versions() -> dict[str, str]:
    import torch

    return {"hms_deploy": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}
