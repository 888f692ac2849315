"""The step-by-step runtime that really skips (docs/method.md §2, §3 and §5), over an EngineSet.

:func:`run_batch` classifies N videos in lockstep (N = 1 is the common case):

1. **Audio path first.** Each video's audio is decoded once and turned into the T
   log-mel patches; the ``audio_backbone`` engine runs on them in batches and the
   ``audio_cell`` engine steps over them (it never depends on a gate). Without a budget
   the whole audio path runs before the gated loop; with a budget it runs in chunks
   that are sure to fit (see *Budget*).
2. **The gated loop**: :func:`hms_deploy.gating.gated_step` (the one implementation of
   decisions, hierarchy and fusion) over :class:`EngineStepOps`. ``decide_*`` reads each
   video's plan (:mod:`hms_deploy.runtime.checks`: a forced 0/1, or GATE) and runs the
   gate engine on the GATE rows only, then applies the budget veto; ``*_feature`` decodes the inputs of only the rows that run (the appearance
   frame, or the 32-frame clip, of step t; see :mod:`hms_deploy.runtime.frames`) and runs
   that backbone on the sub-batch. Where every plan is forced and there is no budget, the
   appearance frames of several steps run in one call instead
   (:mod:`hms_deploy.runtime.appearance_ahead`; ``RunSettings.appearance_batch``).
3. **Head** once at the end (``online``: after every step, yielding partial results).

Host reads: the step loop waits on the device only to read a gate's decision, exactly
once per gate engine call for the (sub-)batch rows whose plan says GATE (one read on
steps where appearance is skipped, two where it runs; zero for forced policies), counted
in ``stats.host_reads``. The head's probabilities are read once (per step with
``online``), counted in ``stats.prediction_reads``. Both go through the one reading
helper, :class:`hms_deploy.transfer.HostReads`; nothing else in the loop waits on the
device. Features, states and the audio path stay on the device; sub-batch and GATE-row
indices (built on the host from the decisions read and the plans) and decoded inputs are
copied host-to-device from pinned memory without waiting
(:func:`hms_deploy.transfer.to_device`).

Budget (docs/method.md §5; B in GMAC, costs from the EngineSet, :mod:`hms_deploy.costs`):
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

Timing (``timing_ms``): :mod:`hms_deploy.runtime.timing`; with N > 1 videos every
record carries the batch's timing. Options: :mod:`hms_deploy.runtime.options`; records:
:mod:`hms_deploy.runtime.records`; the audio path: :mod:`hms_deploy.runtime.audio_path`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, cast

import numpy as np
import torch
from numpy.typing import NDArray

from hms_deploy import gating
from hms_deploy.costs import BudgetLedger
from hms_deploy.runtime.appearance_ahead import appearance_ahead, read_ahead_steps
from hms_deploy.runtime.audio_path import run_audio_path
from hms_deploy.runtime.cells import EngineCells
from hms_deploy.runtime.checks import plan_before_audio, plan_video, probe_checked
from hms_deploy.runtime.engines import EngineSet
from hms_deploy.runtime.frames import open_video
from hms_deploy.runtime.options import RunSettings, resolve_options
from hms_deploy.runtime.policy import GATE
from hms_deploy.runtime.records import RunStats, VideoRun, build_record
from hms_deploy.runtime.streams import CUDA, DeviceStreams
from hms_deploy.runtime.timing import TIMING_KEYS, Timer
from hms_deploy.transfer import HostReads, to_device

Tensor = torch.Tensor

__all__ = ["TIMING_KEYS", "EngineStepOps", "RunSettings", "Timer", "engine_stream", "resolve_options",
           "run_batch"]


class EngineStepOps(EngineCells):
    """:class:`hms_deploy.gating.StepOps` over an EngineSet and decode-on-demand inputs.

    ``active`` maps the rows of the current sub-batch to indices into ``videos``.
    """

    def __init__(self, run: _BatchRun):
        self.run = run
        self.es, self.timer = run.es, run.timer  # the cells' (EngineCells)
        self.active = torch.arange(len(run.videos))

    # -- decisions -----------------------------------------------------------------------
    def _decide(self, tier: str, t: int, rows: Tensor, inputs: dict[str, Tensor]) -> Tensor:
        """Each row's planned decision (runtime/checks.py); the gate for GATE rows only."""
        run = self.run
        vids = self.active[rows]
        d = torch.from_numpy(np.array([getattr(run.videos[v].plan, tier)[t] for v in vids.tolist()],
                                      dtype=np.int64))
        need = (d == GATE).nonzero().flatten()
        if need.numel():
            if need.numel() != d.numel():  # the GATE rows' indices, uploaded once without waiting
                dneed = to_device(need, run.es.device)
                inputs = {k: x.index_select(0, dneed) for k, x in inputs.items()}
            d[need] = self._gate(f"{tier}_gate", inputs)
        return run.veto(d, vids, tier)

    def _gate(self, part: str, inputs: dict[str, Tensor]) -> Tensor:
        run = self.run
        with run.timer.device_section("cells_gates"):
            out = run.es.engines[part](inputs)
            # THE host read of this gate (a copy: the budget veto edits it)
            return run.reads.read(out["decision"], "decision", torch.int64)

    def decide_appearance(self, t: int, rows: Tensor, x_a: Tensor, h: Tensor, c: Tensor) -> Tensor:
        return self._decide("appearance", t, rows, {"x_a": x_a, "h": h, "c": c})

    def decide_motion(
        self, t: int, rows: Tensor, x_a: Tensor, x_i: Tensor, h: Tensor, c: Tensor
    ) -> Tensor:
        return self._decide("motion", t, rows, {"x_a": x_a, "x_i": x_i, "h": h, "c": c})

    # -- features ------------------------------------------------------------------------
    def appearance_feature(self, t: int, rows: Tensor) -> Tensor:
        run = self.run
        if run.ahead is not None:  # plans known in advance: computed several steps per call
            return run.ahead.features(t, self.active[rows].tolist())
        with run.timer.host_section("decode"):
            frames = np.stack([run.videos[v].inputs.appearance(t) for v in self.active[rows].tolist()])
            x = to_device(frames, run.es.device)
        with run.timer.device_section("appearance"):
            return run.es.engines["appearance_backbone"]({"frame": x})["feat"]

    def motion_feature(self, t: int, rows: Tensor) -> Tensor:
        run = self.run
        with run.timer.host_section("decode"):
            clips = np.stack([run.videos[v].inputs.motion(t) for v in self.active[rows].tolist()])
            x = to_device(clips, run.es.device)
        with run.timer.device_section("motion"):
            return run.es.engines["motion_backbone"]({"clip": x})["feat"]


