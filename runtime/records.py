"""The record of one classified video: the dict ``hms-run --json`` prints (docs/record.md).

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
from hms_deploy.runtime.options import RunOptions

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


def build_record(
    es: EngineSet, opts: RunOptions, video: VideoRun, probs: Tensor, timing: dict[str, float], *,
    stats: dict[str, Any], partial: bool,
) -> dict[str, Any]:
    """The record of ``video`` with class probabilities ``probs`` (C,) on the host.

    ``stats``: the batch's counters (host reads, batch size, vetoes, engine calls); the
    video's own input and decoder counters are added here.
    """
    k = min(opts.topk, probs.numel())
    top = torch.topk(probs, k)
    top_list = [[es.labels[i], float(p)] for p, i in zip(top.values.tolist(), top.indices.tolist())]
    a, m = video.appearance, video.motion
    predictions = video.steps_done if opts.online else 1
    used = video_cost(es.costs, steps=video.steps_done, appearance=sum(a), motion=sum(m),
                      predictions=predictions)
    rec: dict[str, Any] = {
        "video": video.name,
        "label": top_list[0][0],
        "score": top_list[0][1],
        "topk": top_list,
        "steps": video.steps_done,
        "decisions": {"appearance": list(a), "motion": list(m)},
        "usage": {"appearance": sum(a), "motion": sum(m)},
        "gflops": {"used": used, "dense": dense_cost(es.costs, opts.steps), "unit": UNIT},
        "has_audio": bool(video.inputs.has_audio),
        "warnings": list(video.plan.warnings) if video.plan else [],
        "fallback": video.plan.fallback if video.plan else None,
        "engine": es.backend,
        "device": str(es.device),
        "policy": str(opts.policy),
        "budget": opts.budget,
        "T": opts.steps,
        "export": es.export_sha256,
        "timing_ms": timing,
        "stats": {
            "host_reads": stats["host_reads"],
            "prediction_reads": stats["prediction_reads"],
            "batch": stats["batch"],
            "vetoed": stats["vetoed"],
            "appearance_frames": video.inputs.appearance_frames,
            "appearance_batches": stats["appearance_batches"],
            "motion_clips": video.inputs.motion_clips,
            **video.inputs.decode_stats,
            "engine_calls": stats["engine_calls"],
            "audio_steps": stats["audio_steps"],
        },
    }
    if partial:
        rec["partial"] = True
    return rec
