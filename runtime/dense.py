"""Baseline executors over an EngineSet: what HMS is measured against (``benchmarks/``).

Both run the same decoded inputs through the same engines as the
:class:`~hms_deploy.runtime.session.Session` and return the same record (docs/record.md:
``hms-run --json`` keys, the same ``timing_ms`` keys and ``stats``), plus
``"executor"`` naming the baseline. Neither adds semantics: the stepping is
:func:`hms_deploy.gating.gated_step` / :func:`hms_deploy.gating.masked_step`.

:func:`classify_dense_batched` (the strongest dense baseline)
    Every modality on every step, with the backbones batched over steps: decode the
    inputs of ``batch`` steps at a time (the appearance frame and the 32-frame clip of
    each, in time order: one forward pass through the video), run each backbone once
    per ``batch`` steps (``ceil(T / batch)`` calls per backbone; the audio backbone uses
    ``audio_batch``, default ``batch``), then step the cells with every gate on:
    :func:`~hms_deploy.gating.gated_step` over a StepOps whose ``decide_*`` answer 1
    without a gate launch and whose ``*_feature`` return the precomputed features. Its
    probabilities equal the Session's with ``policy="dense"`` (the same model, every
    gate on), up to batched-vs-unbatched float rounding.

:func:`classify_compute_then_mask` (what research code does: AdaMML, AR-Net)
    Every backbone on every step, batched the same way, then
    :func:`~hms_deploy.gating.masked_step` over all T steps: every cell and both gates
    run on every step and the decisions select, by multiplication, which result is
    kept. Decisions come from the gates' argmax (``learned``) or from a forced policy's
    plan (the gate still runs, as in research code, and its logits are replaced by the
    plan's one-hot). Its decisions, usage and probabilities equal the Session's for the
    same policy; its launched work is the dense model's (``gflops.used``), while
    ``gflops.decided`` is what the decisions would cost if the skipped work were skipped.

Host reads: neither waits on the device inside its step loop (``stats.host_reads`` = 0);
the mask executor reads all T decisions once at the end (``stats.decision_reads`` = 1)
and both read the head's probabilities once (``stats.prediction_reads`` = 1).

Timing categories are the Session's (:class:`hms_deploy.runtime.timing.Timer`):
``decode`` = probe, audio and frame decoding, RGB conversion, resize/crop and copies;
``audio`` = log-mel front end + audio backbone + aLSTM; ``appearance``/``motion`` = that
backbone; ``cells_gates`` = iLSTM, mLSTM, gates and head; ``other`` = the rest.

One video per call (N = 1); the EngineSet must be open (``with engine_set:``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from hms_deploy import gating
from hms_deploy.costs import dense_cost
from hms_deploy.runtime.audio_path import run_audio_path
from hms_deploy.runtime.cells import EngineCells
from hms_deploy.runtime.checks import plan_video, probe_checked
from hms_deploy.runtime.engines import EngineSet
from hms_deploy.runtime.frames import open_video
from hms_deploy.runtime.options import RunSettings, int_at_least, resolve_options
from hms_deploy.runtime.policy import GATE, Policy
from hms_deploy.runtime.records import RunStats, VideoRun, build_record
from hms_deploy.runtime.timing import Timer
from hms_deploy.transfer import to_device

Tensor = torch.Tensor

EXECUTORS = ("dense_batched", "compute_then_mask")
DEFAULT_BATCH = 4


class _Features:
    """Every step's projected features and audio hidden states of one video, (T, 1, *)."""

    def __init__(self, es: EngineSet, video: str | Path, opts: RunSettings, batch: int,
                 audio_batch: int, timer: Timer):
        self.es = es
        cfg = es.config
        T = opts.T
        dev = es.device
        with timer.host_section("decode"):  # the Session's checks (runtime/checks.py)
            info, warnings = probe_checked(str(video), allow_truncated=opts.allow_truncated)
            self.inputs = open_video(video, cfg, T, info=info)
        self.p_i = torch.empty(T, 1, cfg.appearance.proj_dim, device=dev)
        self.p_m = torch.empty(T, 1, cfg.motion.proj_dim, device=dev)
        self._audio(opts, audio_batch, timer)
        self.plan = plan_video(self.inputs, opts.parsed_policy, opts.no_audio, T)
        self.plan.warnings[:0] = warnings
        self._visual(opts, batch, timer)

    def _audio(self, opts: RunSettings, audio_batch: int, timer: Timer) -> None:
        es = self.es
        with timer.host_section("decode"):
            wave = self.inputs.decode_audio(keep_partial=opts.allow_truncated)
        with timer.host_section("audio"):
            mel = self.inputs.audio_patches(wave)  # (T, 1, 96, 64)
        zero = torch.zeros(1, es.config.hidden_audio, device=es.device)
        self.p_a, self.h_a, _, _ = run_audio_path(es, mel[:, None], (zero, zero.clone()),
                                                  audio_batch=audio_batch, timer=timer)

    def _visual(self, opts: RunSettings, batch: int, timer: Timer) -> None:
        es, T, inputs = self.es, opts.T, self.inputs
        for s in range(0, T, batch):
            steps = range(s, min(T, s + batch))
            with timer.host_section("decode"):
                frames, clips = [], []
                for t in steps:  # time order: one forward pass (see runtime.frames)
                    frames.append(inputs.appearance(t))
                    clips.append(inputs.motion(t))
                x_i = to_device(np.stack(frames), es.device)
                x_m = to_device(np.stack(clips), es.device)
            with timer.device_section("appearance"):
                self.p_i[s:s + len(steps), 0].copy_(
                    es.engines["appearance_backbone"]({"frame": x_i})["feat"])
            with timer.device_section("motion"):
                self.p_m[s:s + len(steps), 0].copy_(
                    es.engines["motion_backbone"]({"clip": x_m})["feat"])

    def close(self) -> None:
        self.inputs.close()


