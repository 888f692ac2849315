"""End-to-end latency and throughput: HMS vs the strongest dense baseline vs compute-then-mask.

On one video (default THE reference video: 60 s, 640x360, 30 fps, keyframes every 2 s)
and one set of engines, at T steps, all in one run, interleaved round by round:

- the Session (the product: decode-on-demand, gated stepping) with ``learned``,
  ``rates:0.6,0.03`` (the paper's regime: appearance on 60 % of steps, motion on 3 %),
  ``audio-only``, ``every:2,32`` and ``dense`` (every gate on, stepped);
- :func:`~hms_deploy.runtime.dense.classify_dense_batched` (every gate on, backbones
  batched over steps: the strongest dense baseline on a GPU);
- :func:`~hms_deploy.runtime.dense.classify_compute_then_mask` with the rates policy
  (what research code does: everything computed, then masked).

Every figure is a median with its spread (p25/p75, min/max) over repeats after one
warm-up pass; the per-stage breakdown is the records' ``timing_ms``. Throughput: N
copies of the video processed by one Session one after another, and N in lockstep.

Writes ``<out>/<name>.json``, ``.md`` and ``.png`` (wall time vs GMAC per run, log axes).

    python -m benchmarks.bench_e2e --variant paper --engine onnx --steps 128
    python -m benchmarks.bench_e2e --smoke --out /tmp/bench      # what CI runs (seconds)
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks.common import (
    MEDIA_DIR,
    RESULTS_DIR,
    ensure_model,
    fmt_gmac,
    fmt_ms,
    header_lines,
    open_session,
    ort_spinning,
    provenance,
    summarize,
    write_json,
)

TIMING_KEYS = ("total", "decode", "audio", "appearance", "motion", "cells_gates", "other")
BACKBONES = ("audio_backbone", "appearance_backbone", "motion_backbone")
TARGETS = {"wall_over_gmac_max": 1.15, "overhead_max": 0.03, "speedup_over_mask_min": 10.0}


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


def _runner(session: Any, spec: RunSpec, video: str, steps: int, batch: int
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


def _video(s: E2ESettings, log: Callable[[str], None]) -> Path:
    from benchmarks.make_reference_video import REFERENCE, SMOKE, reference_video

    if s.video:
        return Path(s.video)
    target = SMOKE if s.smoke else REFERENCE
    if s.work_dir:
        target = Path(s.work_dir) / target.name
    if not target.exists():
        log(f"generating {target}")
    return reference_video(target, smoke=s.smoke)


def _describe_video(path: Path) -> dict[str, Any]:
    from hms_deploy.data.video import probe

    info = probe(path)
    kt = info.keyframe_times
    gaps = kt[1:] - kt[:-1] if kt.size > 1 else []
    return {"path": str(path), "duration_s": round(info.duration_s, 3),
            "size": [info.width, info.height], "fps": round(info.fps, 3),
            "frames": info.num_frames, "has_audio": info.has_audio,
            "keyframe_interval_s": round(float(max(gaps)), 3) if len(gaps) else None,
            "bytes": path.stat().st_size}


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
        "decode": {k: st.get(k) for k in ("appearance_frames", "motion_clips", "frames_decoded",
                                          "frames_converted", "seeks", "window_hits")},
    }


def _decisions_key(rec: dict[str, Any]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return tuple(rec["decisions"]["appearance"]), tuple(rec["decisions"]["motion"])


def run(s: E2ESettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the benchmark, write JSON/Markdown/PNG under ``s.out``; returns the results."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    t_start = time.perf_counter()
    prov = provenance(s.device)
    ck, eng = ensure_model(
        s.variant,
        root=Path(s.work_dir) / "models" / s.variant if s.work_dir else None,
        checkpoint=s.checkpoint, engines_dir=s.engines_dir,
        need_export=s.engine != "torch", log=log,
    )
    video = _video(s, log)
    specs = run_specs(s)
    results: dict[str, dict[str, Any]] = {}
    walls: dict[str, list[float]] = {sp.name: [] for sp in specs}
    timings: dict[str, list[dict[str, float]]] = {sp.name: [] for sp in specs}
    cpu: dict[str, list[float]] = {sp.name: [] for sp in specs}
    load: dict[str, list[float]] = {sp.name: [] for sp in specs}
    starts: dict[str, list[float]] = {sp.name: [] for sp in specs}
    records: dict[str, dict[str, Any]] = {}
    session = open_session(s.engine, ck, eng, s.device, s.threads)
    with ort_spinning(s.ort_spinning):
        session.open()  # the engines (ORT sessions) are created here
    with session:
        es = session.engine_set
        runners = {sp.name: _runner(session, sp, str(video), s.steps, s.batch) for sp in specs}
        if s.warmup:
            wsteps = min(s.steps, max(2 * s.batch, 8))
            log(f"warm-up: every run once at T={wsteps}")
            for sp in specs:
                _runner(session, sp, str(video), wsteps, s.batch)()
        wanted = {sp.name: s.repeats for sp in specs}
        r = 0
        while any(len(walls[n]) < wanted[n] for n in wanted):
            k = r % len(specs)
            for sp in specs[k:] + specs[:k]:  # rotate the order: spread drift over runs
                if len(walls[sp.name]) >= wanted[sp.name]:
                    continue
                c0 = _cpu_s()
                t = time.perf_counter()
                starts[sp.name].append(round(t - t_start, 2))
                rec = runners[sp.name]()
                wall = time.perf_counter() - t
                walls[sp.name].append(1e3 * wall)
                cpu[sp.name].append(1e3 * (_cpu_s() - c0))
                load[sp.name].append(os.getloadavg()[0])
                timings[sp.name].append(rec["timing_ms"])
                if sp.name not in records:
                    records[sp.name] = rec
                    if rec["gflops"]["used"] > s.heavy_fraction * rec["gflops"]["dense"]:
                        wanted[sp.name] = min(s.repeats, s.heavy_repeats)
                elif _decisions_key(rec) != _decisions_key(records[sp.name]):
                    raise RuntimeError(f"{sp.name}: decisions changed between repeats")
                log(f"round {r + 1}: {sp.name:<24} {fmt_ms(1e3 * wall):>9}  "
                    f"(GMAC {fmt_gmac(rec['gflops']['used'])}, usage {rec['usage']})")
            r += 1
        for sp in specs:
            rec = records[sp.name]
            tm = {key: summarize([t[key] for t in timings[sp.name]]) for key in TIMING_KEYS}
            overhead = [t["other"] / t["total"] for t in timings[sp.name] if t["total"] > 0]
            results[sp.name] = {
                **_static(rec),
                "wall_ms": summarize(walls[sp.name]),
                "cpu_ms": summarize(cpu[sp.name]),
                "loadavg_1m": summarize(load[sp.name], 2),
                "start_s": starts[sp.name],  # seconds since the benchmark began, per repeat
                "timing_ms": tm,
                "overhead_fraction": summarize(overhead, 4),
            }
        throughput = _throughput(session, s, str(video), log)
        calls_check = _call_checks(results, s)
        hms_rec, mask_rec = records[s.hms_policy], records[f"mask ({s.hms_policy})"]
        decisions_match = _decisions_key(hms_rec) == _decisions_key(mask_rec)
        costs = dict(es.costs)
    summary = _summary(results, s, decisions_match)
    out = {
        "benchmark": "e2e",
        "schema": 1,
        **prov,
        "variant": s.variant,
        "engine": s.engine,
        "T": s.steps,
        "video": _describe_video(video),
        "model": {"checkpoint": str(ck), "engines": str(eng) if eng else None,
                  "export": hms_rec.get("export"), "part_gmac": costs},
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(s).items()},
        "runs": results,
        "throughput": throughput,
        "checks": calls_check,
        "summary": summary,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    out["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    outdir = Path(s.out)
    write_json(outdir / f"{s.stem}.json", out)
    (outdir / f"{s.stem}.md").write_text(markdown(out))
    if s.plot:
        plot(out, outdir / f"{s.stem}.png")
    log(f"wrote {outdir / s.stem}.json/.md{'/.png' if s.plot else ''} "
        f"({out['seconds']:.0f} s)")
    return out


def _cpu_s() -> float:
    """CPU seconds (user + system) of this process, all threads: a figure that other
    processes on a shared machine disturb much less than wall time."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _throughput(session: Any, s: E2ESettings, video: str, log: Callable[[str], None]
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


