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
The per-video fixed cost (work that does not scale with the steps run) is its own row:
the Session at ``audio-only`` and T = 1 (:func:`~benchmarks.e2e_runs.measure_fixed`).

Writes ``<out>/<name>.json``, ``.md`` and ``.png`` (wall time vs GMAC per run, log axes).
The runs and their measurement loop are :mod:`benchmarks.e2e_runs`; the summary and
the reports :mod:`benchmarks.e2e_report`; this module runs them and is the CLI.

    python -m benchmarks.bench_e2e --variant paper --engine onnx --steps 128
    python -m benchmarks.bench_e2e --smoke --out /tmp/bench      # what CI runs (seconds)
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.common import (
    MEDIA_DIR,
    RESULTS_DIR,
    bench_video,
    ensure_model,
    loadavg,
    open_session,
    ort_spinning,
    provenance,
    write_report,
)
from benchmarks.e2e_report import markdown, plot, rebuild_report, summary
from benchmarks.e2e_runs import (
    E2ESettings,
    call_checks,
    decisions_key,
    measure,
    measure_fixed,
    run_specs,
    smoke_settings,
    throughput,
)

__all__ = ["E2ESettings", "main", "rebuild_report", "run", "smoke_settings"]


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
    video = bench_video(s.video, s.work_dir, smoke=s.smoke, log=log)
    specs = run_specs(s)
    session = open_session(s.engine, ck, eng, s.device, s.threads)
    with ort_spinning(s.ort_spinning):
        session.open()  # the engines (ORT sessions) are created here
    with session:
        es = session.engine_set
        runs = measure(session, specs, str(video), s, t_start, log)
        results = {name: r.result() for name, r in runs.items()}
        fixed = measure_fixed(session, str(video), s, t_start, log)
        tput = throughput(session, s, str(video), log)
        calls_check = call_checks(results, s)
        hms_rec, mask_rec = runs[s.hms_policy].record, runs[f"mask ({s.hms_policy})"].record
        decisions_match = decisions_key(hms_rec) == decisions_key(mask_rec)
        costs = dict(es.costs)
    summ = summary(results, s, decisions_match)
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
        "fixed": fixed,
        "throughput": tput,
        "checks": calls_check,
        "summary": summ,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    out["machine"]["loadavg_at_end"] = loadavg()
    outdir = Path(s.out)
    write_report(outdir / f"{s.stem}.json", out, markdown)
    if s.plot:
        plot(out, outdir / f"{s.stem}.png")
    log(f"wrote {outdir / s.stem}.json/.md{'/.png' if s.plot else ''} "
        f"({out['seconds']:.0f} s)")
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
