"""``hms-demo`` over demo seeds and torch thread counts: the table of whether the demo holds.

Runs ``hms-demo OUT --seed S --threads N --quiet`` (a fresh OUT each time) for every seed
and thread count asked, one after another, and records per run: ``demo: K/M`` (one new
sample per class), the test split's ``K/N``, the motion usage per class group (share of
the steps of the samples and test videos that ran motion), whether the run meets the
target (every sample right, and motion-class motion usage at least twice each other
group's and above 0), its wall time and the CPU time of the demo process, with the load
average before and after it. The JSON and Markdown are rewritten after every run, so an
interrupted sweep keeps what finished; ``--resume`` skips the (seed, threads) pairs
already in the JSON.

    python -m benchmarks.demo_seeds --seeds 0-4 --threads 1,2 [--deterministic]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR, header_lines, loadavg, provenance, write_report

LINES = {
    "demo": re.compile(r"^demo: (\d+)/(\d+) correct$", re.MULTILINE),
    "usage": re.compile(r"^motion used: motion classes ([\d.]+) %, audio classes ([\d.]+) %, "
                        r"appearance classes ([\d.]+) %$", re.MULTILINE),
    "test": re.compile(r"^\s*test videos: (\d+)/(\d+) correct$", re.MULTILINE),
}


def meets_target(run: dict[str, Any]) -> bool:
    u = run["motion_used_pct"]
    return (run["correct"] == run["samples"] and u["motion"] > 0
            and u["motion"] >= 2 * u["audio"] and u["motion"] >= 2 * u["appearance"])


def one_run(seed: int, threads: int, work: Path, deterministic: bool) -> dict[str, Any]:
    out = work / f"demo_s{seed}_t{threads}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(Path(sys.executable).parent / "hms-demo"), str(out), "--seed", str(seed),
           "--threads", str(threads), "--quiet", *(["--deterministic"] if deterministic else [])]
    load0 = os.getloadavg()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    run: dict[str, Any] = {
        "seed": seed, "threads": threads, "deterministic": deterministic,
        "exit_code": proc.returncode, "wall_s": round(wall, 1),
        "cpu_s": round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 1),
        "loadavg_before": [round(x, 2) for x in load0],
        "loadavg_after": loadavg(),
    }
    demo, usage, test = (LINES[k].search(proc.stdout) for k in ("demo", "usage", "test"))
    if proc.returncode != 0 or not (demo and usage and test):
        run["error"] = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return run
    run.update(correct=int(demo[1]), samples=int(demo[2]), test_correct=int(test[1]),
               test_videos=int(test[2]),
               motion_used_pct={"motion": float(usage[1]), "audio": float(usage[2]),
                                "appearance": float(usage[3])},
               sample_lines=[ln.strip() for ln in proc.stdout.splitlines() if " -> " in ln])
    run["meets_target"] = meets_target(run)
    return run


def markdown(result: dict[str, Any]) -> str:
    lines = ["# hms-demo over seeds and thread counts", "", *header_lines(result["provenance"]),
             f"- target: {result['target']}", "",
             ("| seed | threads | demo | test split | motion used: motion / audio / appearance "
             "classes (%) | target | wall s | CPU s | load avg before -> after |"),
             "| ---: | ---: | ---: | ---: | --- | --- | ---: | ---: | --- |"]
    for r in result["runs"]:
        if "error" in r:
            lines.append(f"| {r['seed']} | {r['threads']} | error: {r['error']} | | | | "
                         f"{r['wall_s']} | {r['cpu_s']} | |")
            continue
        u = r["motion_used_pct"]
        lines.append(
            f"| {r['seed']} | {r['threads']} | {r['correct']}/{r['samples']} | "
            f"{r['test_correct']}/{r['test_videos']} | {u['motion']:.1f} / {u['audio']:.1f} / "
            f"{u['appearance']:.1f} | {'met' if r['meets_target'] else '**missed**'} | "
            f"{r['wall_s']} | {r['cpu_s']} | {r['loadavg_before'][0]} -> "
            f"{r['loadavg_after'][0]} |")
    done = [r for r in result["runs"] if "error" not in r]
    met = sum(r["meets_target"] for r in done)
    lines += ["", (f"{met} of {len(result['runs'])} runs meet the target "
              f"({len(result['runs'])} of {result['planned']} planned runs done).")]
    return "\n".join(lines) + "\n"


def parse_seeds(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b or a) + 1))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0-4")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--deterministic", action="store_true",
                    help="hms-demo --deterministic (torch.use_deterministic_algorithms)")
    ap.add_argument("--name", default="demo_seeds")
    ap.add_argument("--out", default=str(RESULTS_DIR))
    ap.add_argument("--work-dir", default=None, help="where the demo outputs go (default: a temp dir)")
    ap.add_argument("--resume", action="store_true")
    a = ap.parse_args(argv)
    pairs = [(s, int(t)) for s in parse_seeds(a.seeds) for t in a.threads.split(",")]
    path = Path(a.out) / f"{a.name}.json"
    result: dict[str, Any] = {
        "provenance": provenance("cpu"), "planned": len(pairs),
        "target": "demo K = M (every sample right) and motion-class motion usage > 0 and >= 2x "
                  "each other group's (samples + test split)",
        "runs": []}
    if a.resume and path.is_file():
        result["runs"] = json.loads(path.read_text())["runs"]
    done = {(r["seed"], r["threads"]) for r in result["runs"]}
    work = Path(a.work_dir) if a.work_dir else Path(tempfile.mkdtemp(prefix="demo_seeds_"))
    for seed, threads in pairs:
        if (seed, threads) in done:
            continue
        run = one_run(seed, threads, work, a.deterministic)
        result["runs"].append(run)
        write_report(path, result, markdown)
        print(json.dumps({k: v for k, v in run.items() if k != "sample_lines"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