def _call_checks(results: dict[str, dict[str, Any]], s: E2ESettings) -> dict[str, Any]:
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
        "hms_backbone_calls_equal_usage": (
            hms["engine_calls"]["appearance_backbone"] == hms["usage"]["appearance"]
            and hms["engine_calls"]["motion_backbone"] == hms["usage"]["motion"]),
        "audio_only_launches_no_visual_backbone": (
            ao["appearance_backbone"] == 0 and ao["motion_backbone"] == 0),
        "audio_only_decodes_no_frame": results["audio-only"]["decode"]["frames_decoded"] == 0,
    }


def _paired_ratio(num: dict[str, Any], den: dict[str, Any]) -> float | None:
    """Median over ``den``'s repeats of (mean of the ``num`` runs just before and just after
    it) / that repeat: a ratio of neighbours in time, robust to slow drift in machine load."""
    if "start_s" not in num or "start_s" not in den:
        return None
    runs = sorted(zip(num["start_s"], num["wall_ms"]["values"]))
    ratios = []
    for start, wall in zip(den["start_s"], den["wall_ms"]["values"]):
        before = [w for s0, w in runs if s0 < start][-1:]
        after = [w for s0, w in runs if s0 > start][:1]
        near = before + after
        if near and wall > 0:
            ratios.append(sum(near) / len(near) / wall)
    if not ratios:
        return None
    ratios.sort()
    mid = len(ratios) // 2
    return ratios[mid] if len(ratios) % 2 else 0.5 * (ratios[mid - 1] + ratios[mid])