class _AllOnOps(EngineCells):
    """:class:`hms_deploy.gating.StepOps` with every gate on and precomputed features (the
    cells are :class:`~hms_deploy.runtime.cells.EngineCells`, as the scheduler's)."""

    def __init__(self, es: EngineSet, feats: _Features, timer: Timer):
        self.es, self.feats, self.timer = es, feats, timer

    def decide_appearance(self, t: int, rows: Tensor, x_a: Tensor, h: Tensor, c: Tensor) -> Tensor:
        return torch.ones(rows.numel(), dtype=torch.int64)

    def decide_motion(
        self, t: int, rows: Tensor, x_a: Tensor, x_i: Tensor, h: Tensor, c: Tensor
    ) -> Tensor:
        return torch.ones(rows.numel(), dtype=torch.int64)

    def appearance_feature(self, t: int, rows: Tensor) -> Tensor:
        return self.feats.p_i[t].index_select(0, rows.to(self.es.device))

    def motion_feature(self, t: int, rows: Tensor) -> Tensor:
        return self.feats.p_m[t].index_select(0, rows.to(self.es.device))


def _positional(es: EngineSet, part: str, outputs: tuple[str, str], timer: Timer,
                override: Callable[[Tensor], Tensor] | None = None
                ) -> Callable[..., tuple[Tensor, Tensor]]:
    """An engine as the positional function :func:`gating.masked_step` calls.

    Outputs are cloned (an engine's outputs may be buffers reused by its next call).
    ``override`` replaces the second output (a gate's logits) for forced policies.
    """
    engine = es.engines[part]
    names = engine.input_names

    def fn(*xs: Tensor) -> tuple[Tensor, Tensor]:
        with timer.device_section("cells_gates"):
            out = engine(dict(zip(names, xs)))
            a, b = out[outputs[0]].clone(), out[outputs[1]].clone()
        return a, (override(b) if override is not None else b)

    return fn


def _record(es: EngineSet, feats: _Features, opts: RunSettings, executor: str, probs: Tensor,
            g_i: list[int], g_m: list[int], timing: dict[str, float], calls0: dict[str, int],
            stats: dict[str, Any]) -> dict[str, Any]:
    """The Session's record (:func:`~hms_deploy.runtime.records.build_record`) for a baseline
    run: every backbone launched on every step (``gflops.used``), ``decided`` by ``g_i``/``g_m``."""
    T = opts.T
    calls = es.calls()
    video = VideoRun(feats.inputs.path, feats.inputs, steps_done=T, appearance=list(g_i),
                     motion=list(g_m), plan=feats.plan)
    run = RunStats(engine_calls={p: calls[p] - calls0[p] for p in calls}, **stats)
    launched = dense_cost(es.costs, T)
    return build_record(es, opts, video, probs, timing, stats=run, executor=executor,
                        launched=launched)


def _head(es: EngineSet, h_m: Tensor, timer: Timer) -> Tensor:
    with timer.device_section("cells_gates"):
        probs = es.engines["head"]({"h": h_m})["probs"]
        return probs.to("cpu", torch.float32, copy=True)[0]  # the prediction read


