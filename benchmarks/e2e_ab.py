"""Two versions of the library side by side in one run: :mod:`benchmarks.bench_e2e`
(this tree's benchmark code) against a baseline install and against this tree, in
alternating rounds (the order flips every round, so drift in machine load falls on both).

The baseline is a regular install of another checkout (``pip install --no-deps --target
DIR <checkout>``: ``hms_deploy`` with ``runtime/`` and ``export/`` inside), put first on
``PYTHONPATH`` of its rounds. Reports, per run and for the per-video fixed cost, the
median wall and CPU time of each version and the ratio this tree / baseline (the median
of the rounds' ratios), and each version's summary figures.

    python -m benchmarks.e2e_ab --base-site /tmp/base_site --rounds 2 -- \\
        --variant paper --engine onnx --steps 32 --repeats 3 --heavy-repeats 1

``--sessions-only ENGINES VIDEO``: only the Session runs and the per-video fixed cost
(:mod:`benchmarks.ab_sessions`; no dense baselines, for a machine too loaded to run
them), which also checks that both versions give the same records.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, RESULTS_DIR, fmt_commit, fmt_ms, loadavg, write_report

SUMMARY_KEYS = ("wall_ratio_hms_over_dense", "wall_ratio_over_gmac_ratio",
                "cpu_ratio_over_gmac_ratio", "speedup_over_mask", "overhead_fraction")


def _bench(pythonpath: str, args: list[str], out: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": pythonpath}
    cmd = [sys.executable, "-m", "benchmarks.bench_e2e", *args, "--out", str(out),
           "--name", "ab", "--no-plot"]
    with tempfile.TemporaryDirectory() as cwd:  # nothing in the working directory shadows
        subprocess.run(cmd, env=env, cwd=cwd, check=True)
    return json.loads((out / "ab.json").read_text())


def _rows(res: dict[str, Any]) -> dict[str, dict[str, Any]]:
    rows = dict(res["runs"])
    if "fixed" in res:
        rows["per-video fixed"] = res["fixed"]
    return rows


def _sessions(pythonpath: str, args: list[str]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": pythonpath}
    with tempfile.TemporaryDirectory() as cwd:
        p = subprocess.run([sys.executable, "-m", "benchmarks.ab_sessions", *args], env=env,
                           cwd=cwd, check=True, capture_output=True, text=True)
    res = json.loads(p.stdout)
    return {"runs": {name: {"wall_ms": {"median": r["wall_median_ms"], "values": r["wall_ms"]},
                            "cpu_ms": {"median": r["cpu_median_ms"], "values": r["cpu_ms"]},
                            "record": r["record"]} for name, r in res.items()}}


def compare_table(compare: dict[str, Any]) -> list[str]:
    """The Markdown table of :func:`compare`: wall and CPU medians, this/base per round."""
    lines = [("| run | wall base | wall this | this / base (rounds) | CPU base | CPU this "
              "| this / base (rounds) |"),
             "| --- | ---: | ---: | --- | ---: | ---: | --- |"]
    for name, e in compare.items():
        w, c = e["wall_ms"], e["cpu_ms"]
        lines.append(f"| {name} | {fmt_ms(w['base'])} | {fmt_ms(w['this'])} | {w['ratio']} "
                     f"({', '.join(map(str, w['ratios']))}) | {fmt_ms(c['base'])} | "
                     f"{fmt_ms(c['this'])} | {c['ratio']} ({', '.join(map(str, c['ratios']))}) |")
    return lines


def sessions_markdown(res: dict[str, Any]) -> str:
    lines = [
        f"# Side by side, Session runs only: this tree vs {res['base_label']}", "",
        (f"- date: {res['date']}; this tree: git {fmt_commit(res['this_git'])}; machine: CPU "
         f"{res['machine']['cpu_model']} ({res['machine']['usable_cores']} cores usable)"),
        "- versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items()),
        f"- load average at start / end: {res['loadavg_start']} / {res['loadavg_end']}",
        (f"- {len(res['rounds'])} rounds (the order of the two versions flipped every round); "
         f"arguments: `{' '.join(res['bench_args'])}`"),
        f"- records equal (timings and read-ahead counters aside): {res['records_equal']}"
        + (f" ({res['records_note']})" if res.get("records_note") else ""), "",
    ]
    lines += compare_table(res["compare"])
    return "\n".join(lines) + "\n"


def records_equal(rounds: list[dict[str, dict[str, Any]]]) -> tuple[bool, str]:
    """Whether every run's record is the same in both versions, on the fields both write
    (a field one version adds is named in the note, not counted as a difference)."""
    equal = True
    only: tuple[set[str], set[str]] = (set(), set())
    for r in rounds:
        for n, run in r["base"]["runs"].items():
            b, t = run["record"], r["this"]["runs"][n]["record"]
            only[0].update(set(b) - set(t))
            only[1].update(set(t) - set(b))
            equal = equal and all(b[k] == t[k] for k in set(b) & set(t))
    note = "; ".join(f"fields only {who} writes: {', '.join(sorted(keys))}"
                     for who, keys in (("the baseline", only[0]), ("this tree", only[1])) if keys)
    return equal, note


def compare(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Per run: each version's median over rounds, and the median of this/base ratios."""
    names = list(_rows(rounds[0]["base"]))
    out: dict[str, Any] = {}
    for name in names:
        entry: dict[str, Any] = {}
        for key in ("wall_ms", "cpu_ms"):
            base = [_rows(r["base"])[name][key]["median"] for r in rounds]
            this = [_rows(r["this"])[name][key]["median"] for r in rounds]
            ratios = [t / b for t, b in zip(this, base) if b > 0]
            entry[key] = {"base": round(statistics.median(base), 2),
                          "this": round(statistics.median(this), 2),
                          "ratio": round(statistics.median(ratios), 3) if ratios else None,
                          "ratios": [round(x, 3) for x in ratios]}
        out[name] = entry
    return out


