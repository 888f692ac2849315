"""The measured runs of :mod:`benchmarks.bench_e2e`: settings, one record per run, and
the measurement loop (interleaved rounds, one warm-up pass, CPU time and load per repeat).

Besides the policies, :func:`measure_fixed` measures the per-video work that does not
scale with the steps run (:data:`FIXED_RUN`): the Session at ``audio-only`` and T = 1,
i.e. probing, opening the file, decoding the audio up to the one step's patch and its
log-mel, the per-video set-up and the record, plus one audio step.
"""

from __future__ import annotations

import math
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from benchmarks.common import RESULTS_DIR, fmt_gmac, fmt_ms, summarize
from hms_deploy.runtime.timing import TIMING_KEYS

BACKBONES = ("audio_backbone", "appearance_backbone", "motion_backbone")
FIXED_RUN = "per-video fixed (audio-only, T=1)"


@dataclass(frozen=True)
class E2ESettings:
    """What one benchmark run measures. ``repeats`` for the cheap runs, ``heavy_repeats``
    for runs whose GMAC exceed ``heavy_fraction`` of dense (dense, mask, busy learned)."""

    variant: str = "paper"
    engine: str = "onnx"
    device: str = "cpu"
    steps: int = 128
    repeats: int = 5
    heavy_repeats: int = 3
    heavy_fraction: float = 0.25
    batch: int = 4
    throughput_videos: int = 4
    throughput_repeats: int = 1
    hms_policy: str = "rates:0.6,0.03"
    every_policy: str = "every:2,32"
    video: str | None = None
    checkpoint: str | None = None
    engines_dir: str | None = None
    work_dir: str | None = None  # where generated media and models are cached
    out: str = str(RESULTS_DIR)
    name: str | None = None
    smoke: bool = False
    warmup: bool = True
    plot: bool = True
    extra_runs: tuple[str, ...] = field(default_factory=tuple)
    ort_spinning: bool | None = None  # experiment: force ORT intra-op spinning on/off
    threads: int | None = None  # intra-op threads (ORT sessions, torch); None: all cores

    @property
    def stem(self) -> str:
        if self.name:
            return self.name
        dev = self.device.split(":")[0]
        spin = {None: "", True: "_spin", False: "_nospin"}[self.ort_spinning]
        thr = f"_t{self.threads}" if self.threads else ""
        return f"{'smoke_' if self.smoke else ''}{dev}_{self.variant}_{self.engine}{thr}{spin}"


def smoke_settings(**overrides: Any) -> E2ESettings:
    """Seconds-long: tiny variant, 8 steps, a 6 s cut of the reference video, 1 repeat."""
    base = E2ESettings(variant="tiny", steps=8, repeats=1, heavy_repeats=1, batch=4,
                       throughput_videos=2, throughput_repeats=1, smoke=True)
    return replace(base, **overrides)


@dataclass(frozen=True)
class RunSpec:
    """One measured configuration: ``executor`` is session, dense_batched or compute_then_mask."""

    name: str
    executor: str
    policy: str


def run_specs(s: E2ESettings) -> list[RunSpec]:
    specs = [
        RunSpec("learned", "session", "learned"),
        RunSpec(s.hms_policy, "session", s.hms_policy),
        RunSpec("audio-only", "session", "audio-only"),
        RunSpec(s.every_policy, "session", s.every_policy),
        RunSpec("dense (stepped)", "session", "dense"),
        RunSpec("dense (batched)", "dense_batched", "dense"),
        RunSpec(f"mask ({s.hms_policy})", "compute_then_mask", s.hms_policy),
    ]
    for p in s.extra_runs:
        specs.append(RunSpec(p, "session", p))
    return specs


def make_runner(session: Any, spec: RunSpec, video: str, steps: int, batch: int
            ) -> Callable[[], dict[str, Any]]:
    from hms_deploy.runtime import dense

    if spec.executor == "session":
        return lambda: session.classify(video, steps=steps, policy=spec.policy)
    if spec.executor == "dense_batched":
        return lambda: dense.classify_dense_batched(session.engine_set, video, steps=steps,
                                                    batch=batch)
    if spec.executor == "compute_then_mask":
        return lambda: dense.classify_compute_then_mask(
            session.engine_set, video, steps=steps, policy=spec.policy, batch=batch)
    raise ValueError(f"unknown executor {spec.executor!r}")


