"""The step-by-step runtime that really skips (HMS_SPEC.md 2, 3 and 5), over an EngineSet.

:func:`run_batch` classifies N videos in lockstep (N = 1 is the common case):

1. **Audio path first.** Each video's audio is decoded once and turned into the T
   log-mel patches; the ``audio_backbone`` engine runs on them in batches and the
   ``audio_cell`` engine steps over them (it never depends on a gate). Without a budget
   the whole audio path runs before the gated loop; with a budget it runs in chunks
   that are sure to fit (see *Budget*).
2. **The gated loop**: :func:`hms_deploy.spec.gated_step` (the one implementation of
   decisions, hierarchy and fusion) over :class:`EngineStepOps`. ``decide_*`` runs the
   gate engine (``learned``) or reads the forced policy's plan, then applies the budget
   veto; ``*_feature`` decodes the inputs of only the rows that run (the appearance
   frame, or the 32-frame clip, of step t; see :mod:`hms_deploy.runtime.frames`) and runs
   that backbone on the sub-batch.
3. **Head** once at the end (``online``: after every step, yielding partial results).

Host reads: the step loop waits on the device only to read a gate's decision, exactly
once per gate engine call (one read on steps where appearance is skipped, two where it
runs; zero for forced policies), counted in ``stats.host_reads``. Outside the loop the
head's probabilities are read once (per step with ``online``), counted in
``stats.prediction_reads``. Everything else (features, states, the audio path) stays on
the device; visual inputs are copied host-to-device from pinned memory without waiting.

Budget (HMS_SPEC.md 5; B in GMAC, costs from the EngineSet, :mod:`hms_deploy.costs`):
with ``used`` the work launched so far for a video and ``head`` the head's cost, step t
starts only if ``used + base + head <= B``; a modality whose gate fires runs only if
``used + its tier cost + head <= B`` (else it is recorded as 0 and fused, and counted in
``vetoed``); once a step cannot start, the prediction after the last finished step is
emitted. The audio path is computed ``k`` steps ahead only where ``k`` dense steps are
affordable (``used + k * (base + appearance + motion) + head <= B``), one step at a time
near the end of the budget, so no audio work is ever launched for a step that does not
run and ``gflops.used = video_cost(...) <= B`` holds exactly. A budget below
``base + head`` cannot finish a single step and is refused (:class:`ConfigError`).

Forced policies are charged the cost model's per-step gate cost although they launch no
gate (a few kMAC; it keeps costs comparable across policies).

Timing (``timing_ms``; INTERFACES.md): ``decode`` = probe + audio decode + frame decode,
RGB conversion, resize/crop and the frames' host-to-device copies; ``audio`` = log-mel
front end (and its copy to the device) + audio backbone + aLSTM; ``appearance``/``motion`` = that backbone engine; ``cells_gates``
= iLSTM, mLSTM, gates and head (including the decision reads); ``other`` = total minus
the rest. On CUDA the engine categories are measured with CUDA events on the stream
(resolved once at the end), so ``other`` may be negative where the host decoded while
the device computed. With N > 1 videos every record carries the batch's timing.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hms_deploy import spec
from hms_deploy.costs import UNIT, BudgetLedger, dense_cost, step_costs, video_cost
from hms_deploy.errors import ConfigError
from hms_deploy.runtime.engines import EngineSet
from hms_deploy.runtime.frames import DecodeOptions, VideoInputs
from hms_deploy.runtime.policy import Policy, parse_policy

Tensor = torch.Tensor

TIMING_KEYS = ("total", "decode", "audio", "appearance", "motion", "cells_gates", "other")


# ------------------------------------------------------------------------------ options


@dataclass(frozen=True)
class RunOptions:
    """Validated options of a run (see :func:`resolve_options`)."""

    steps: int
    policy: Policy
    budget: float | None = None
    online: bool = False
    topk: int = 5
    audio_batch: int = 64  # patches per audio_backbone call
    decode: DecodeOptions = field(default_factory=DecodeOptions)  # thread / skipping; same frames


def resolve_options(
    engine_set: EngineSet,
    *,
    steps: int | None = None,
    policy: str | Policy = "learned",
    budget: float | None = None,
    online: bool = False,
    topk: int = 5,
    audio_batch: int = 64,
) -> RunOptions:
    """Check options against the model; :class:`ConfigError` with one clear line if bad.

    ``steps`` defaults to the model's T. A ``budget`` (GMAC) must be > 0 and afford at
    least one step (its base cost plus the head).
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
    return RunOptions(int(steps), pol, budget, bool(online), int(topk), int(audio_batch))


