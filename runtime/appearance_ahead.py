"""Appearance frames of several steps in one backbone call, for plans known in advance.

The gated loop asks for the appearance feature of step t only when step t runs it. When
every video of a batch has a plan without a :data:`~hms_deploy.runtime.policy.GATE`
entry (a forced policy: ``dense``, ``every:...``, ``rates:...``; or the forced no-audio
policy of silent videos) and the run has no budget, every plan decision is the decision
that runs, so the steps that will run the appearance backbone are known before the loop
starts. :class:`AppearanceAhead` then decodes the frames of the next steps that run it
and computes their features in one ``appearance_backbone`` call, keeps the features on
the device and serves ``appearance_feature(t, rows)`` from them. Batching pays where
one frame cannot use the engine's parallelism (a CPU with more cores than one frame
keeps busy; on a GPU, one launch instead of k); the per-frame cost by batch size is in
benchmarks/results/appearance_batch_cpu_paper_onnx.md.

When it is used (:func:`appearance_ahead` returns None otherwise, and the scheduler
runs the step-by-step path):

- ``RunSettings.appearance_batch`` >= 2 frames per call, and ``appearance_batch // N`` >=
  2 steps per video for N videos in lockstep (lockstep already batches N frames per
  call; calls stay at most ``max(N, appearance_batch)`` frames, inside the backends'
  batch profiles);
- no budget: under a budget no work may be launched for a step that does not run, and a
  veto can turn a planned 1 into 0;
- no GATE entry in any video's appearance or motion plan. ``learned`` and
  ``dense-appearance`` (motion by its gate) keep the step-by-step path, so their gates
  see the same features as without read-ahead (bit-identical records); a motion gate on
  every step would end every chunk after one step anyway (below).

``online`` runs take it too: the head still runs after every step on that step's
state; only the appearance backbone runs ahead (a partial record's ``engine_calls`` and
``appearance_frames`` then include the frames of the chunk's later steps).

**Forward-only decoding.** The decoder walks forward; a motion clip reaches ~1 s behind
its step, and the retained window of decoded frames (:mod:`hms_deploy.runtime.frames`)
covers one clip behind the *current* step only. So a chunk never extends past a step
whose motion may run: it starts at the step asked for and takes the next steps that
run appearance, up to the per-video size, ending after the first one whose motion plan
is nonzero. The decoder then sees the same frame requests in the same order as step by
step (a chunk's frames in one read, which walks them in order), and seeks exactly as
often. ``dense`` therefore gains nothing (motion on every step); ``rates:0.6,0.03``
does.

**Decoding ahead.** The decode thread of each video (:mod:`hms_deploy.runtime.frames`)
normally runs two steps ahead; under a forced policy without a budget it may run twice a
chunk ahead (:func:`read_ahead_steps`, still capped in bytes), so that the next chunk's
frames decode while this chunk's backbone call runs.

Features are copied out of the engine's output (backends reuse their output buffers
across calls of one batch size) and dropped as their step takes them. The features of
one frame at batch k equal those at batch 1 to float tolerance, not bit for bit.
Counters: ``batches[v]``, the backbone calls that computed video v's frames ahead
(``stats.appearance_batches`` of its record).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from hms_deploy.runtime.engines import EngineSet
from hms_deploy.runtime.options import RunSettings
from hms_deploy.runtime.policy import GATE
from hms_deploy.runtime.records import VideoRun
from hms_deploy.runtime.timing import Timer
from hms_deploy.transfer import to_device

Tensor = torch.Tensor

__all__ = ["AppearanceAhead", "appearance_ahead", "chunk_steps", "read_ahead_steps"]


def chunk_steps(
    appearance: np.ndarray[Any, Any], motion: np.ndarray[Any, Any], t: int, size: int
) -> list[int]:
    """The steps whose appearance frames one call computes, asked for at step ``t``.

    ``t``, then the following steps whose ``appearance`` plan is 1, ``size`` steps at most,
    ending after the first step (``t`` included) whose ``motion`` plan is nonzero (its
    clip reaches behind the frames already read; see the module docstring).
    """
    steps = [t]
    if motion[t]:
        return steps
    for u in range(t + 1, len(appearance)):
        if len(steps) >= size:
            break
        if appearance[u]:
            steps.append(u)
            if motion[u]:
                break
    return steps


class AppearanceAhead:
    """Appearance features of ``videos`` computed ahead, ``size`` steps per video per call."""

    def __init__(self, es: EngineSet, videos: Sequence[VideoRun], timer: Timer, size: int):
        self.es = es
        self.videos = videos
        self.timer = timer
        self.size = size
        self.batches = [0] * len(videos)
        # (video, step) -> (features of one call (F, P) on the device, row)
        self._ready: dict[tuple[int, int], tuple[Tensor, int]] = {}

    def features(self, t: int, vids: list[int]) -> Tensor:
        """``(len(vids), P)`` appearance features of step ``t`` of videos ``vids`` (device)."""
        missing = [v for v in vids if (v, t) not in self._ready]
        if missing:
            self._fill(t, missing)
        rows = [self._ready.pop((v, t)) for v in vids]
        if len(rows) == 1:
            feat, r = rows[0]
            return feat[r:r + 1]
        return torch.cat([feat[r:r + 1] for feat, r in rows])

    def _fill(self, t: int, vids: list[int]) -> None:
        """One backbone call over the chunks of ``vids`` that start at step ``t``."""
        chunks = []
        for v in vids:
            plan = self.videos[v].plan
            assert plan is not None  # appearance_ahead() checked every plan
            chunks.append(chunk_steps(plan.appearance, plan.motion, t, self.size))
        with self.timer.host_section("decode"):
            frames = np.concatenate([self.videos[v].inputs.appearance_steps(c)
                                     for v, c in zip(vids, chunks)])
            x = to_device(frames, self.es.device)
        with self.timer.device_section("appearance"):
            # a copy: backends reuse their output buffers across calls of one batch size
            feat = self.es.engines["appearance_backbone"]({"frame": x})["feat"].clone()
        row = 0
        for v, c in zip(vids, chunks):
            self.batches[v] += 1
            for u in c:
                self._ready[(v, u)] = (feat, row)
                row += 1


def _steps_per_call(opts: RunSettings, n_videos: int) -> int:
    """Steps per video in one call; 0 where the run cannot compute ahead whatever the
    plans (under 2 steps, or a budget)."""
    size = int(opts.appearance_batch) // max(1, n_videos)
    return 0 if size < 2 or opts.budget is not None else size


def read_ahead_steps(opts: RunSettings, n_videos: int) -> int:
    """Steps' worth of frames the decode thread may run ahead of the step loop
    (:func:`~hms_deploy.runtime.frames.open_video`): 2, or twice a chunk's steps when the
    run may compute appearance ahead, so that decoding the next chunk overlaps the
    backbone call of this one (a chunk of k appearance steps spans k / PI steps)."""
    size = _steps_per_call(opts, n_videos)
    if not size or not opts.parsed_policy.forced:
        return 2
    return max(2, 2 * size)


def appearance_ahead(
    es: EngineSet, videos: Sequence[VideoRun], opts: RunSettings, timer: Timer
) -> AppearanceAhead | None:
    """An :class:`AppearanceAhead` when the run may compute appearance ahead, else None
    (the conditions are in the module docstring). ``videos`` have their plans."""
    size = _steps_per_call(opts, len(videos))
    if not size:
        return None
    for v in videos:
        plan = v.plan
        if plan is None:
            return None
        if (plan.appearance == GATE).any() or (plan.motion == GATE).any():
            return None
    return AppearanceAhead(es, videos, timer, size)