def _static(rec: dict[str, Any]) -> dict[str, Any]:
    """What does not change between repeats of one configuration."""
    st = rec["stats"]
    return {
        "executor": rec.get("executor", "session"),
        "policy": rec["policy"],
        "gmac": round(rec["gflops"]["used"], 4),
        "gmac_dense": round(rec["gflops"]["dense"], 4),
        "gmac_decided": round(rec["gflops"].get("decided", rec["gflops"]["used"]), 4),
        "usage": rec["usage"],
        "steps": rec["steps"],
        "label": rec["label"],
        "host_reads": st.get("host_reads"),
        "prediction_reads": st.get("prediction_reads"),
        "decision_reads": st.get("decision_reads", 0),
        "engine_calls": st.get("engine_calls"),
        "appearance_batches": st.get("appearance_batches", 0),
        "decode": {k: st.get(k) for k in ("appearance_frames", "motion_clips", "frames_decoded",
                                          "frames_converted", "seeks", "window_hits")},
    }


def decisions_key(rec: dict[str, Any]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return tuple(rec["decisions"]["appearance"]), tuple(rec["decisions"]["motion"])


@dataclass
class RunRecord:
    """Everything measured for one run (configuration), one entry per repeat."""

    spec: RunSpec
    wanted: int
    walls_ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)
    load: list[float] = field(default_factory=list)
    starts_s: list[float] = field(default_factory=list)  # since the benchmark began
    timings: list[dict[str, float]] = field(default_factory=list)
    record: dict[str, Any] | None = None  # the first repeat's record (decisions never change)

    @property
    def done(self) -> bool:
        return len(self.walls_ms) >= self.wanted

    def add(self, rec: dict[str, Any], *, wall_ms: float, cpu_ms: float, start_s: float,
            s: E2ESettings) -> None:
        """One repeat; the first decides whether the run is heavy (fewer repeats)."""
        self.walls_ms.append(wall_ms)
        self.cpu_ms.append(cpu_ms)
        self.load.append(os.getloadavg()[0])
        self.starts_s.append(round(start_s, 2))
        self.timings.append(rec["timing_ms"])
        if self.record is None:
            self.record = rec
            if rec["gflops"]["used"] > s.heavy_fraction * rec["gflops"]["dense"]:
                self.wanted = min(s.repeats, s.heavy_repeats)
        elif decisions_key(rec) != decisions_key(self.record):
            raise RuntimeError(f"{self.spec.name}: decisions changed between repeats")

    def result(self) -> dict[str, Any]:
        """The run's entry of the results JSON (``runs[name]``)."""
        assert self.record is not None
        tm = {key: summarize([t[key] for t in self.timings]) for key in TIMING_KEYS}
        overhead = [t["other"] / t["total"] for t in self.timings if t["total"] > 0]
        return {
            **_static(self.record),
            "wall_ms": summarize(self.walls_ms),
            "cpu_ms": summarize(self.cpu_ms),
            "loadavg_1m": summarize(self.load, 2),
            "start_s": self.starts_s,
            "timing_ms": tm,
            "overhead_fraction": summarize(overhead, 4),
        }


def measure(session: Any, specs: list[RunSpec], video: str, s: E2ESettings, t_start: float,
            log: Callable[[str], None]) -> dict[str, RunRecord]:
    """Every run ``s.repeats`` times (heavy ones ``s.heavy_repeats``), interleaved round by
    round with the order rotated (machine drift spreads over all runs), after one warm-up
    pass of every run at a short T."""
    runners = {sp.name: make_runner(session, sp, video, s.steps, s.batch) for sp in specs}
    if s.warmup:
        wsteps = min(s.steps, max(2 * s.batch, 8))
        log(f"warm-up: every run once at T={wsteps}")
        for sp in specs:
            make_runner(session, sp, video, wsteps, s.batch)()
    runs = {sp.name: RunRecord(sp, s.repeats) for sp in specs}
    r = 0
    while not all(run.done for run in runs.values()):
        k = r % len(specs)
        for sp in specs[k:] + specs[:k]:
            run = runs[sp.name]
            if run.done:
                continue
            c0 = cpu_s()
            t = time.perf_counter()
            rec = runners[sp.name]()
            wall = time.perf_counter() - t
            run.add(rec, wall_ms=1e3 * wall, cpu_ms=1e3 * (cpu_s() - c0), start_s=t - t_start, s=s)
            log(f"round {r + 1}: {sp.name:<24} {fmt_ms(1e3 * wall):>9}  "
                f"(GMAC {fmt_gmac(rec['gflops']['used'])}, usage {rec['usage']})")
        r += 1
    return runs


