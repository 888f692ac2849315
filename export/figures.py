"""Parity figures: how far a candidate engine's outputs are from the reference's.

Per output (torch = reference, the other backend = candidate):

- ``max_abs``: max |candidate - reference|;
- ``max_rel``: ``max_abs / max |reference|`` (relative to the output's scale, because
  random-init features can be ~1e-5 where element-wise relative error is meaningless);
- ``cosine``: the smallest per-sample cosine similarity (rows flattened).

An output passes when ``max_abs <= atol + rtol * max|reference|`` and ``cosine >=
cosine_min`` (cosine is skipped for rows whose reference is ~0). Decisions (int64)
must agree exactly, except at ties (|logit[1] - logit[0]| <= ``tie_margin``, where
float rounding may legally flip the argmax; see :mod:`hms_deploy.export.validate`).

Polygraphy's ``Comparator.compare_accuracy`` checks each element against ``atol`` /
``rtol``; that rule is looser on tiny random-init outputs and has no cosine or tie
rule, so the figures here are computed on the outputs Polygraphy's ``Comparator.run``
collects (:mod:`hms_deploy.export.runners`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

Tensor = torch.Tensor

NOT_VALIDATED = "not validated"


@dataclass(frozen=True)
class Tolerance:
    rtol: float = 1e-4
    atol: float = 1e-6
    cosine_min: float = 0.9999
    tie_margin: float = 1e-4  # |logit diff| at or below this is a tie
    probs_atol: float = 1e-4  # end-to-end class probabilities


def num(x: float) -> float | str:
    """JSON-safe number (the manifest is strict JSON)."""
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf"
    return float(f"{x:.6g}")


def compare(ref: Tensor, got: Tensor, tol: Tolerance) -> dict[str, Any]:
    """Figures of one output (see the module docstring); ``ok`` says whether it passes."""
    if tuple(ref.shape) != tuple(got.shape):
        return {"ok": False, "error": f"shape {tuple(got.shape)}, expected {tuple(ref.shape)}"}
    if not ref.dtype.is_floating_point:
        mismatches = int((ref != got.to(ref.dtype)).sum())
        return {"ok": mismatches == 0, "mismatches": mismatches, "n": int(ref.numel())}
    r = ref.detach().double().cpu()
    g = got.detach().double().cpu()
    if not torch.isfinite(g).all():
        return {"ok": False, "error": "non-finite values", "max_abs": "nan"}
    diff = (g - r).abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    scale = float(r.abs().max()) if r.numel() else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    rows_r, rows_g = r.reshape(r.shape[0], -1), g.reshape(g.shape[0], -1)
    nr, ng = rows_r.norm(dim=1), rows_g.norm(dim=1)
    live = nr > max(scale, 1e-30) * 1e-6
    if live.any():
        cos = (rows_r[live] * rows_g[live]).sum(1) / (nr[live] * ng[live]).clamp_min(1e-300)
        cosine = float(cos.min())
    else:
        cosine = 1.0
    ok = max_abs <= tol.atol + tol.rtol * scale and cosine >= tol.cosine_min
    return {"ok": bool(ok), "max_abs": num(max_abs), "max_rel": num(max_rel),
            "cosine": num(cosine), "scale": num(scale)}


def worst(a: dict[str, Any] | None, b: dict[str, Any]) -> dict[str, Any]:
    """The worse of two figure sets of one output (``a`` may be None)."""
    if a is None:
        return b
    out = dict(b)
    out["ok"] = bool(a.get("ok")) and bool(b.get("ok"))
    for k in ("max_abs", "max_rel", "mismatches"):
        if k in a and k in b:
            out[k] = max(a[k], b[k], key=lambda v: math.inf if isinstance(v, str) else v)
    if "cosine" in a and "cosine" in b:
        out["cosine"] = min(a["cosine"], b["cosine"], key=lambda v: -math.inf if isinstance(v, str) else v)
    return out


def status(ok: bool, enforce: bool) -> str:
    if not enforce:
        return NOT_VALIDATED
    return "passed" if ok else "failed"


def mark(report: Any, enforce: bool) -> None:
    """Replace each figure group's ``ok`` by a status string (``not validated`` for fp16)."""
    if isinstance(report, dict):
        if "ok" in report:
            report["status"] = status(bool(report.pop("ok")), enforce)
        for v in report.values():
            mark(v, enforce)
    elif isinstance(report, list):
        for v in report:
            mark(v, enforce)
