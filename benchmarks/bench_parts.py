"""Per-part latency per backend: torch eager, ONNX Runtime (and TensorRT where it imports).

Every one of the nine parts at several batch sizes N (small parts 1, 8, 32; backbones
1, 4 on the paper variant, 1, 8, 32 on tiny), through the same engine contract the
runtime uses (``engine({name: tensor})``), with random inputs of the part's shapes.
Each case: warm-up calls, then timed calls until ``repeats`` (or at least
``min_repeats`` once ``max_seconds`` is spent); median and IQR per call, per sample,
and the GMAC/s achieved. On CUDA every call is followed by a synchronize (the figure
is the latency of one launch, not pipelined throughput).

    python -m benchmarks.bench_parts --variant paper --out benchmarks/results
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks.common import (
    MEDIA_DIR,
    RESULTS_DIR,
    engine_options,
    ensure_model,
    fmt_ms,
    header_lines,
    provenance,
    set_threads,
    summarize,
    write_report,
)

BACKBONES = ("audio_backbone", "appearance_backbone", "motion_backbone")


@dataclass(frozen=True)
class PartsSettings:
    variant: str = "paper"
    backends: tuple[str, ...] = ("torch", "onnx", "trt")
    device: str = "cpu"
    small_batches: tuple[int, ...] = (1, 8, 32)
    backbone_batches: tuple[int, ...] | None = None  # None: paper (1, 4), tiny (1, 8, 32)
    repeats: int = 10
    min_repeats: int = 3
    max_seconds: float = 8.0  # per (backend, part, N) after warm-up
    warmup: int = 2
    checkpoint: str | None = None
    engines_dir: str | None = None
    work_dir: str | None = None
    out: str = str(RESULTS_DIR)
    name: str | None = None
    smoke: bool = False
    threads: int | None = None  # intra-op threads (ORT sessions, torch); None: all cores

    @property
    def stem(self) -> str:
        if self.name:
            return self.name
        thr = f"_t{self.threads}" if self.threads else ""
        dev = self.device.split(":")[0]
        return f"{'smoke_' if self.smoke else ''}parts_{dev}_{self.variant}{thr}"

    def batches(self, part: str) -> tuple[int, ...]:
        if part in BACKBONES:
            if self.backbone_batches is not None:
                return self.backbone_batches
            return (1, 4) if self.variant == "paper" else (1, 8, 32)
        return self.small_batches


def smoke_settings(**overrides: Any) -> PartsSettings:
    base = PartsSettings(variant="tiny", small_batches=(1, 8), backbone_batches=(1, 4),
                         repeats=3, min_repeats=2, max_seconds=1.0, warmup=1, smoke=True)
    return replace(base, **overrides)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def time_engine(engine: Any, inputs: dict[str, Any], s: PartsSettings) -> list[float]:
    """Milliseconds of each timed call of ``engine(inputs)``."""
    for _ in range(s.warmup):
        engine(inputs)
    _sync(s.device)
    times: list[float] = []
    spent = 0.0
    while len(times) < s.repeats and (len(times) < s.min_repeats or spent < s.max_seconds):
        t = time.perf_counter()
        engine(inputs)
        _sync(s.device)
        dt = time.perf_counter() - t
        spent += dt
        times.append(1e3 * dt)
    return times


def _open(backend: str, ck: Path, eng: Path | None, device: str, threads: int | None) -> Any:
    from hms_deploy.runtime.engines import open_engine_set

    set_threads(threads)
    if backend == "torch":
        return open_engine_set("torch", checkpoint=ck, device=device)
    return open_engine_set(backend, engines_dir=eng, device=device,
                           **engine_options(backend, device, threads))


def run(s: PartsSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    import torch

    from hms_deploy.costs import example_inputs
    from hms_deploy.errors import HMSError
    from hms_deploy.parts import PART_NAMES

    t_start = time.perf_counter()
    prov = provenance(s.device)
    ck, eng = ensure_model(
        s.variant, root=Path(s.work_dir) / "models" / s.variant if s.work_dir else None,
        checkpoint=s.checkpoint, engines_dir=s.engines_dir,
        need_export=any(b != "torch" for b in s.backends), log=log,
    )
    results: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    costs: dict[str, float] = {}
    for backend in s.backends:
        try:
            es = _open(backend, ck, eng, s.device, s.threads)
            es.__enter__()
        except (HMSError, ImportError, OSError) as e:
            skipped[backend] = " ".join(str(e).split())[:300]
            log(f"{backend}: skipped ({skipped[backend]})")
            continue
        try:
            costs = dict(es.costs)
            per_part: dict[str, Any] = {}
            with torch.inference_mode():
                for part in PART_NAMES:
                    per_part[part] = {}
                    for n in s.batches(part):
                        inputs = {k: v.to(es.device) for k, v in
                                  example_inputs(es.config, n)[part].items()}
                        ms = summarize(time_engine(es.engines[part], inputs, s), 4)
                        med = ms["median"]
                        per_part[part][str(n)] = {
                            "ms": ms,
                            "ms_per_sample": round(med / n, 4),
                            "gmac_per_s": round(costs[part] * n / (med / 1e3), 3) if med else None,
                        }
                        log(f"{backend:>5} {part:<20} N={n:<3} {fmt_ms(med):>9} "
                            f"(IQR {fmt_ms(ms['iqr'])}, n={ms['n']})")
            results[backend] = per_part
        finally:
            es.__exit__(None, None, None)
    out = {
        "benchmark": "parts",
        "schema": 1,
        **prov,
        "variant": s.variant,
        "part_gmac": costs,
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(s).items()},
        "model": {"checkpoint": str(ck), "engines": str(eng) if eng else None},
        "results": results,
        "skipped": skipped,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    outdir = Path(s.out)
    write_report(outdir / f"{s.stem}.json", out, markdown)
    log(f"wrote {outdir / s.stem}.json/.md ({out['seconds']:.0f} s)")
    return out


def markdown(out: dict[str, Any]) -> str:
    backends = list(out["results"])
    lines = [
        f"# Per-part latency: {out['variant']} variant",
        "",
        *header_lines(out),
        f"- intra-op threads: {out['settings'].get('threads') or 'default (all usable cores)'}",
        "- median per call (IQR); per-sample = median / N; GMAC per sample from the cost model",
        "",
        "| part | GMAC | N | " + " | ".join(f"{b} (per call)" for b in backends)
        + " | " + " | ".join(f"{b} per sample" for b in backends) + " |",
        "| --- | ---: | ---: | " + " | ".join("---:" for _ in backends * 2) + " |",
    ]
    first = out["results"][backends[0]] if backends else {}
    for part, by_n in first.items():
        for n in by_n:
            cells, per = [], []
            for b in backends:
                r = out["results"][b].get(part, {}).get(n)
                cells.append(
                    f"{fmt_ms(r['ms']['median'])} ({fmt_ms(r['ms']['iqr'])})" if r else "-")
                per.append(fmt_ms(r["ms_per_sample"]) if r else "-")
            lines.append(f"| {part} | {out['part_gmac'].get(part, 0):.3g} | {n} | "
                         + " | ".join(cells) + " | " + " | ".join(per) + " |")
    for b, why in out["skipped"].items():
        lines.append(f"\n{b}: skipped ({why})")
    lines.append("")
    return "\n".join(lines)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--variant", choices=("paper", "tiny"), default=None,
                    help="default paper (tiny with --smoke)")
    ap.add_argument("--backends", default="torch,onnx,trt",
                    help="comma-separated; trt is skipped where TensorRT does not import")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="time budget per case after min repeats")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--engines", dest="engines_dir", default=None)
    ap.add_argument("--work-dir", default=None, help=f"cache (default {MEDIA_DIR})")
    ap.add_argument("--out", default=None, help=f"results dir (default {RESULTS_DIR})")
    ap.add_argument("--name", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny, few batches and repeats")
    ap.add_argument("--threads", type=int, default=None,
                    help="intra-op threads per ORT session and for torch (default: all cores)")


def settings_from_args(args: argparse.Namespace) -> PartsSettings:
    backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    given: dict[str, Any] = {"backends": backends}
    for k in ("variant", "device", "repeats", "max_seconds", "checkpoint", "engines_dir",
              "work_dir", "out", "name", "threads"):
        v = getattr(args, k)
        if v is not None:
            given[k] = v
    if args.smoke:
        given.setdefault("out", str(MEDIA_DIR / "smoke"))
        return smoke_settings(**given)
    return PartsSettings(**given)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_parts",
                                 description=__doc__.splitlines()[0])
    add_arguments(ap)
    run(settings_from_args(ap.parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
