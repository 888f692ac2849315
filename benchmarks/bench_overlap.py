"""HMS end to end before / after overlapping decode with compute, side by side in one run.

Paper variant on ONNX Runtime (CPU), T = 128, the reference video (60 s, 640x360,
keyframe every 2 s). Every configuration runs in the same process, rounds interleaved
with a rotating order, medians over repeats after one warm-up pass:

- ``<policy> before``: the decoder as it was (no read-ahead thread, no frame skipping),
  every ORT session on all cores, appearance frames one step at a time (the committed
  ``cpu_paper_onnx`` configuration);
- ``<policy> after``: the runtime's defaults (``Session`` without ``threads``, as
  ``hms-run`` runs): every ORT session on all cores, :class:`~hms_deploy.runtime.frames.
  DecodeOptions` defaults (read-ahead thread, skipping, the planned read-ahead) and
  ``appearance_batch`` frames per call (:mod:`hms_deploy.runtime.appearance_ahead`);
- ``<policy> after, plan_ahead=False``: the same with the read-ahead bounded by a count
  of decoded frames (the default before the planned read-ahead);
- ``<policy> after, appearance_batch=1``: one step's frame per call;
- ``<policy> after, appearance 1 thread``: the appearance backbone on
  ``appearance_threads`` intra-op threads (the other core decodes);
- ``learned`` and ``audio-only``, before and after (they must not get slower);
- dense batched (the better dense baseline in ``cpu_paper_onnx``; its decoding uses the
  read-ahead thread too) and compute-then-mask with the policy's decisions.

The summary gives ``wall_ratio_over_gmac_ratio`` (HMS wall / dense wall over HMS GMAC /
dense GMAC; target <= 1.10) for each HMS configuration, the orchestration overhead, the
speedup over compute-then-mask and the load average during every run.

    python -m benchmarks.bench_overlap [--repeats 5] [--heavy-repeats 2] [--appearance-batch 8]
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks.common import (
    RESULTS_DIR,
    ensure_model,
    fmt_ms,
    header_lines,
    loadavg,
    provenance,
    summarize,
    write_json,
    write_report,
)

LABELS = ("before", "after", "after, plan_ahead=False", "after, appearance_batch=1",
          "after, appearance 1 thread")
TARGETS = {"wall_over_gmac_max": 1.10, "overhead_max": 0.03, "speedup_over_mask_min": 10.0}
STAGES = ("total", "decode", "audio", "appearance", "motion", "cells_gates", "other")


@dataclass(frozen=True)
class OverlapSettings:
    variant: str = "paper"
    steps: int = 128
    repeats: int = 5
    heavy_repeats: int = 2
    mask_repeats: int = 1
    batch: int = 4
    policy: str = "rates:0.6,0.03"
    appearance_threads: int = 1
    appearance_batch: int | None = None  # "after" runs (None: the runtime's default); "before": 1
    heavy_first: bool = False
    video: str | None = None
    out: str = str(RESULTS_DIR)
    name: str = "overlap_cpu_paper_onnx"


@dataclass(frozen=True)
class Run:
    name: str
    session: str  # "all" (every ORT session on all cores) or "tuned"
    executor: str  # session, dense_batched, compute_then_mask
    policy: str
    new_decoder: bool = True
    heavy: bool = False
    appearance_batch: int | None = None  # None: the settings'
    plan_ahead: bool = True


def runs(s: OverlapSettings) -> list[Run]:
    p, old = s.policy, {"new_decoder": False, "appearance_batch": 1}
    return [
        Run(f"{p} before", "all", "session", p, **old),
        Run(f"{p} after", "all", "session", p),
        Run(f"{p} after, plan_ahead=False", "all", "session", p, plan_ahead=False),
        Run(f"{p} after, appearance_batch=1", "all", "session", p, appearance_batch=1),
        Run(f"{p} after, appearance 1 thread", "tuned", "session", p),
        Run("learned before", "all", "session", "learned", **old),
        Run("learned after", "all", "session", "learned"),
        Run("audio-only before", "all", "session", "audio-only", **old),
        Run("audio-only after", "all", "session", "audio-only"),
        Run("dense (batched)", "all", "dense_batched", "dense", heavy=True),
        Run(f"mask ({p})", "all", "compute_then_mask", p, heavy=True),
    ]


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _runner(sessions: dict[str, Any], run: Run, video: str, steps: int, batch: int,
            appearance_batch: int | None) -> Callable[[], dict[str, Any]]:
    from hms_deploy.runtime import dense
    from hms_deploy.runtime.frames import DecodeOptions

    session = sessions[run.session]
    if run.executor == "dense_batched":
        return lambda: dense.classify_dense_batched(session.engine_set, video, steps=steps,
                                                    batch=batch)
    if run.executor == "compute_then_mask":
        return lambda: dense.classify_compute_then_mask(session.engine_set, video, steps=steps,
                                                        policy=run.policy, batch=batch)
    decode = (DecodeOptions(plan_ahead=run.plan_ahead) if run.new_decoder
              else DecodeOptions(read_ahead=0, skip_nonref=False))
    opts = replace(session.options(steps=steps, policy=run.policy), decode=decode)
    ab = appearance_batch if run.appearance_batch is None else run.appearance_batch
    if ab is not None:
        opts = replace(opts, appearance_batch=ab)

    def classify() -> dict[str, Any]:
        (rec,) = list(session.classify_many([video], options=opts))
        if "error" in rec:
            raise RuntimeError(f"{run.name}: {rec['error']}")
        return rec

    return classify


def run(s: OverlapSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    import warnings

    from benchmarks.make_reference_video import reference_video
    from hms_deploy.runtime.options import DEFAULT_APPEARANCE_BATCH
    from hms_deploy.runtime.session import Session

    warnings.filterwarnings("ignore", category=FutureWarning)
    if s.appearance_batch is None:
        s = replace(s, appearance_batch=DEFAULT_APPEARANCE_BATCH)
    t0 = time.perf_counter()
    prov = provenance("cpu")
    _, eng = ensure_model(s.variant, log=log)
    video = str(Path(s.video) if s.video else reference_video())
    specs = runs(s)
    sessions = {
        "all": Session(engines_dir=eng, engine="onnx", device="cpu"),
        "tuned": Session(engines_dir=eng, engine="onnx", device="cpu",
                         threads={"appearance_backbone": s.appearance_threads}),
    }
    data: dict[str, dict[str, list[Any]]] = {
        r.name: {"wall": [], "cpu": [], "load": [], "timing": [], "start": []} for r in specs}
    records: dict[str, dict[str, Any]] = {}
    try:
        for sess in sessions.values():
            sess.open()
        fns = {r.name: _runner(sessions, r, video, s.steps, s.batch, s.appearance_batch)
               for r in specs}
        want = {r.name: (s.mask_repeats if r.executor == "compute_then_mask" else
                         s.heavy_repeats if r.heavy else s.repeats) for r in specs}
        specs = [r for r in specs if want[r.name] > 0]
        log("warm-up: every run once at T=8")
        for r in specs:
            _runner(sessions, r, video, 8, s.batch, s.appearance_batch)()
        rnd = 0
        while any(len(data[r.name]["wall"]) < want[r.name] for r in specs):
            k = rnd % len(specs)
            order = specs[k:] + specs[:k]
            if s.heavy_first:  # the long runs first: a run cut short still has its denominator
                order = [r for r in order if r.heavy] + [r for r in order if not r.heavy]
            for r in order:
                d = data[r.name]
                if len(d["wall"]) >= want[r.name]:
                    continue
                c0, t = _cpu_s(), time.perf_counter()
                d["start"].append(round(t - t0, 1))
                rec = fns[r.name]()
                wall = time.perf_counter() - t
                d["wall"].append(1e3 * wall)
                d["cpu"].append(1e3 * (_cpu_s() - c0))
                d["load"].append(round(os.getloadavg()[0], 2))
                d["timing"].append(rec["timing_ms"])
                records.setdefault(r.name, rec)
                log(f"round {rnd + 1}: {r.name:<44} {fmt_ms(1e3 * wall):>9}  "
                    f"load {d['load'][-1]:.1f}  usage {rec['usage']}")
                # raw measurements so far (a long run on a busy machine may be cut short)
                write_json(Path(s.out) / f"{s.name}.partial.json", {**prov, "raw": data})
            rnd += 1
    finally:
        for sess in sessions.values():
            sess.close()
    results = {}
    for r in specs:
        if r.name not in records:
            continue
        d, rec = data[r.name], records[r.name]
        st = rec["stats"]
        results[r.name] = {
            **asdict(r),
            "gmac": round(rec["gflops"]["used"], 4), "gmac_dense": round(rec["gflops"]["dense"], 4),
            "usage": rec["usage"], "decisions": rec["decisions"], "label": rec["label"],
            "score": rec["score"],
            "appearance_calls": st["engine_calls"]["appearance_backbone"],
            "decode": {k: st.get(k) for k in ("frames_walked", "frames_decoded", "frames_skipped",
                                              "frames_converted", "seeks", "window_hits")},
            "wall_ms": summarize(d["wall"]), "cpu_ms": summarize(d["cpu"]),
            "loadavg_1m": summarize(d["load"], 2), "start_s": d["start"],
            "timing_ms": {k: summarize([t[k] for t in d["timing"]]) for k in STAGES},
            "overhead_fraction": summarize(
                [t["other"] / t["total"] for t in d["timing"] if t["total"] > 0], 4),
        }
    out = {"benchmark": "overlap", "schema": 1, **prov, "variant": s.variant, "engine": "onnx",
           "T": s.steps, "video": video, "settings": asdict(s), "runs": results,
           "summary": summary(results, s), "seconds": round(time.perf_counter() - t0, 1)}
    out["machine"]["loadavg_at_end"] = loadavg()
    outdir = Path(s.out)
    write_report(outdir / f"{s.name}.json", out, markdown)
    (outdir / f"{s.name}.partial.json").unlink(missing_ok=True)
    log(f"wrote {outdir / s.name}.json/.md ({out['seconds']:.0f} s)")
    return out


def from_partial(s: OverlapSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The report from ``<name>.partial.json`` of a run that was cut short (runs with no
    measurement are left out; GMAC and usage come from the export's costs and the forced
    plans, ``learned`` from the untrained model's usage 0/0)."""
    import json

    from hms_deploy.costs import video_cost
    from hms_deploy.export.manifest import load_manifest
    from hms_deploy.parts import PART_NAMES
    from hms_deploy.runtime.policy import parse_policy

    outdir = Path(s.out)
    part = json.loads((outdir / f"{s.name}.partial.json").read_text())
    _, eng = ensure_model(s.variant, log=log)
    m = load_manifest(eng, verify=False)
    costs = {n: m.parts[n].gmac for n in PART_NAMES}
    T = s.steps
    results = {}
    for r in runs(s):
        d = part["raw"].get(r.name)
        if not d or not d["wall"]:
            continue
        if r.policy == "learned":
            a = mo = 0
        else:
            pa, pm = parse_policy("dense" if r.executor == "dense_batched" else r.policy).plan(T)
            a, mo = int(pa.sum()), int(pm.sum())
        if r.executor != "session":
            a, mo = T, T  # dense and compute-then-mask run every backbone on every step
        results[r.name] = {
            **asdict(r), "gmac": round(video_cost(costs, steps=T, appearance=a, motion=mo), 4),
            "gmac_dense": round(video_cost(costs, steps=T, appearance=T, motion=T), 4),
            "usage": {"appearance": a, "motion": mo}, "decisions": None, "score": None,
            "decode": dict.fromkeys(("frames_walked", "frames_decoded", "frames_skipped",
                                     "frames_converted", "seeks", "window_hits")),
            "wall_ms": summarize(d["wall"]), "cpu_ms": summarize(d["cpu"]),
            "loadavg_1m": summarize(d["load"], 2), "start_s": d["start"],
            "timing_ms": {k: summarize([t[k] for t in d["timing"]]) for k in STAGES},
            "overhead_fraction": summarize(
                [t["other"] / t["total"] for t in d["timing"] if t["total"] > 0], 4),
        }
    if "dense (batched)" not in results or f"{s.policy} after" not in results:
        raise RuntimeError("the partial run has no dense or no HMS measurement yet")
    prov = {k: part[k] for k in ("date", "git", "machine", "versions", "argv")}
    out = {"benchmark": "overlap", "schema": 1, **prov, "variant": s.variant, "engine": "onnx",
           "T": T, "video": "reference_60s_640x360.mp4", "settings": asdict(s),
           "runs": results, "summary": summary(results, s), "cut_short": True}
    out["machine"]["loadavg_at_end"] = loadavg()
    write_report(outdir / f"{s.name}.json", out, markdown)
    return out