def measure_fixed(session: Any, video: str, s: E2ESettings, t_start: float,
                  log: Callable[[str], None]) -> dict[str, Any]:
    """The per-video fixed cost (:data:`FIXED_RUN`), ``max(5, s.repeats)`` times after one
    warm-up call; the entry of the results JSON (``fixed``), figures as a run's."""
    spec = RunSpec(FIXED_RUN, "session", "audio-only")
    run = RunRecord(spec, max(5, s.repeats))
    session.classify(video, steps=1, policy=spec.policy)
    while not run.done:
        c0 = cpu_s()
        t = time.perf_counter()
        rec = session.classify(video, steps=1, policy=spec.policy)
        wall = time.perf_counter() - t
        run.add(rec, wall_ms=1e3 * wall, cpu_ms=1e3 * (cpu_s() - c0), start_s=t - t_start, s=s)
    out = run.result()
    log(f"{FIXED_RUN}: {fmt_ms(out['wall_ms']['median'])} (median of {out['wall_ms']['n']})")
    return out


def cpu_s() -> float:
    """CPU seconds (user + system) of this process, all threads: a figure that other
    processes on a shared machine disturb much less than wall time."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def throughput(session: Any, s: E2ESettings, video: str, log: Callable[[str], None]
                ) -> dict[str, Any]:
    """Videos/s of the HMS policy over N copies: one by one, and N in lockstep."""
    n = s.throughput_videos
    out: dict[str, Any] = {"policy": s.hms_policy, "videos": n}
    if n < 1:
        return out
    for mode, bs in (("sequential", 1), ("lockstep", n)):
        if mode == "lockstep" and n < 2:
            continue
        walls = []
        for _ in range(max(1, s.throughput_repeats)):
            t = time.perf_counter()
            recs = list(session.classify_many([video] * n, steps=s.steps, policy=s.hms_policy,
                                              batch_size=bs))
            walls.append(time.perf_counter() - t)
            bad = [r for r in recs if "error" in r]
            if bad:
                raise RuntimeError(f"throughput ({mode}): {bad[0]['video']}: {bad[0]['error']}")
        w = summarize(walls)
        out[mode] = {"batch_size": bs, "wall_s": w,
                     "videos_per_s": round(n / w["median"], 4) if w["median"] else None}
        log(f"throughput {mode} (batch {bs}): {n} videos in {w['median']:.2f} s "
            f"= {out[mode]['videos_per_s']:.3f} videos/s")
    return out


def call_checks(results: dict[str, dict[str, Any]], s: E2ESettings) -> dict[str, Any]:
    """Engine-call facts that prove skipping (and that the baselines really computed)."""
    T, b = s.steps, s.batch
    mask = results[f"mask ({s.hms_policy})"]["engine_calls"]
    dense_b = results["dense (batched)"]["engine_calls"]
    hms = results[s.hms_policy]
    ao = results["audio-only"]["engine_calls"]
    batches = math.ceil(T / b)
    return {
        "mask_backbone_calls_cover_T": all(mask[p] == batches for p in BACKBONES),
        "mask_cells_and_gates_every_step": all(mask[p] == T for p in
                                               ("appearance_cell", "motion_cell",
                                                "appearance_gate", "motion_gate")),
        "dense_batched_backbone_calls": {p: dense_b[p] for p in BACKBONES},
        # inputs handed to the backbones = usage; motion one call per clip; appearance one
        # call per frame, or per chunk of steps when its plan is forced (appearance_ahead.py)
        "hms_backbone_inputs_equal_usage": (
            hms["decode"]["appearance_frames"] == hms["usage"]["appearance"]
            and hms["decode"]["motion_clips"] == hms["usage"]["motion"]),
        "hms_backbone_calls_equal_usage_or_chunks": (
            hms["engine_calls"]["appearance_backbone"]
            == (hms["appearance_batches"] or hms["usage"]["appearance"])
            and hms["engine_calls"]["motion_backbone"] == hms["usage"]["motion"]),
        "audio_only_launches_no_visual_backbone": (
            ao["appearance_backbone"] == 0 and ao["motion_backbone"] == 0),
        "audio_only_decodes_no_frame": results["audio-only"]["decode"]["frames_decoded"] == 0,
    }
