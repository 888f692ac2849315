"""End-to-end parity: the runtime's own gated loop on the reference and candidate engines.

Each :class:`~hms_deploy.runtime.engines.EngineSet` classifies the same decoded video
with :func:`hms_deploy.runtime.scheduler.run_batch` (the ``learned`` policy, no budget):
the scheduler's step ops, decode on demand and :func:`hms_deploy.gating.gated_step`,
exactly as ``hms-run`` serves it. The gate and head engines are observed (their outputs
copied as they run) for the tie analysis and the class probabilities. Both runs must
take the same decision at every step and reach the same top-1 class with probabilities
within ``probs_atol``; a decision may differ only at a tie on the reference side, after
which the runs are not compared.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch

from hms_deploy.export.figures import Tolerance, compare, num
from hms_deploy.runtime.engine import Engine
from hms_deploy.runtime.engines import EngineSet
from hms_deploy.runtime.options import resolve_options
from hms_deploy.runtime.scheduler import run_batch

Tensor = torch.Tensor
OBSERVED = ("appearance_gate", "motion_gate", "head")


class _Observed(Engine):
    """An open engine whose outputs are copied to the host after every call."""

    def __init__(self, inner: Engine):
        super().__init__(inner.spec, inner.device)
        self.backend = inner.backend
        self.inner = inner
        self.seen: list[dict[str, Tensor]] = []

    def open(self) -> None:
        if not self.inner.is_open:
            raise RuntimeError(f"{self.name}: the observed engine must be open")

    def close(self) -> None:  # the inner engine belongs to its EngineSet
        pass

    def run(self, inputs: dict[str, Tensor], n: int) -> dict[str, Tensor]:
        out = self.inner(inputs)
        self.seen.append({k: v.detach().to("cpu", copy=True) for k, v in out.items()})
        return out


@dataclasses.dataclass
class GatedRun:
    """One video through the runtime's gated loop (N = 1, T steps)."""

    appearance: list[int]
    motion: list[int]
    probs: Tensor  # (1, C) host
    margins: dict[str, dict[int, float]]  # gate -> step -> |logit[1] - logit[0]|
    record: dict[str, Any]


@torch.no_grad()
def gated_run(engines: EngineSet, video: str | Path, steps: int) -> GatedRun:
    """Classify ``video`` with the runtime on ``engines`` (opened); see the module docstring."""
    observed = {n: _Observed(engines.engines[n]) for n in OBSERVED}
    for e in observed.values():
        e.__enter__()
    view = dataclasses.replace(engines, engines={**engines.engines, **observed})
    records: list[dict[str, Any]] = []
    for records in run_batch(view, [str(video)], resolve_options(view, steps=steps)):
        pass
    rec = records[0]
    a, m = rec["decisions"]["appearance"], rec["decisions"]["motion"]

    def margin(out: dict[str, Tensor]) -> float:
        return float((out["logits"][0, 1] - out["logits"][0, 0]).abs())

    margins = {
        "appearance": {t: margin(o) for t, o in enumerate(observed["appearance_gate"].seen)},
        "motion": {t: margin(o) for t, o in
                   zip([t for t, d in enumerate(a) if d], observed["motion_gate"].seen)},
    }
    return GatedRun(list(a), list(m), observed["head"].seen[-1]["probs"], margins, rec)


def end_to_end(
    ref: EngineSet, cand: EngineSet, video: str | Path, steps: int, tol: Tolerance,
) -> dict[str, Any]:
    """The end-to-end figures (JSON types, ``ok`` says whether they pass)."""
    names = (ref.backend, cand.backend)
    a = gated_run(ref, video, steps)
    b = gated_run(cand, video, steps)
    same = a.appearance == b.appearance and a.motion == b.motion
    top_a, top_b = int(a.probs[0].argmax()), int(b.probs[0].argmax())
    rep: dict[str, Any] = {
        "steps": len(a.appearance),
        "decisions_equal": same,
        "appearance": a.appearance,
        "motion": a.motion,
        f"appearance_{names[1]}": b.appearance,
        f"motion_{names[1]}": b.motion,
        "usage": {"appearance": sum(a.appearance), "motion": sum(a.motion)},
        f"top1_{names[0]}": top_a,
        f"top1_{names[1]}": top_b,
        "probs": compare(a.probs, b.probs, Tolerance(rtol=0.0, atol=tol.probs_atol, cosine_min=0.0)),
        "motion_backbone_runs": {names[0]: a.record["stats"]["motion_clips"],
                                 names[1]: b.record["stats"]["motion_clips"]},
    }
    ok = same and top_a == top_b and rep["probs"]["ok"]
    if not same:
        # Allowed only if the first differing decision was a tie on the reference side.
        t = next(i for i, (x, y, u, v) in enumerate(zip(a.appearance, b.appearance, a.motion, b.motion))
                 if x != y or u != v)
        m = min(a.margins["appearance"].get(t, math.inf), a.margins["motion"].get(t, math.inf))
        rep["first_difference"] = {"step": t, "reference_margin": num(m)}
        if m <= tol.tie_margin:
            rep["diverged_at_tie"] = True
            ok = True
    rep["ok"] = bool(ok)
    return rep