def _summary(results: dict[str, dict[str, Any]], s: E2ESettings, decisions_match: bool
             ) -> dict[str, Any]:
    hms = results[s.hms_policy]
    stepped = results["dense (stepped)"]
    batched = results["dense (batched)"]
    mask = results[f"mask ({s.hms_policy})"]
    hms_wall = hms["wall_ms"]["median"]
    better = "dense (stepped)" if stepped["wall_ms"]["median"] <= batched["wall_ms"]["median"] \
        else "dense (batched)"
    dense_wall = results[better]["wall_ms"]["median"]
    wall_ratio = hms_wall / dense_wall
    gmac_ratio = hms["gmac"] / hms["gmac_dense"]
    overhead = hms["overhead_fraction"]["median"]
    speedup = mask["wall_ms"]["median"] / hms_wall
    per_run = {
        name: {"wall_ratio": round(r["wall_ms"]["median"] / dense_wall, 4),
               "gmac_ratio": round(r["gmac"] / r["gmac_dense"], 4)}
        for name, r in results.items()
    }
    wall_over_gmac = wall_ratio / gmac_ratio
    paired = _paired_ratio(hms, results[better])
    cpu_dense = min(stepped["cpu_ms"]["median"], batched["cpu_ms"]["median"])
    cpu_ratio = hms["cpu_ms"]["median"] / cpu_dense
    return {
        "hms_policy": s.hms_policy,
        "better_dense": better,
        "hms_wall_ms": hms_wall,
        "dense_wall_ms": dense_wall,
        "mask_wall_ms": mask["wall_ms"]["median"],
        "wall_ratio_hms_over_dense": round(wall_ratio, 4),
        "gmac_ratio_hms_over_dense": round(gmac_ratio, 4),
        "wall_ratio_over_gmac_ratio": round(wall_over_gmac, 3),
        "paired_wall_ratio_hms_over_dense": None if paired is None else round(paired, 4),
        "paired_wall_ratio_over_gmac_ratio": (None if paired is None
                                              else round(paired / gmac_ratio, 3)),
        "overhead_fraction": overhead,
        "cpu_ratio_hms_over_dense": round(cpu_ratio, 4),
        "cpu_ratio_over_gmac_ratio": round(cpu_ratio / gmac_ratio, 3),
        "cpu_speedup_over_mask": round(mask["cpu_ms"]["median"] / hms["cpu_ms"]["median"], 2),
        "speedup_over_mask": round(speedup, 2),
        "mask_decisions_equal_hms": decisions_match,
        "per_run": per_run,
        "targets": {
            "wall_ratio_le_1.15x_gmac_ratio": {
                "holds": wall_over_gmac <= TARGETS["wall_over_gmac_max"],
                "value": round(wall_over_gmac, 3), "limit": TARGETS["wall_over_gmac_max"],
                "wall_ratio_limit": round(TARGETS["wall_over_gmac_max"] * gmac_ratio, 4),
                "hms_wall_limit_ms": round(TARGETS["wall_over_gmac_max"] * gmac_ratio
                                           * dense_wall, 1),
                "note": "decode included"},
            "overhead_lt_3pct": {"holds": overhead < TARGETS["overhead_max"], "value": overhead,
                                 "limit": TARGETS["overhead_max"]},
            "speedup_ge_10x": {"holds": speedup >= TARGETS["speedup_over_mask_min"],
                               "value": round(speedup, 2),
                               "limit": TARGETS["speedup_over_mask_min"]},
        },
    }


