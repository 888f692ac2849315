"""What :mod:`benchmarks.bench_e2e` concludes and writes: the summary against the targets
(paired ratios of neighbours in time), the Markdown report and the plot.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from benchmarks.common import (
    SMOKE_NOTE,
    fmt_gmac,
    fmt_ms,
    header_lines,
    verdict,
    write_report,
)
from benchmarks.e2e_runs import FIXED_RUN, E2ESettings
from hms_deploy.runtime.timing import TIMING_KEYS

TARGETS = {"wall_over_gmac_max": 1.15, "overhead_max": 0.03, "speedup_over_mask_min": 10.0}


def paired_ratio(num: dict[str, Any], den: dict[str, Any]) -> float | None:
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


def summary(results: dict[str, dict[str, Any]], s: E2ESettings, decisions_match: bool
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
    paired = paired_ratio(hms, results[better])
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
        *([f"- {SMOKE_NOTE}"] if out["settings"].get("smoke") else []),
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
    smoke = bool(out.get("settings", {}).get("smoke"))
    ok = lambda b: verdict(b, smoke)
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
    fx = out.get("fixed")
    if fx is not None:
        tm = fx["timing_ms"]
        lines += [
            "", f"## Per-video fixed cost (`{FIXED_RUN}`)", "",
            ("The work per video that does not scale with the steps run: probe, file opens, "
             "audio decode up to the one step's patch and its log-mel, set-up, record (plus "
             "one audio step)."), "",
            "| wall (median) | IQR | CPU time | decode | audio | other | share of the HMS run |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            (f"| {fmt_ms(fx['wall_ms']['median'])} | {fmt_ms(fx['wall_ms']['iqr'])} "
             f"(n={fx['wall_ms']['n']}) | {fmt_ms(fx['cpu_ms']['median'])} | "
             f"{fmt_ms(tm['decode']['median'])} | {fmt_ms(tm['audio']['median'])} | "
             f"{fmt_ms(tm['other']['median'])} | "
             f"{100 * fx['wall_ms']['median'] / su['hms_wall_ms']:.1f} % |"),
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

    path = Path(path)
    out = json.loads(path.read_text())
    fields = set(E2ESettings.__dataclass_fields__)
    settings = E2ESettings(**{k: (tuple(v) if isinstance(v, list) else v)
                              for k, v in out["settings"].items() if k in fields})
    out["summary"] = summary(out["runs"], settings, out["summary"]["mask_decisions_equal_hms"])
    write_report(path, out, markdown)
    plot(out, path.with_suffix(".png"))
    return out
