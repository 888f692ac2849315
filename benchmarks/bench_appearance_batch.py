"""Appearance backbone per frame at batch 1 vs several frames per call (the default of
``RunSettings.appearance_batch``, runtime/appearance_ahead.py), side by side in one run.

Only the appearance part of the variant is built and exported (untrained weights: latency
depends on the graph only), cached under benchmarks/media/. ONNX Runtime on the CPU with
the runtime's own engine class, random uint8 frames of the part's shape. Every round
times every (threads, batch) case on the same number of frames, in a rotating order;
medians of the per-frame time over the rounds, after one warm-up round.

    python -m benchmarks.bench_appearance_batch [--variant paper] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    MEDIA_DIR,
    NUM_CLASSES,
    RESULTS_DIR,
    fmt_ms,
    header_lines,
    provenance,
    summarize,
    write_report,
)

PART = "appearance_backbone"


def export_appearance(variant: str) -> tuple[Any, Path]:
    """(spec, onnx path) of the variant's appearance backbone, exported once."""
    import torch

    from hms_deploy.config import make_config
    from hms_deploy.export.modules import ExportPart
    from hms_deploy.export.onnx import export_part
    from hms_deploy.model.hms import HMS
    from hms_deploy.parts import part_specs

    cfg = make_config(variant, NUM_CLASSES[variant])
    spec = part_specs(cfg)[PART]
    out = MEDIA_DIR / "models" / f"{variant}-{PART}"
    path = out / f"{PART}.onnx"
    if not path.exists():
        out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        module = HMS(cfg).part(PART).eval()
        export_part(ExportPart(PART, spec, module, 0.0), out)
    return spec, path


def run(variant: str, batches: list[int], threads: list[int], frames: int, rounds: int,
        out: Path, log: Any = print) -> dict[str, Any]:
    import torch

    from hms_deploy.parts import random_inputs
    from hms_deploy.runtime.backends.onnx import OnnxEngine

    prov = provenance("cpu")
    spec, path = export_appearance(variant)
    cpu = torch.device("cpu")
    engines = {n: OnnxEngine(spec, path, cpu, threads=n) for n in threads}
    cases = [(n, b) for n in threads for b in batches]
    x = random_inputs(spec, max(batches), seed=0)["frame"]
    per_frame: dict[tuple[int, int], list[float]] = {c: [] for c in cases}
    load: list[float] = []
    try:
        for e in engines.values():
            e.__enter__()
        for r in range(rounds + 1):  # round 0 warms up
            k = r % len(cases)
            for n, b in cases[k:] + cases[:k]:
                calls = max(1, frames // b)
                t = time.perf_counter()
                for _ in range(calls):
                    engines[n]({"frame": x[:b]})
                ms = 1e3 * (time.perf_counter() - t) / (calls * b)
                if r:
                    per_frame[(n, b)].append(ms)
            load.append(round(os.getloadavg()[0], 2))
            log(f"round {r}: " + ", ".join(
                f"t{n} b{b} {per_frame[(n, b)][-1]:.1f} ms" for n, b in cases if r))
    finally:
        for e in engines.values():
            e.__exit__(None, None, None)
    res = {f"threads={n} batch={b}": {"threads": n, "batch": b,
                                      "ms_per_frame": summarize(per_frame[(n, b)])}
           for n, b in cases}
    ratios = {f"threads={n}": {f"batch={b}": round(
        res[f"threads={n} batch={b}"]["ms_per_frame"]["median"]
        / res[f"threads={n} batch=1"]["ms_per_frame"]["median"], 3) for b in batches}
        for n in threads}
    data = {"benchmark": "appearance_batch", "schema": 1, **prov, "variant": variant,
            "engine": "onnx", "part": PART, "frames_per_case": frames, "rounds": rounds,
            "loadavg_1m": load, "cases": res, "per_frame_over_batch_1": ratios}
    name = f"appearance_batch_cpu_{variant}_onnx"
    write_report(out / f"{name}.json", data, markdown)
    log(f"wrote {out / name}.json/.md")
    return data


def markdown(r: dict[str, Any]) -> str:
    lines = [f"# Appearance backbone per frame vs frames per call: {r['variant']}, onnx, CPU", "",
             *header_lines(r), f"- load average (1 min) after each round: {r['loadavg_1m']}",
             f"- {r['frames_per_case']} frames per case per round, {r['rounds']} rounds", "",
             "| threads | batch | ms / frame (median) | IQR | vs batch 1 |",
             "| ---: | ---: | ---: | ---: | ---: |"]
    for c in r["cases"].values():
        m = c["ms_per_frame"]
        ratio = r["per_frame_over_batch_1"][f"threads={c['threads']}"][f"batch={c['batch']}"]
        lines.append(f"| {c['threads']} | {c['batch']} | {fmt_ms(m['median'])} | "
                     f"{fmt_ms(m['iqr'])} | {ratio:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="paper", choices=sorted(NUM_CLASSES))
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--threads", default="1,2", help="ORT intra-op threads, comma-separated")
    ap.add_argument("--frames", type=int, default=16, help="frames per case per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=str(RESULTS_DIR))
    a = ap.parse_args(argv)
    run(a.variant, [int(b) for b in a.batches.split(",")], [int(n) for n in a.threads.split(",")],
        a.frames, a.rounds, Path(a.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