# ------------------------------------------------------------------------------- the run


class _BatchRun:
    def __init__(self, es: EngineSet, names: Sequence[str], opts: RunSettings, timer: Timer):
        self.es = es
        self.opts = opts
        self.timer = timer
        self.calls0 = es.calls()
        cfg = es.config
        T = opts.T
        with timer.host_section("decode"):
            checked = [probe_checked(str(n), allow_truncated=opts.allow_truncated) for n in names]
            ahead = read_ahead_steps(opts, len(names))
            self.videos = [VideoRun(str(n), open_video(n, cfg, T, info=info, decode=opts.decode,
                                                       steps_ahead=ahead))
                           for n, (info, _) in zip(names, checked)]
        self.reads = HostReads()  # every device->host read of the run, counted
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
        self.patches: list[NDArray[np.float32]] = []
        policy = opts.parsed_policy
        try:
            early = plan_before_audio(policy, T)
            if early is not None:
                # the decode threads start now and work while the audio is decoded and
                # its path runs
                for v in self.videos:
                    v.inputs.plan(*early)
                    v.inputs.start_decoding()
            for v in self.videos:
                with timer.host_section("decode"):
                    wave = v.inputs.decode_audio(keep_partial=opts.allow_truncated)
                with timer.host_section("audio"):
                    self.patches.append(v.inputs.audio_patches(wave))
            for video, (_, warnings) in zip(self.videos, checked):
                video.plan = plan_video(video.inputs, policy, opts.no_audio, T)
                video.plan.warnings[:0] = warnings
                # frames no step can want (the plan's 0s; GATE may run): the decoder may
                # skip them (the same plan as above for a forced policy: a no-op)
                video.inputs.plan(video.plan.appearance, video.plan.motion)
        except BaseException:
            for v in self.videos:
                v.inputs.close()  # no decode thread outlives a video that failed here
            raise
        self.ahead = appearance_ahead(es, self.videos, opts, timer)
        self.state = gating.GatedState.zeros(
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
        T = self.opts.T
        k = T - t
        affordable = self.ledger.dense_steps_affordable(np.asarray(active), online=self.opts.online)
        if affordable is not None:
            k = min(k, max(1, affordable))
        t1 = t + k
        full = len(active) == len(self.videos)
        didx = None if full else to_device(np.asarray(active, dtype=np.int64), self.es.device)
        with self.timer.host_section("audio"):
            mel = np.stack([self.patches[v][t:t1] for v in active], axis=1)  # (k, n, 1, 96, 64)
        h0, c0 = self.audio_state
        state = self.audio_state if didx is None else (h0.index_select(0, didx), c0.index_select(0, didx))
        p, hs, (h, c), calls = run_audio_path(self.es, mel, state, audio_batch=self.opts.audio_batch,
                                              timer=self.timer)
        self.audio_calls += calls
        if didx is None:
            self.p_a[t:t1] = p
            self.h_a[t:t1] = hs
            self.audio_state = (h, c)
        else:
            self.p_a[t:t1].index_copy_(1, didx, p)
            self.h_a[t:t1].index_copy_(1, didx, hs)
            self.audio_state = (h0.index_copy(0, didx, h), c0.index_copy(0, didx, c))
        self.audio_done = t1

    # -- head ----------------------------------------------------------------------------
    def head(self, rows: list[int]) -> Tensor:
        """Probabilities (len(rows), C) on the host after the current step of ``rows``."""
        h_m = self.state.h_m
        if len(rows) != len(self.videos):
            h_m = h_m.index_select(0, to_device(np.asarray(rows, dtype=np.int64), self.es.device))
        with self.timer.device_section("cells_gates"):
            probs = self.es.engines["head"]({"h": h_m})["probs"]
            return self.reads.read(probs, "prediction", torch.float32)

    # -- the loop ------------------------------------------------------------------------
    def loop(self) -> Iterator[list[int]]:
        """Run the gated loop; after each step yield the videos that finished it."""
        T = self.opts.T
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
                didx = to_device(np.asarray(active, dtype=np.int64), self.es.device)
            if full:
                x_a, h_a, state = self.p_a[t], self.h_a[t], self.state
            else:
                x_a = self.p_a[t].index_select(0, didx)
                h_a = self.h_a[t].index_select(0, didx)
                s = self.state
                state = gating.GatedState(
                    *(z.index_select(0, didx) for z in (s.h_i, s.c_i, s.h_m, s.c_m))
                )
            new, g_i, g_m = gating.gated_step(self.ops, t, x_a, h_a, state)
            if full:
                self.state = new
            else:
                s = self.state
                self.state = gating.GatedState(
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
        # run <-> ops is a reference cycle: left to the cyclic gc, every batch's tensors
        # waited for a full collection (rare in a process with torch's ~200k objects) and
        # a lockstep job's memory grew without bound (benchmarks/bench_memory.py)
        del self.ops
        self.patches = []
        self.ahead = None

    # -- records -------------------------------------------------------------------------
    def record(self, v: int, probs: Tensor, timing: dict[str, float], *, partial: bool) -> dict[str, Any]:
        calls = self.es.calls()
        stats = RunStats(
            host_reads=self.reads.counts["decision"],
            prediction_reads=self.reads.counts["prediction"],
            engine_calls={p: calls[p] - self.calls0[p] for p in calls},
            batch=len(self.videos),
            vetoed={k: int(n[v]) for k, n in self.ledger.vetoed.items()},
            appearance_batches=self.ahead.batches[v] if self.ahead is not None else 0,
            audio_steps=self.audio_done,
        )
        return build_record(self.es, self.opts, self.videos[v], probs, timing, stats=stats,
                            partial=partial)


def _probs(run: _BatchRun, v: int) -> Tensor:
    """Video ``v``'s probabilities after its last finished step (online: set by every step)."""
    return cast(Tensor, run.videos[v].probs)


def engine_streams(engine_set: EngineSet) -> DeviceStreams:
    """How the engines order their work (:mod:`~hms_deploy.runtime.streams`): theirs if they
    carry one (the TensorRT backend; the tests' emulator), else ``torch.cuda``'s."""
    for e in engine_set.engines.values():
        streams = getattr(e, "streams", None)
        if streams is not None:
            return cast(DeviceStreams, streams)
    return CUDA


def engine_stream(engine_set: EngineSet) -> Any:
    """The stream the engines run on (theirs if they have one, else a new CUDA one); None
    on a CPU device with no stream of their own."""
    stream = next((s for e in engine_set.engines.values()
                   if (s := getattr(e, "stream", None)) is not None), None)
    if stream is not None or engine_set.device.type != "cuda":
        return stream
    return engine_streams(engine_set).new_stream(engine_set.device)


def run_batch(
    engine_set: EngineSet, videos: Sequence[str], options: RunSettings, *, stream: Any = None
) -> Iterator[list[dict[str, Any]]]:
    """Classify ``videos`` in lockstep; yield lists of records.

    With ``options.online`` a list of partial records (``"partial": true``, one per video
    that finished the step) is yielded after every step; the last list holds the final
    record of every video, in input order. Raises :class:`~hms_deploy.errors.VideoError`
    (or another :class:`~hms_deploy.errors.HMSError`) if any video fails; the caller
    retries the others (see :class:`hms_deploy.runtime.session.Session`).

    On CUDA (or with engines that bring their own :class:`~hms_deploy.runtime.streams.
    DeviceStreams`, :func:`engine_streams`) all work is issued on one stream: ``stream``
    (default :func:`engine_stream`), made current (``DeviceStreams.use``) only while this
    generator runs, never across a ``yield``.
    """
    streams = engine_streams(engine_set)
    if engine_set.device.type == "cuda" or streams is not CUDA:
        run_stream = stream if stream is not None else engine_stream(engine_set)

        def on_stream() -> Any:
            return streams.use(run_stream)
    else:
        on_stream = contextlib.nullcontext
    with on_stream():
        timer = Timer(engine_set.device)
        run = _BatchRun(engine_set, videos, options, timer)
    try:
        loop = run.loop()
        while True:
            with on_stream():
                active = next(loop, None)
                if active is not None and options.online:
                    timing = timer.result()
                    partial = [run.record(v, _probs(run, v), timing, partial=True) for v in active]
            if active is None:
                break
            if options.online:
                yield partial
        with on_stream():
            if options.online:
                final = {v: _probs(run, v) for v in range(len(run.videos))}
            else:
                probs = run.head(list(range(len(run.videos))))
                final = dict(enumerate(probs))
            timing = timer.result()
            records = [run.record(v, final[v], timing, partial=False) for v in range(len(run.videos))]
    finally:
        run.close()
    yield records
