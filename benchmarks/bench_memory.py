"""Peak memory of a long ``hms-run --output`` job: does it level off?

Runs ``hms-run`` (a fresh process each time) over the first 50 and then all 300 of a
set of short synthetic videos, at ``--batch-size`` 1 and 16, and records the process's
peak RSS (``ru_maxrss`` from ``wait4``) plus its RSS after every batch of records
(``/proc/PID/status`` VmRSS/VmHWM, sampled as the output file grows). The target
(issue "Batch runs you can trust at scale"): the 300-video peak within 10 % of the
50-video peak, at both batch sizes.

    python -m benchmarks.bench_memory                       # tiny model, 300 videos
    python -m benchmarks.bench_memory --counts 50 300 --batch-sizes 1 16 --policy rates:0.5,0.3

Finding (measured with this script and ``mallinfo2``): the growth was cyclic garbage,
not ONNX Runtime's arena (turning the arena and memory patterns off changed nothing).
``_BatchRun`` and its ``EngineStepOps`` referenced each other, so every finished batch
(its state tensors, audio patches, decoded inputs: megabytes at batch size 16) waited
for a full garbage collection, which a process holding torch's ~200k objects rarely
runs. ``_BatchRun.close`` now breaks the cycle.

The videos (1-2 s, 96x64, 15 fps, with audio; varied lengths) are made once and cached
in ``--media`` (default ``/tmp/hms-bench-memory``); the tiny model is the benchmarks'
cached untrained export (``benchmarks/media/models/tiny``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    RESULTS_DIR,
    ensure_model,
    loadavg,
    proc_status_kb,
    provenance,
    write_json,
)

SAMPLE_EVERY_S = 0.2


def make_videos(folder: Path, n: int) -> list[Path]:
    """``n`` short synthetic videos (cached: existing files are reused)."""
    from hms_deploy.data.synthetic import DEFAULT_CLASSES, render_class_video

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = folder / f"v{i:04d}.mp4"
        if not p.exists():
            tmp = folder / f".v{i:04d}.tmp.mp4"
            label = DEFAULT_CLASSES[i % len(DEFAULT_CLASSES)]
            render_class_video(tmp, label, seed=11, index=i, duration_s=1.0 + (i % 11) / 10,
                               size=(96, 64))
            tmp.replace(p)
        out.append(p)
    return out


def measure(videos: list[Path], engines: Path, batch_size: int, policy: str, work: Path,
            threads: int) -> dict[str, Any]:
    """One ``hms-run`` process over ``videos``: peak RSS and the RSS curve (MB)."""
    lst = work / f"list-{len(videos)}.txt"
    lst.write_text("".join(f"{v}\n" for v in videos))
    out = work / f"out-{len(videos)}-b{batch_size}.jsonl"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "hms_deploy.cli.run", f"@{lst}", "--engines", str(engines),
           "--batch-size", str(batch_size), "--policy", policy, "--output", str(out),
           "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    curve: list[tuple[int, float, float]] = []  # (records, rss MB, hwm MB)
    last = -1
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        n = out.read_bytes().count(b"\n") if out.exists() else 0
        if n != last:
            st = proc_status_kb(proc.pid, "VmRSS", "VmHWM")
            if st:
                curve.append((n, st.get("VmRSS", 0) / 1024, st.get("VmHWM", 0) / 1024))
            last = n
        time.sleep(SAMPLE_EVERY_S)
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"hms-run exited {proc.returncode}: {err.strip()[-500:]}")
    peak_kb = usage.ru_maxrss
    return {
        "videos": len(videos), "batch_size": batch_size, "policy": policy,
        "peak_rss_mb": round(peak_kb / 1024, 1), "wall_s": round(time.perf_counter() - t0, 1),
        "curve": [(n, round(r, 1), round(h, 1)) for n, r, h in curve],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--counts", type=int, nargs="+", default=[50, 300])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--policy", default="rates:0.5,0.3",
                    help="default: random appearance/motion decisions, so that lockstep "
                         "sub-batches take many shapes (the untrained tiny model's learned "
                         "gates run appearance on every step)")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of hms-run")
    ap.add_argument("--media", type=Path, default=Path("/tmp/hms-bench-memory"))
    ap.add_argument("--name", default="memory_cpu_tiny")
    ap.add_argument("--tolerance", type=float, default=0.10)
    args = ap.parse_args(argv)

    prov = provenance("cpu")
    _, engines = ensure_model("tiny")
    assert engines is not None
    videos = make_videos(args.media / "videos", max(args.counts))
    runs = []
    for b in args.batch_sizes:
        for n in args.counts:
            r = measure(videos[:n], engines, b, args.policy, args.media, args.threads)
            print(f"batch {b:3d}, {n:4d} videos: peak RSS {r['peak_rss_mb']:.0f} MB "
                  f"({r['wall_s']:.0f} s)", flush=True)
            runs.append(r)
    verdicts = []
    lo, hi = min(args.counts), max(args.counts)
    for b in args.batch_sizes:
        peak = {r["videos"]: r["peak_rss_mb"] for r in runs if r["batch_size"] == b}
        ratio = peak[hi] / peak[lo]
        ok = ratio <= 1 + args.tolerance
        verdicts.append({"batch_size": b, "ratio": round(ratio, 3), "within_target": ok})
        print(f"batch {b:3d}: peak({hi}) / peak({lo}) = {ratio:.3f} "
              f"({'within' if ok else 'OVER'} the {args.tolerance:.0%} target)")
    prov["loadavg_at_end"] = loadavg()
    path = write_json(RESULTS_DIR / f"{args.name}.json",
                      {"provenance": prov, "settings": vars(args) | {"media": str(args.media)},
                       "runs": runs, "verdicts": verdicts})
    print(f"wrote {path}")
    return 0 if all(v["within_target"] for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