def summary(res: dict[str, dict[str, Any]], s: OverlapSettings) -> dict[str, Any]:
    p = s.policy
    dense = res["dense (batched)"]
    gmac_ratio = res[f"{p} after"]["gmac"] / dense["gmac"]
    d_wall, d_cpu = dense["wall_ms"]["median"], dense["cpu_ms"]["median"]
    out: dict[str, Any] = {"gmac_ratio": round(gmac_ratio, 5), "dense_wall_ms": d_wall,
                           "targets": TARGETS}
    for label in LABELS:
        r = res.get(f"{p} {label}")
        if r is None:
            continue
        w = r["wall_ms"]["median"] / d_wall
        out[label] = {
            "wall_ms": r["wall_ms"]["median"],
            "wall_ratio": round(w, 5),
            "wall_ratio_over_gmac_ratio": round(w / gmac_ratio, 3),
            "cpu_ratio_over_gmac_ratio": round(r["cpu_ms"]["median"] / d_cpu / gmac_ratio, 3),
            "overhead": r["overhead_fraction"]["median"],
        }
    after = out["after"]
    mask_run = res.get(f"mask ({p})")
    mask = mask_run["wall_ms"]["median"] if mask_run else None
    out["speedup_over_mask"] = round(mask / after["wall_ms"], 2) if mask else None
    # compute-then-mask runs every backbone on every step like dense batched, plus every
    # cell and gate: dense wall / HMS wall bounds its speedup from below
    out["speedup_over_mask_lower_bound"] = round(d_wall / after["wall_ms"], 2)
    out["wall_over_gmac_met"] = bool(after["wall_ratio_over_gmac_ratio"] <= TARGETS["wall_over_gmac_max"])
    out["overhead_met"] = bool(after["overhead"] is not None and after["overhead"] < TARGETS["overhead_max"])
    out["mask_met"] = (None if mask is None else
                       bool(out["speedup_over_mask"] >= TARGETS["speedup_over_mask_min"]))
    pairs = [(res.get(f"{q} after"), res.get(f"{q} before")) for q in (p, "learned", "audio-only")]
    # scores within 1e-5: appearance frames batched ahead agree with batch 1 to float tolerance
    out["same_decisions_and_scores"] = (
        None if any(a is None or b is None or a["decisions"] is None for a, b in pairs)
        else all(a["decisions"] == b["decisions"] and abs(a["score"] - b["score"]) <= 1e-5
                 for a, b in pairs))
    # wall with one step's frame per call / wall with appearance_batch frames per call
    out["appearance_batch_gain"] = (
        round(out["after, appearance_batch=1"]["wall_ms"] / after["wall_ms"], 3)
        if "after, appearance_batch=1" in out else None)
    out["plan_ahead_gain"] = (
        round(out["after, plan_ahead=False"]["wall_ms"] / after["wall_ms"], 3)
        if "after, plan_ahead=False" in out else None)
    for q in ("learned", "audio-only"):
        b, a = res.get(f"{q} before"), res.get(f"{q} after")
        out[f"{q}_after_over_before"] = (
            round(a["wall_ms"]["median"] / b["wall_ms"]["median"], 3) if a and b else None)
        out[f"{q}_cpu_after_over_before"] = (
            round(a["cpu_ms"]["median"] / b["cpu_ms"]["median"], 3) if a and b else None)
    return out