@torch.inference_mode()
def classify_dense_batched(
    engine_set: EngineSet,
    video: str | Path,
    *,
    steps: int | None = None,
    batch: int = DEFAULT_BATCH,
    audio_batch: int | None = None,
    topk: int = 5,
) -> dict[str, Any]:
    """Every modality on every step, backbones batched over ``batch`` steps; one record.

    ``steps`` = T (default: the model's). ``batch`` steps per visual backbone call,
    ``audio_batch`` (default ``batch``) per audio backbone call.
    """
    es = engine_set
    opts = resolve_options(es, steps=steps, policy="dense", topk=topk)
    batch = int_at_least("batch", batch, 1)
    audio_batch = batch if audio_batch is None else int_at_least("audio_batch", audio_batch, 1)
    calls0 = es.calls()
    timer = Timer(es.device)
    feats = _Features(es, video, opts, batch, audio_batch, timer)
    try:
        ops = _AllOnOps(es, feats, timer)
        cfg = es.config
        state = gating.GatedState.zeros(1, cfg.hidden_appearance, cfg.hidden_motion, device=es.device)
        g_i_all: list[int] = []
        g_m_all: list[int] = []
        for t in range(opts.T):
            state, g_i, g_m = gating.gated_step(ops, t, feats.p_a[t], feats.h_a[t], state)
            g_i_all.append(int(g_i[0]))
            g_m_all.append(int(g_m[0]))
        probs = _head(es, state.h_m, timer)
        timing = timer.result()
        stats = {"host_reads": 0, "prediction_reads": 1, "decision_reads": 0,
                 "backbone_batch": batch, "audio_batch": audio_batch}
        return _record(es, feats, opts, "dense_batched", probs, g_i_all, g_m_all, timing,
                       calls0, stats)
    finally:
        feats.close()


@torch.inference_mode()
def classify_compute_then_mask(
    engine_set: EngineSet,
    video: str | Path,
    *,
    steps: int | None = None,
    policy: str | Policy = "learned",
    batch: int = DEFAULT_BATCH,
    audio_batch: int | None = None,
    topk: int = 5,
) -> dict[str, Any]:
    """Compute every backbone, cell and gate on every step, then mask by the decisions.

    ``policy``: ``learned`` (the gates' argmax) or a forced policy (its plan), as for the
    Session. Batching as :func:`classify_dense_batched`.
    """
    es = engine_set
    opts = resolve_options(es, steps=steps, policy=policy, topk=topk)
    batch = int_at_least("batch", batch, 1)
    audio_batch = batch if audio_batch is None else int_at_least("audio_batch", audio_batch, 1)
    calls0 = es.calls()
    timer = Timer(es.device)
    feats = _Features(es, video, opts, batch, audio_batch, timer)
    try:
        T = opts.T
        plan_a, plan_m = feats.plan.appearance, feats.plan.motion  # GATE: the gate decides
        dev = es.device
        step = {"t": 0}

        def plan_logits(plan: NDArray[np.int64] | None) -> Callable[[Tensor], Tensor] | None:
            if plan is None:
                return None

            def override(logits: Tensor) -> Tensor:
                d = int(plan[step["t"]])
                if d == GATE:
                    return logits
                one_hot = torch.tensor([[1.0 - d, float(d)]], device=dev, dtype=logits.dtype)
                return one_hot.expand_as(logits)

            return override

        appearance_gate = _positional(es, "appearance_gate", ("decision", "logits"), timer,
                                      plan_logits(plan_a))
        motion_gate = _positional(es, "motion_gate", ("decision", "logits"), timer,
                                  plan_logits(plan_m))
        appearance_cell = _positional(es, "appearance_cell", ("h_next", "c_next"), timer)
        motion_cell = _positional(es, "motion_cell", ("h_next", "c_next"), timer)
        cfg = es.config
        state = gating.GatedState.zeros(1, cfg.hidden_appearance, cfg.hidden_motion, device=dev)
        g_i_all: list[Tensor] = []
        g_m_all: list[Tensor] = []
        for t in range(T):
            step["t"] = t
            state, g_i, g_m, _, _ = gating.masked_step(
                x_a=feats.p_a[t], x_i=feats.p_i[t], x_m=feats.p_m[t], h_a=feats.h_a[t],
                state=state, appearance_gate=appearance_gate, motion_gate=motion_gate,
                appearance_cell=appearance_cell, motion_cell=motion_cell,
                decision=gating.argmax_decision,
            )
            g_i_all.append(g_i)
            g_m_all.append(g_m)
        probs = _head(es, state.h_m, timer)
        with timer.device_section("cells_gates"):
            decisions = torch.stack([torch.cat(g_i_all), torch.cat(g_m_all)]).to(
                "cpu", torch.int64)  # the one decision read
        timing = timer.result()
        stats = {"host_reads": 0, "prediction_reads": 1, "decision_reads": 1,
                 "backbone_batch": batch, "audio_batch": audio_batch}
        return _record(es, feats, opts, "compute_then_mask", probs, decisions[0].tolist(),
                       decisions[1].tolist(), timing, calls0, stats)
    finally:
        feats.close()