# ------------------------------------------------------------------------------- reports


def markdown(out: dict[str, Any]) -> str:
    su = out["summary"]
    v = out["video"]
    lines = [
        f"# End-to-end latency: {out['variant']} variant, {out['engine']}, T = {out['T']}",
        "",
        *header_lines(out),
        (f"- video: {Path(v['path']).name}, {v['duration_s']} s, {v['size'][0]}x{v['size'][1]}, "
        f"{v['fps']} fps, keyframe every {v['keyframe_interval_s']} s"),
        f"- intra-op threads: {out['settings'].get('threads') or 'default (all usable cores)'}",
        *([(f"- experiment: ONNX Runtime intra-op spinning forced "
           f"{'on' if out['settings']['ort_spinning'] else 'off'} in every session")]
          if out["settings"].get("ort_spinning") is not None else []),
        (f"- dense baselines batch {out['settings']['batch']} steps per backbone call; "
        f"medians over repeats after a warm-up (n per row); costs in GMAC"),
        "",
        ("| run | executor | GMAC | GMAC / dense | wall (median) | IQR | wall / dense | CPU time "
        "| decode | audio | appearance | motion | cells+gates | other | host reads "
        "| backbone calls A/I/M |"),
        ("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: | --- |"),
    ]
    for name, r in out["runs"].items():
        tm = r["timing_ms"]
        c = r["engine_calls"]
        pr = su["per_run"][name]
        lines.append(
            f"| {name} | {r['executor']} | {fmt_gmac(r['gmac'])} | {pr['gmac_ratio']:.3f} | "
            f"{fmt_ms(r['wall_ms']['median'])} | "
            f"{fmt_ms(r['wall_ms']['iqr'])} (n={r['wall_ms']['n']}) | "
            f"{pr['wall_ratio']:.3f} | {fmt_ms(r['cpu_ms']['median'])} | "
            + " | ".join(fmt_ms(tm[k]["median"]) for k in TIMING_KEYS[1:])
            + f" | {r['host_reads']} | {c['audio_backbone']}/{c['appearance_backbone']}/"
              f"{c['motion_backbone']} |"
        )
    t = su["targets"]
    ok = lambda b: "met" if b else "**missed**"
    lines += [
        "",
        (f"## Summary (HMS = `{su['hms_policy']}`, dense = the better of stepped and batched: "
        f"{su['better_dense']})"),
        "",
        (f"- wall ratio HMS / dense = {su['wall_ratio_hms_over_dense']:.4f}; GMAC ratio = "
        f"{su['gmac_ratio_hms_over_dense']:.4f}; wall ratio / GMAC ratio = "
        f"{su['wall_ratio_over_gmac_ratio']:.2f} (target <= 1.15, decode included): "
        f"{ok(t['wall_ratio_le_1.15x_gmac_ratio']['holds'])}; HMS would need "
        f"<= {fmt_ms(t['wall_ratio_le_1.15x_gmac_ratio']['hms_wall_limit_ms'])}, "
        f"measured {fmt_ms(su['hms_wall_ms'])}"),
        (f"- paired wall ratio (the HMS runs next in time to each dense run) = "
         f"{su['paired_wall_ratio_hms_over_dense']:.4f} "
         f"({su['paired_wall_ratio_over_gmac_ratio']:.2f}x the GMAC ratio)"
         if su.get("paired_wall_ratio_hms_over_dense") is not None
         else "- paired wall ratio: n/a (no run start times recorded)"),
        (f"- CPU time (all threads) ratio HMS / dense = {su['cpu_ratio_hms_over_dense']:.4f} "
        f"({su['cpu_ratio_over_gmac_ratio']:.2f}x the GMAC ratio; less disturbed by other load "
        f"than wall time); CPU-time speedup over mask = {su['cpu_speedup_over_mask']:.1f}x"),
        (f"- orchestration overhead (other / total) = {100 * su['overhead_fraction']:.2f} % "
        f"(target < 3 %): {ok(t['overhead_lt_3pct']['holds'])}"),
        (f"- speedup over compute-then-mask at the same decisions = {su['speedup_over_mask']:.1f}x "
        f"(target >= 10x): {ok(t['speedup_ge_10x']['holds'])}; decisions equal: "
        f"{su['mask_decisions_equal_hms']}"),
    ]
    tp = out["throughput"]
    if "sequential" in tp:
        lines += ["", f"## Throughput (`{tp['policy']}`, {tp['videos']} copies of the video)", "",
                  "| mode | batch | wall (median) | videos/s |", "| --- | ---: | ---: | ---: |"]
        for mode in ("sequential", "lockstep"):
            if mode in tp:
                m = tp[mode]
                lines.append(f"| {mode} | {m['batch_size']} | {m['wall_s']['median']:.2f} s "
                             f"(n={m['wall_s']['n']}) | {m['videos_per_s']:.3f} |")
    lines += ["", "Checks: " + ", ".join(f"{k} = {v}" for k, v in out["checks"].items()), ""]
    return "\n".join(lines)