def markdown(r: dict[str, Any]) -> str:
    s, sm = r["settings"], r["summary"]
    after_name = f"{s['policy']} after"
    lines = [f"# HMS before / after the decode overlap: {r['variant']}, onnx, T = {r['T']}", "",
             *header_lines(r), f"- load average at end: {r['machine']['loadavg_at_end']}",
             (f"- video: {Path(r['video']).name}; every session on all cores except the "
             f"appearance backbone of 'after, appearance 1 thread' "
             f"({s['appearance_threads']} thread)"), "",
             ("| run | GMAC | wall (median) | IQR | n | CPU time | load 1m | decode | appearance "
             "| motion | other | walked / decoded / skipped / converted |"),
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, x in r["runs"].items():
        w, t, d = x["wall_ms"], x["timing_ms"], x["decode"]
        lines.append(
            f"| {name} | {x['gmac']:.1f} | {fmt_ms(w['median'])} | {fmt_ms(w['iqr'])} | {w['n']} | "
            f"{fmt_ms(x['cpu_ms']['median'])} | {x['loadavg_1m']['median']} | "
            f"{fmt_ms(t['decode']['median'])} | {fmt_ms(t['appearance']['median'])} | "
            f"{fmt_ms(t['motion']['median'])} | {fmt_ms(t['other']['median'])} | "
            + ("- |" if d["frames_walked"] is None else
               f"{d['frames_walked']} / {d['frames_decoded']} / {d['frames_skipped']} / "
               f"{d['frames_converted']} |"))
    lines += ["", (f"## Summary (HMS = `{s['policy']}`, dense = dense batched, "
              f"GMAC ratio {sm['gmac_ratio']:.4f})"), ""]
    for label in LABELS:
        x = sm.get(label)
        if x is None:
            continue
        lines.append(f"- {label}: wall {fmt_ms(x['wall_ms'])}, wall ratio {x['wall_ratio']:.4f}, "
                     f"**wall ratio / GMAC ratio = {x['wall_ratio_over_gmac_ratio']:.3f}** "
                     f"(CPU-time ratio / GMAC ratio {x['cpu_ratio_over_gmac_ratio']:.3f}), "
                     f"overhead {100 * (x['overhead'] or 0):.2f} %")
    lines += [(f"- target wall ratio / GMAC ratio <= {TARGETS['wall_over_gmac_max']} (after): "
              f"{'met' if sm['wall_over_gmac_met'] else '**missed**'}; overhead < 3 %: "
              f"{'met' if sm['overhead_met'] else '**missed**'}; speedup over compute-then-mask "
              f"{'not measured' if sm['speedup_over_mask'] is None else str(sm['speedup_over_mask']) + 'x'}"
              f" (lower bound dense / HMS: "
              f"{sm['speedup_over_mask_lower_bound']}x; >= 10x: "
              f"{ {True: 'met', False: '**missed**', None: 'not measured'}[sm['mask_met']] })"),
              (f"- learned after / before = {sm['learned_after_over_before']} (CPU time "
              f"{sm['learned_cpu_after_over_before']}); audio-only after / before = "
              f"{sm['audio-only_after_over_before']} (CPU time "
              f"{sm['audio-only_cpu_after_over_before']}); decisions and scores unchanged: "
              f"{sm['same_decisions_and_scores']} (scores within 1e-5)"),
              (f"- appearance_batch {s['appearance_batch']} (after) vs 1: wall with 1 / wall with "
               f"{s['appearance_batch']} = {sm.get('appearance_batch_gain')}; appearance backbone "
               f"calls {r['runs'].get(after_name, {}).get('appearance_calls')} vs "
               f"{r['runs'].get(after_name + ', appearance_batch=1', {}).get('appearance_calls')}"),
              (f"- planned read-ahead: wall with plan_ahead=False / wall (after) = "
               f"{sm.get('plan_ahead_gain')}")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--heavy-repeats", type=int, default=2)
    ap.add_argument("--mask-repeats", type=int, default=1, help="0: no compute-then-mask run")
    ap.add_argument("--heavy-first", action="store_true", help="dense (and mask) runs first")
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--appearance-threads", type=int, default=1)
    ap.add_argument("--appearance-batch", type=int, default=None,
                    help="appearance frames per call in the 'after' runs (default: the runtime's)")
    ap.add_argument("--variant", default="paper")
    ap.add_argument("--out", default=str(RESULTS_DIR))
    ap.add_argument("--name", default="overlap_cpu_paper_onnx")
    ap.add_argument("--from-partial", action="store_true",
                    help="write the report from <name>.partial.json of a run cut short")
    a = ap.parse_args(argv)
    if a.from_partial:
        from_partial(OverlapSettings(variant=a.variant, steps=a.steps, out=a.out, name=a.name))
        return 0
    run(OverlapSettings(variant=a.variant, steps=a.steps, repeats=a.repeats,
                        heavy_repeats=a.heavy_repeats, mask_repeats=a.mask_repeats,
                        heavy_first=a.heavy_first,
                        appearance_threads=a.appearance_threads,
                        appearance_batch=a.appearance_batch, out=a.out, name=a.name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
