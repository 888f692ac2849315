"""Paired HMS / dense wall-time ratios, for machines whose load drifts (shared CPUs).

``bench_e2e`` reports medians of each configuration over repeats spread across a long
run; when other jobs come and go, two medians can come from different load levels.
This script alternates the HMS policy and dense stepping back to back, on the same
video and engines, and reports the ratio within each pair (HMS runs before and after
each dense run, averaged), so that both sides of every ratio saw the same load.

    python -m benchmarks.bench_pairs --variant paper --pairs 3
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import (
    MEDIA_DIR,
    RESULTS_DIR,
    ensure_model,
    header_lines,
    open_session,
    ort_spinning,
    provenance,
    summarize,
    write_report,
)


@dataclass(frozen=True)
class PairSettings:
    variant: str = "paper"
    engine: str = "onnx"
    device: str = "cpu"
    steps: int = 128
    pairs: int = 3
    hms_policy: str = "rates:0.6,0.03"
    dense_policy: str = "dense"
    video: str | None = None
    checkpoint: str | None = None
    engines_dir: str | None = None
    work_dir: str | None = None
    out: str = str(RESULTS_DIR)
    name: str | None = None
    ort_spinning: bool | None = None
    threads: int | None = None

    @property
    def stem(self) -> str:
        spin = {None: "", True: "_spin", False: "_nospin"}[self.ort_spinning]
        thr = f"_t{self.threads}" if self.threads else ""
        dev = self.device.split(":")[0]
        return self.name or f"pairs_{dev}_{self.variant}_{self.engine}{thr}{spin}"


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def run(s: PairSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    from benchmarks.make_reference_video import REFERENCE, reference_video

    t_start = time.perf_counter()
    prov = provenance(s.device)
    ck, eng = ensure_model(
        s.variant, root=Path(s.work_dir) / "models" / s.variant if s.work_dir else None,
        checkpoint=s.checkpoint, engines_dir=s.engines_dir, need_export=s.engine != "torch",
        log=log,
    )
    video = str(Path(s.video) if s.video else reference_video(REFERENCE))
    session = open_session(s.engine, ck, eng, s.device, s.threads)
    with ort_spinning(s.ort_spinning):
        session.open()
    runs: list[dict[str, Any]] = []
    with session:
        session.classify(video, steps=min(8, s.steps), policy=s.dense_policy)  # warm-up
        order = [s.hms_policy] + [p for _ in range(s.pairs) for p in (s.dense_policy, s.hms_policy)]
        for policy in order:
            c0, t = _cpu_s(), time.perf_counter()
            rec = session.classify(video, steps=s.steps, policy=policy)
            wall = time.perf_counter() - t
            runs.append({"policy": policy, "start_s": round(t - t_start, 2),
                         "wall_ms": round(1e3 * wall, 3), "cpu_ms": round(1e3 * (_cpu_s() - c0), 3),
                         "loadavg_1m": round(os.getloadavg()[0], 2), "gmac": rec["gflops"]["used"],
                         "gmac_dense": rec["gflops"]["dense"], "timing_ms": rec["timing_ms"]})
            log(f"{policy:<16} {wall:8.2f} s  load {runs[-1]['loadavg_1m']}")
    hms = [r for r in runs if r["policy"] == s.hms_policy]
    dense = [r for r in runs if r["policy"] == s.dense_policy]
    gmac_ratio = hms[0]["gmac"] / hms[0]["gmac_dense"]
    wall_ratios = [(a["wall_ms"] + b["wall_ms"]) / 2 / d["wall_ms"]
                   for a, d, b in zip(hms, dense, hms[1:])]
    cpu_ratios = [(a["cpu_ms"] + b["cpu_ms"]) / 2 / d["cpu_ms"]
                  for a, d, b in zip(hms, dense, hms[1:])]
    wr, cr = summarize(wall_ratios, 5), summarize(cpu_ratios, 5)
    out = {
        "benchmark": "pairs", "schema": 1, **prov,
        "variant": s.variant, "engine": s.engine, "T": s.steps, "video": video,
        "settings": asdict(s), "runs": runs,
        "summary": {
            "gmac_ratio_hms_over_dense": round(gmac_ratio, 5),
            "paired_wall_ratio": wr, "paired_cpu_ratio": cr,
            "paired_wall_ratio_over_gmac_ratio": round(wr["median"] / gmac_ratio, 3),
            "paired_cpu_ratio_over_gmac_ratio": round(cr["median"] / gmac_ratio, 3),
            "hms_timing_ms_median": {k: summarize([r["timing_ms"][k] for r in hms])["median"]
                                     for k in hms[0]["timing_ms"]},
            "dense_timing_ms_median": {k: summarize([r["timing_ms"][k] for r in dense])["median"]
                                       for k in dense[0]["timing_ms"]},
        },
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    outdir = Path(s.out)
    write_report(outdir / f"{s.stem}.json", out, markdown)
    log(f"wrote {outdir / s.stem}.json/.md")
    return out


def markdown(out: dict[str, Any]) -> str:
    su = out["summary"]
    lines = [
        f"# Paired wall-time ratio, {out['variant']} variant, {out['engine']}, T = {out['T']}",
        "", *header_lines(out),
        f"- intra-op threads: {out['settings'].get('threads') or 'default (all usable cores)'}",
        "",
        "| # | policy | start (s) | wall | CPU time | load (1 min) |",
        "| ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for i, r in enumerate(out["runs"]):
        lines.append(f"| {i} | {r['policy']} | {r['start_s']:.0f} | {r['wall_ms'] / 1e3:.2f} s | "
                     f"{r['cpu_ms'] / 1e3:.2f} s | {r['loadavg_1m']} |")
    w, c = su["paired_wall_ratio"], su["paired_cpu_ratio"]
    lines += [
        "",
        f"- GMAC ratio HMS / dense = {su['gmac_ratio_hms_over_dense']:.4f}",
        (f"- paired wall ratio = {w['median']:.4f} (min {w['min']:.4f}, max {w['max']:.4f}, "
        f"n={w['n']}) = {su['paired_wall_ratio_over_gmac_ratio']:.2f}x the GMAC ratio"),
        (f"- paired CPU-time ratio = {c['median']:.4f} = "
        f"{su['paired_cpu_ratio_over_gmac_ratio']:.2f}x the GMAC ratio"),
        f"- HMS stages (median ms): {su['hms_timing_ms_median']}",
        f"- dense stages (median ms): {su['dense_timing_ms_median']}",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_pairs",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--variant", choices=("paper", "tiny"), default="paper")
    ap.add_argument("--engine", choices=("onnx", "torch", "trt"), default="onnx")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--policy", dest="hms_policy", default="rates:0.6,0.03")
    ap.add_argument("--video", default=None)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--engines", dest="engines_dir", default=None)
    ap.add_argument("--work-dir", default=None, help=f"cache (default {MEDIA_DIR})")
    ap.add_argument("--out", default=str(RESULTS_DIR))
    ap.add_argument("--name", default=None)
    ap.add_argument("--ort-spinning", choices=("on", "off"), default=None)
    ap.add_argument("--threads", type=int, default=None,
                    help="intra-op threads per ORT session and for torch (default: all cores)")
    args = vars(ap.parse_args(argv))
    spin = args.pop("ort_spinning")
    run(PairSettings(**args, ort_spinning=None if spin is None else spin == "on"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