# ------------------------------------------------------------------------------- timing


class Timer:
    """Wall-clock per category; on CUDA, engine sections are timed with events on the stream."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.host: dict[str, float] = defaultdict(float)
        self._events: list[tuple[str, Any, Any]] = []
        self.t0 = time.perf_counter()

    @contextmanager
    def host_section(self, key: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.host[key] += time.perf_counter() - t

    @contextmanager
    def device_section(self, key: str) -> Iterator[None]:
        if not self.cuda:
            with self.host_section(key):
                yield
            return
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        try:
            yield
        finally:
            end.record()
            self._events.append((key, start, end))

    def result(self) -> dict[str, float]:
        """ms per category; call after the final host read (the device is then idle)."""
        ms = {k: 1e3 * v for k, v in self.host.items()}
        for key, start, end in self._events:
            end.synchronize()
            ms[key] = ms.get(key, 0.0) + start.elapsed_time(end)
        total = 1e3 * (time.perf_counter() - self.t0)
        out = {"total": total}
        for k in TIMING_KEYS[1:-1]:
            out[k] = ms.get(k, 0.0)
        out["other"] = total - sum(out[k] for k in TIMING_KEYS[1:-1])
        return {k: round(v, 3) for k, v in out.items()}


# ------------------------------------------------------------------------------ helpers


def _to_device(x: np.ndarray, device: torch.device) -> Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x))
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


@dataclass
class _Video:
    """Per-video bookkeeping of a batch."""

    name: str
    inputs: VideoInputs
    steps_done: int = 0
    appearance: list[int] = field(default_factory=list)
    motion: list[int] = field(default_factory=list)
    probs: Tensor | None = None  # (C,) host, after the last finished step (online)


class EngineStepOps:
    """:class:`hms_deploy.spec.StepOps` over an EngineSet and decode-on-demand inputs.

    ``active`` maps the rows of the current sub-batch to indices into ``videos``.
    """

    def __init__(self, run: _BatchRun):
        self.run = run
        self.active = torch.arange(len(run.videos))

    # -- decisions -----------------------------------------------------------------------
    def _forced(self, plan: np.ndarray, t: int, rows: Tensor) -> Tensor:
        return torch.full((rows.numel(),), int(plan[t]), dtype=torch.int64)

    def _gate(self, part: str, inputs: dict[str, Tensor]) -> Tensor:
        run = self.run
        with run.timer.device_section("cells_gates"):
            out = run.es.engines[part](inputs)
            # THE host read of this gate (a copy: the budget veto edits it)
            d = out["decision"].to("cpu", torch.int64, copy=True)
        run.host_reads += 1
        return d

    def decide_appearance(self, t: int, rows: Tensor, x_a: Tensor, h: Tensor, c: Tensor) -> Tensor:
        run = self.run
        if run.opts.policy.forced:
            d = self._forced(run.plan_a, t, rows)
        else:
            d = self._gate("appearance_gate", {"x_a": x_a, "h": h, "c": c})
        return run.veto(d, self.active[rows], "appearance")

    def decide_motion(
        self, t: int, rows: Tensor, x_a: Tensor, x_i: Tensor, h: Tensor, c: Tensor
    ) -> Tensor:
        run = self.run
        if run.opts.policy.forced:
            d = self._forced(run.plan_m, t, rows)
        else:
            d = self._gate("motion_gate", {"x_a": x_a, "x_i": x_i, "h": h, "c": c})
        return run.veto(d, self.active[rows], "motion")

    # -- features ------------------------------------------------------------------------
    def appearance_feature(self, t: int, rows: Tensor) -> Tensor:
        run = self.run
        with run.timer.host_section("decode"):
            frames = np.stack([run.videos[v].inputs.appearance(t) for v in self.active[rows].tolist()])
            x = _to_device(frames, run.es.device)
        with run.timer.device_section("appearance"):
            return run.es.engines["appearance_backbone"]({"frame": x})["feat"]

    def motion_feature(self, t: int, rows: Tensor) -> Tensor:
        run = self.run
        with run.timer.host_section("decode"):
            clips = np.stack([run.videos[v].inputs.motion(t) for v in self.active[rows].tolist()])
            x = _to_device(clips, run.es.device)
        with run.timer.device_section("motion"):
            return run.es.engines["motion_backbone"]({"clip": x})["feat"]

    # -- cells ---------------------------------------------------------------------------
    def appearance_cell(self, x_a: Tensor, x_i: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        with self.run.timer.device_section("cells_gates"):
            out = self.run.es.engines["appearance_cell"]({"x_a": x_a, "x_i": x_i, "h": h, "c": c})
        return out["h_next"], out["c_next"]

    def motion_cell(
        self, x_a: Tensor, x_i: Tensor, x_m: Tensor, h: Tensor, c: Tensor
    ) -> tuple[Tensor, Tensor]:
        with self.run.timer.device_section("cells_gates"):
            out = self.run.es.engines["motion_cell"](
                {"x_a": x_a, "x_i": x_i, "x_m": x_m, "h": h, "c": c}
            )
        return out["h_next"], out["c_next"]


# ------------------------------------------------------------------------------- the run


class _BatchRun:
    def __init__(self, es: EngineSet, names: Sequence[str], opts: RunOptions, timer: Timer):
        self.es = es
        self.opts = opts
        self.timer = timer
        self.calls0 = es.calls()
        cfg = es.config
        T = opts.steps
        with timer.host_section("decode"):
            self.videos = [_Video(str(n), VideoInputs(n, cfg, T, decode=opts.decode)) for n in names]
        if opts.policy.forced:
            self.plan_a, self.plan_m = opts.policy.plan(T)
            for v in self.videos:  # frames no step can want: the decoder may skip them
                v.inputs.plan(self.plan_a, self.plan_m)
        self.host_reads = 0
        self.prediction_reads = 0
        self.audio_calls = 0
        n = len(self.videos)
        self.ledger = BudgetLedger(es.costs, n, opts.budget)
        dev = es.device
        # audio path outputs, (T, N, *) so that a step's slice is contiguous
        self.p_a = torch.zeros(T, n, cfg.audio.proj_dim, device=dev)
        self.h_a = torch.zeros(T, n, cfg.hidden_audio, device=dev)
        self.audio_state = (
            torch.zeros(n, cfg.hidden_audio, device=dev),
            torch.zeros(n, cfg.hidden_audio, device=dev),
        )
        self.audio_done = 0  # steps [0, audio_done) of every active video have their audio path
        self.patches: list[np.ndarray] = []
        for v in self.videos:
            with timer.host_section("decode"):
                wave = v.inputs.decode_audio()
            with timer.host_section("audio"):
                self.patches.append(v.inputs.audio_patches(wave))
        self.state = spec.GatedState.zeros(
            n, cfg.hidden_appearance, cfg.hidden_motion, device=dev
        )
        self.ops = EngineStepOps(self)

    # -- budget --------------------------------------------------------------------------
    def veto(self, d: Tensor, vids: Tensor, tier: str) -> Tensor:
        """Apply the budget to decisions ``d`` (int64 host) of videos ``vids``; charge the tier."""
        return torch.from_numpy(self.ledger.veto(tier, vids.numpy(), d.numpy()))

    # -- audio path ----------------------------------------------------------------------
    def audio_ahead(self, t: int, active: list[int]) -> None:
        """Make sure the audio path of step ``t`` exists for ``active`` videos."""
        if t < self.audio_done:
            return
        T = self.opts.steps
        k = T - t
        affordable = self.ledger.dense_steps_affordable(np.asarray(active), online=self.opts.online)
        if affordable is not None:
            k = min(k, max(1, affordable))
        t1 = t + k
        dev = self.es.device
        full = len(active) == len(self.videos)
        didx = None if full else _to_device(np.asarray(active, dtype=np.int64), dev)
        n = len(active)
        with self.timer.host_section("audio"):
            mel = np.stack([self.patches[v][t:t1] for v in active], axis=1)  # (k, n, 1, 96, 64)
            x = _to_device(mel.reshape(-1, *mel.shape[2:]), dev)
        # engine outputs live until the engine's next call: copy what is kept
        p = torch.empty(k * n, self.p_a.shape[2], device=dev)
        hs = torch.empty(k, n, self.h_a.shape[2], device=dev)
        b = self.opts.audio_batch
        with self.timer.device_section("audio"):
            for s in range(0, k * n, b):
                p[s:s + b].copy_(self.es.engines["audio_backbone"]({"mel": x[s:s + b]})["feat"])
                self.audio_calls += 1
            p = p.reshape(k, n, -1)
            h, c = self.audio_state if full else (z.index_select(0, didx) for z in self.audio_state)
            cell = self.es.engines["audio_cell"]
            for j in range(k):
                out = cell({"x_a": p[j], "h": h, "c": c})
                h, c = out["h_next"], out["c_next"]
                hs[j].copy_(h)
            if didx is None:
                self.p_a[t:t1] = p
                self.h_a[t:t1] = hs
                self.audio_state = (h.clone(), c.clone())
            else:
                self.p_a[t:t1].index_copy_(1, didx, p)
                self.h_a[t:t1].index_copy_(1, didx, hs)
                self.audio_state = tuple(
                    z.index_copy(0, didx, new) for z, new in zip(self.audio_state, (h, c))
                )
        self.audio_done = t1

    # -- head ----------------------------------------------------------------------------
    def head(self, rows: list[int]) -> Tensor:
        """Probabilities (len(rows), C) on the host after the current step of ``rows``."""
        h_m = self.state.h_m
        if len(rows) != len(self.videos):
            h_m = h_m.index_select(0, _to_device(np.asarray(rows, dtype=np.int64), self.es.device))
        with self.timer.device_section("cells_gates"):
            probs = self.es.engines["head"]({"h": h_m})["probs"]
            out = probs.to("cpu", torch.float32, copy=True)  # the prediction read
        self.prediction_reads += 1
        return out

    # -- the loop ------------------------------------------------------------------------
    def steps(self) -> Iterator[list[int]]:
        """Run the gated loop; after each step yield the videos that finished it."""
        T = self.opts.steps
        base = self.ledger.tiers["base"]
        active = list(range(len(self.videos)))
        for t in range(T):
            active = [v for v, ok in zip(active, self.ledger.fits(np.asarray(active), base)) if ok]
            if not active:
                break
            self.audio_ahead(t, active)  # before charging this step: room for it too
            self.ledger.charge(np.asarray(active), "base")
            n = len(self.videos)
            full = len(active) == n
            self.ops.active = torch.tensor(active)
            if not full:
                didx = _to_device(np.asarray(active, dtype=np.int64), self.es.device)
            if full:
                x_a, h_a, state = self.p_a[t], self.h_a[t], self.state
            else:
                x_a = self.p_a[t].index_select(0, didx)
                h_a = self.h_a[t].index_select(0, didx)
                s = self.state
                state = spec.GatedState(
                    *(z.index_select(0, didx) for z in (s.h_i, s.c_i, s.h_m, s.c_m))
                )
            new, g_i, g_m = spec.gated_step(self.ops, t, x_a, h_a, state)
            if full:
                self.state = new
            else:
                s = self.state
                self.state = spec.GatedState(
                    *(old.index_copy(0, didx, z) for old, z in
                      zip((s.h_i, s.c_i, s.h_m, s.c_m), (new.h_i, new.c_i, new.h_m, new.c_m)))
                )
            for j, v in enumerate(active):
                video = self.videos[v]
                video.appearance.append(int(g_i[j]))
                video.motion.append(int(g_m[j]))
                video.steps_done += 1
            if self.opts.online:
                probs = self.head(active)
                self.ledger.charge(np.asarray(active), "head")
                for j, v in enumerate(active):
                    self.videos[v].probs = probs[j]
            yield active

    def close(self) -> None:
        for v in self.videos:
            v.inputs.close()

    # -- records -------------------------------------------------------------------------
    def record(self, v: int, probs: Tensor, timing: dict[str, float], *, partial: bool) -> dict[str, Any]:
        es, opts, video = self.es, self.opts, self.videos[v]
        k = min(opts.topk, probs.numel())
        top = torch.topk(probs, k)
        top_list = [[es.labels[i], float(p)] for p, i in zip(top.values.tolist(), top.indices.tolist())]
        a, m = video.appearance, video.motion
        predictions = video.steps_done if opts.online else 1
        used = video_cost(es.costs, steps=video.steps_done, appearance=sum(a), motion=sum(m),
                          predictions=predictions)
        calls = es.calls()
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
            "engine": es.backend,
            "device": str(es.device),
            "policy": str(opts.policy),
            "budget": opts.budget,
            "T": opts.steps,
            "export": es.export_sha256,
            "timing_ms": timing,
            "stats": {
                "host_reads": self.host_reads,
                "prediction_reads": self.prediction_reads,
                "batch": len(self.videos),
                "vetoed": {k: int(n[v]) for k, n in self.ledger.vetoed.items()},
                "appearance_frames": video.inputs.appearance_frames,
                "motion_clips": video.inputs.motion_clips,
                **video.inputs.decode_stats,
                "engine_calls": {p: calls[p] - self.calls0[p] for p in calls},
            },
        }
        if partial:
            rec["partial"] = True
        return rec


def engine_stream(engine_set: EngineSet) -> Any:
    """The CUDA stream the engines run on (theirs if they have one, else a new one); None on CPU."""
    if engine_set.device.type != "cuda":
        return None
    for e in engine_set.engines.values():
        stream = getattr(e, "stream", None)
        if stream is not None:
            return stream
    return torch.cuda.Stream(engine_set.device)


def run_batch(
    engine_set: EngineSet, videos: Sequence[str], options: RunOptions, *, stream: Any = None
) -> Iterator[list[dict[str, Any]]]:
    """Classify ``videos`` in lockstep; yield lists of records.

    With ``options.online`` a list of partial records (``"partial": true``, one per video
    that finished the step) is yielded after every step; the last list holds the final
    record of every video, in input order. Raises :class:`~hms_deploy.errors.VideoError`
    (or another :class:`~hms_deploy.errors.HMSError`) if any video fails; the caller
    retries the others (see :class:`hms_deploy.runtime.session.Session`).

    On CUDA all work is issued on one stream: ``stream`` (default
    :func:`engine_stream`), made current only while this generator runs, never across
    a ``yield``.
    """
    if engine_set.device.type == "cuda":
        cuda_stream = stream if stream is not None else engine_stream(engine_set)

        def on_stream() -> Any:
            return torch.cuda.stream(cuda_stream)
    else:
        on_stream = contextlib.nullcontext
    with on_stream():
        timer = Timer(engine_set.device)
        run = _BatchRun(engine_set, videos, options, timer)
    try:
        steps = run.steps()
        while True:
            with on_stream():
                active = next(steps, None)
                if active is not None and options.online:
                    timing = timer.result()
                    partial = [run.record(v, run.videos[v].probs, timing, partial=True) for v in active]
            if active is None:
                break
            if options.online:
                yield partial
        with on_stream():
            if options.online:
                final = {v: run.videos[v].probs for v in range(len(run.videos))}
            else:
                probs = run.head(list(range(len(run.videos))))
                final = dict(enumerate(probs))
            timing = timer.result()
            records = [run.record(v, final[v], timing, partial=False) for v in range(len(run.videos))]
    finally:
        run.close()
    yield records
