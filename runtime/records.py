"""The record of one classified video: the dict ``hms-run --json`` prints (docs/record.md),
built here for every path (the scheduler, the dense baselines, serving and Ray, which run
the scheduler).

Fields beyond the documented ones are listed in :mod:`hms_deploy.runtime.session`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from hms_deploy.costs import UNIT, dense_cost, video_cost
from hms_deploy.data.inputs import VideoInputs
from hms_deploy.runtime.checks import VideoPlan
from hms_deploy.runtime.engines import EngineSet
from hms_deploy.runtime.options import RunSettings

Tensor = torch.Tensor


@dataclass
class VideoRun:
    """One video of a batch as it runs: its inputs, finished steps and decisions."""

    name: str
    inputs: VideoInputs
    steps_done: int = 0
    appearance: list[int] = field(default_factory=list)
    motion: list[int] = field(default_factory=list)
    probs: Tensor | None = None  # (C,) host, after the last finished step (online)
    plan: VideoPlan | None = None  # its per-step plan, warnings and fallback (runtime/checks.py)


@dataclass
class RunStats:
    """A run's counters for one record's ``stats`` (docs/record.md); the video's own input
    and decoder counters are added from its inputs. Fields left None are not the path's:
    ``vetoed`` / ``appearance_batches`` / ``audio_steps`` are the scheduler's,
    ``decision_reads`` / ``backbone_batch`` / ``audio_batch`` the baselines'."""

    host_reads: int
    prediction_reads: int
    engine_calls: dict[str, int]
    batch: int = 1
    vetoed: dict[str, int] | None = None
    appearance_batches: int | None = None
    audio_steps: int | None = None
    decision_reads: int | None = None
    backbone_batch: int | None = None
    audio_batch: int | None = None

    def as_dict(self, inputs: VideoInputs) -> dict[str, Any]:
        def some(**kv: Any) -> dict[str, Any]:
            return {k: v for k, v in kv.items() if v is not None}

        return {
            "host_reads": self.host_reads, "prediction_reads": self.prediction_reads,
            **some(decision_reads=self.decision_reads, backbone_batch=self.backbone_batch,
                   audio_batch=self.audio_batch),
            "batch": self.batch,
            **some(vetoed=self.vetoed),
            "appearance_frames": inputs.appearance_frames,
            **some(appearance_batches=self.appearance_batches),
            "motion_clips": inputs.motion_clips,
            **inputs.decode_stats,
            "engine_calls": self.engine_calls,
            **some(audio_steps=self.audio_steps),
        }


def build_record(
    es: EngineSet, opts: RunSettings, video: VideoRun, probs: Tensor, timing: dict[str, float], *,
    stats: RunStats, partial: bool = False, executor: str | None = None,
    launched: float | None = None,
) -> dict[str, Any]:
    """The record of ``video`` with class probabilities ``probs`` (C,) on the host.

    ``executor`` names a baseline (:mod:`hms_deploy.runtime.dense`) and ``launched`` the
    GMAC it launched: ``gflops.used`` is then that, and ``gflops.decided`` what its
    decisions would cost if the skipped work were skipped.
    """
    k = min(opts.topk, probs.numel())
    top = torch.topk(probs, k)
    top_list = [[es.labels[i], float(p)] for p, i in zip(top.values.tolist(), top.indices.tolist())]
    a, m = video.appearance, video.motion
    predictions = video.steps_done if opts.online else 1
    decided = video_cost(es.costs, steps=video.steps_done, appearance=sum(a), motion=sum(m),
                         predictions=predictions)
    gflops: dict[str, Any] = {"used": decided if launched is None else launched,
                              "dense": dense_cost(es.costs, opts.T)}
    if launched is not None:
        gflops["decided"] = decided
    gflops["unit"] = UNIT
    rec: dict[str, Any] = {
        "video": video.name,
        "label": top_list[0][0],
        "score": top_list[0][1],
        "topk": top_list,
        "steps": video.steps_done,
        "decisions": {"appearance": list(a), "motion": list(m)},
        "usage": {"appearance": sum(a), "motion": sum(m)},
        "gflops": gflops,
        "has_audio": bool(video.inputs.has_audio),
        "warnings": list(video.plan.warnings) if video.plan else [],
        "fallback": video.plan.fallback if video.plan else None,
        "engine": es.backend,
        "device": str(es.device),
        "policy": str(opts.policy),
        "budget": opts.budget,
        "T": opts.T,
        "export": es.export_sha256,
        **({"executor": executor} if executor is not None else {}),
        "timing_ms": timing,
        "coverage": video.inputs.sampler.audio_coverage(),
        "stats": stats.as_dict(video.inputs),
    }
    if partial:
        rec["partial"] = True
    return rec