def markdown(res: dict[str, Any]) -> str:
    first = res["rounds"][0]["this"]
    lines = [
        (f"# Side by side: this tree vs {res['base_label']} (e2e, {first['variant']}, "
        f"{first['engine']}, T = {first['T']})"), "",
        f"- device: {first['machine']['device']}; CPU: {first['machine']['cpu_model']}",
        (f"- date: {res['date']}; this tree: git {fmt_commit(res['this_git'])}; "
         f"baseline: {res['base_label']}"),
        "- versions: " + ", ".join(f"{k} {v}" for k, v in first["versions"].items()),
        f"- load average at start / end: {res['loadavg_start']} / {res['loadavg_end']}",
        (f"- {len(res['rounds'])} rounds, the order of the two versions flipped every round; "
        f"bench arguments: `{' '.join(res['bench_args'])}`"), "",
    ]
    lines += compare_table(res["compare"])
    lines += ["", "| summary figure | base (rounds) | this (rounds) |", "| --- | --- | --- |"]
    for k in SUMMARY_KEYS:
        b = [r["base"]["summary"][k] for r in res["rounds"]]
        t = [r["this"]["summary"][k] for r in res["rounds"]]
        lines.append(f"| {k} | {', '.join(map(str, b))} | {', '.join(map(str, t))} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.e2e_ab", description=__doc__.splitlines()[0])
    ap.add_argument("--base-site", required=True, help="the baseline's install dir (--target)")
    ap.add_argument("--base-label", default=None, help="what the baseline is (e.g. its commit)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS_DIR))
    ap.add_argument("--name", default="e2e_ab")
    ap.add_argument("--sessions-only", nargs=2, metavar=("ENGINES", "VIDEO"), default=None,
                    help="only the Session runs (benchmarks.ab_sessions), no dense baselines")
    ap.add_argument("bench_args", nargs="*",
                    help="arguments of benchmarks.bench_e2e, or with --sessions-only: "
                         "STEPS REPEATS POLICY... (after --)")
    args = ap.parse_args(argv)
    from benchmarks.common import git_commit, machine, now_utc, versions

    res: dict[str, Any] = {"benchmark": "e2e_ab", "date": now_utc(), "this_git": git_commit(),
                           "base_label": args.base_label or args.base_site,
                           "bench_args": args.bench_args,
                           "loadavg_start": loadavg(), "rounds": []}
    if args.sessions_only:  # bench_e2e records its own machine; the Session runs do not
        res["machine"], res["versions"] = machine("cpu"), versions()
    paths = {"base": f"{args.base_site}{os.pathsep}{REPO}", "this": str(REPO)}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.rounds):
            order = ["base", "this"] if k % 2 == 0 else ["this", "base"]
            rnd = {}
            for which in order:
                print(f"round {k + 1}: {which}", flush=True)
                rnd[which] = (
                    _sessions(paths[which], [*args.sessions_only, *args.bench_args])
                    if args.sessions_only else
                    _bench(paths[which], args.bench_args, Path(tmp) / f"{which}{k}"))
            res["rounds"].append(rnd)
    res["loadavg_end"] = loadavg()
    res["compare"] = compare(res["rounds"])
    out = Path(args.out)
    if args.sessions_only:
        res["records_equal"], res["records_note"] = records_equal(res["rounds"])
        write_report(out / f"{args.name}.json", res, sessions_markdown)
    else:
        write_report(out / f"{args.name}.json", res, markdown)
    print(f"wrote {out / args.name}.json/.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