def plot(out: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 5.0), dpi=120)
    runs = out["runs"]
    dense_name = out["summary"]["better_dense"]
    dref = runs[dense_name]
    colors = {"session": "tab:blue", "dense_batched": "tab:orange", "compute_then_mask": "tab:red"}
    points = {name: (r["gmac"], r["wall_ms"]["median"] / 1e3) for name, r in runs.items()}
    for name, r in runs.items():
        w = r["wall_ms"]
        x, y = points[name]
        ax.errorbar([x], [y], yerr=[[y - w["p25"] / 1e3], [w["p75"] / 1e3 - y]], fmt="o",
                    color=colors.get(r["executor"], "k"), capsize=3)
        # labels of points at about the same GMAC are stacked in the order of their times
        rank = sum(1 for x0, y0 in points.values()
                   if abs(math.log10(x / x0)) < 0.15 and y0 > y)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(7, 4 - 11 * rank),
                    fontsize=8)
    xs = [min(r["gmac"] for r in runs.values()) * 0.7, dref["gmac"] * 1.3]
    ax.set_xlim(xs[0] * 0.8, dref["gmac"] * 8)
    k = dref["wall_ms"]["median"] / 1e3 / dref["gmac"]
    ax.plot(xs, [k * x for x in xs], "--", color="grey", lw=0.8,
            label="wall proportional to GMAC (through dense)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("GMAC launched per video")
    ax.set_ylabel("wall time per video [s] (median; bars p25-p75)")
    m = out["machine"]
    dev = m["gpu"] or m["cpu_model"]
    ax.set_title(f"HMS {out['variant']}, {out['engine']} on {dev}, T={out['T']}", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def rebuild_report(path: str | Path) -> dict[str, Any]:
    """Recompute the summary of a results JSON (e.g. after a summary figure was added) and
    rewrite it with its Markdown and PNG. Measurements are not touched."""
    import json

    path = Path(path)
    out = json.loads(path.read_text())
    fields = set(E2ESettings.__dataclass_fields__)
    settings = E2ESettings(**{k: (tuple(v) if isinstance(v, list) else v)
                              for k, v in out["settings"].items() if k in fields})
    out["summary"] = _summary(out["runs"], settings, out["summary"]["mask_decisions_equal_hms"])
    write_json(path, out)
    path.with_suffix(".md").write_text(markdown(out))
    plot(out, path.with_suffix(".png"))
    return out


# ----------------------------------------------------------------------------------- CLI


def add_arguments(ap: argparse.ArgumentParser) -> None:
    d = E2ESettings()
    ap.add_argument("--variant", choices=("paper", "tiny"), default=d.variant)
    ap.add_argument("--engine", choices=("onnx", "torch", "trt"), default=d.engine)
    ap.add_argument("--device", default=d.device, help="cpu, cuda or cuda:N")
    ap.add_argument("--steps", type=int, default=d.steps, help="T")
    ap.add_argument("--repeats", type=int, default=d.repeats, help="repeats of the cheap runs")
    ap.add_argument("--heavy-repeats", type=int, default=d.heavy_repeats,
                    help="repeats of runs costing > 25%% of dense GMAC")
    ap.add_argument("--batch", type=int, default=d.batch,
                    help="steps per backbone call of the batched baselines")
    ap.add_argument("--throughput-videos", type=int, default=d.throughput_videos)
    ap.add_argument("--throughput-repeats", type=int, default=d.throughput_repeats)
    ap.add_argument("--video", default=None, help="default: the reference video (made once)")
    ap.add_argument("--checkpoint", default=None, help="default: an untrained one, cached")
    ap.add_argument("--engines", dest="engines_dir", default=None,
                    help="export dir (default: the checkpoint exported once, cached)")
    ap.add_argument("--work-dir", default=None,
                    help=f"cache for generated media and models (default {MEDIA_DIR})")
    ap.add_argument("--out", default=None, help=f"results dir (default {RESULTS_DIR})")
    ap.add_argument("--name", default=None, help="file stem (default <device>_<variant>_<engine>)")
    ap.add_argument("--smoke", action="store_true",
                    help="seconds-long: tiny, T=8, 6 s video, 1 repeat (what CI runs)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--threads", type=int, default=None,
                    help="intra-op threads per ORT session and for torch (default: all cores)")
    ap.add_argument("--ort-spinning", choices=("on", "off"), default=None,
                    help="experiment: force ONNX Runtime intra-op spinning (default: backend's)")


def settings_from_args(args: argparse.Namespace, explicit: set[str]) -> E2ESettings:
    """Defaults (smoke defaults with ``--smoke``), overridden by every option given."""
    names = {f for f in E2ESettings.__dataclass_fields__}
    given = {k: getattr(args, k) for k in explicit if k in names}
    if args.no_plot:
        given["plot"] = False
    if args.ort_spinning is not None:
        given["ort_spinning"] = args.ort_spinning == "on"
    if args.smoke:
        given.setdefault("out", str(MEDIA_DIR / "smoke"))
        return smoke_settings(**given)
    return E2ESettings(**given)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_e2e",
                                 description=__doc__.splitlines()[0])
    add_arguments(ap)
    ap.add_argument("--report", default=None, metavar="JSON",
                    help="only recompute the summary and rewrite the .md/.png of a results file")
    args = ap.parse_args(argv)
    if args.report:
        rebuild_report(args.report)
        return 0
    explicit = {a.dest for a in ap._actions if a.dest != "help"
                and getattr(args, a.dest) != ap.get_default(a.dest)}
    run(settings_from_args(args, explicit))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
