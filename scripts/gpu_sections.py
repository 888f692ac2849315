"""The measuring sections of the device check (b-e), each returning one JSON-able dict.

Called by ``scripts/gpu_check.py --section NAME``; sizes come from :class:`Sizes`: the
paper variant at the issue's sizes on CUDA, the tiny variant at N <= 2 on a CPU dry run
(which only proves that every section executes in the target environment: its numbers
are CPU numbers and are labelled so).

- ``part_latency``: every part through the torch engine at batches 1/8/32 (SlowFast
  1/2/4), fp32 and bf16 (autocast): host launch time (the call returning) next to device
  time (CUDA events around the call) and whether a call is launch-bound.
- ``end_to_end``: the reference video, HMS (rates:0.6,0.03 and learned) vs dense batched
  vs dense stepped, decode time apart (the records' ``timing_ms``).
- ``lockstep``: N copies of the reference video in lockstep (N = 1/8/32), HMS vs dense:
  videos/s, GMAC per video, the speed-up and the FLOPs bound (dense / used GMAC).
- ``trace``: ``torch.profiler`` over lockstep N = 32: GPU busy fraction, kernels per step
  and every synchronising CUDA API call by name.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

HMS_POLICY = "rates:0.6,0.03"
NUM_CLASSES = {"paper": 239, "tiny": 6}
# CUDA runtime/driver calls that make the host wait for the device
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
              "cudaMemcpy", "cudaMemcpy2D", "cudaMemset", "cudaStreamWaitEvent_host",
              "cuStreamSynchronize", "cuCtxSynchronize", "cuMemcpyDtoH_v2", "cuMemcpyHtoD_v2")


@dataclass(frozen=True)
class Sizes:
    device: str
    variant: str
    batches: tuple[int, ...]
    motion_batches: tuple[int, ...]
    lockstep: tuple[int, ...]
    trace_n: int
    steps: int
    video_s: float
    video_size: tuple[int, int]
    warmup: int
    repeats: int

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


def sizes(dry_run: bool) -> Sizes:
    if dry_run:
        return Sizes("cpu", "tiny", (1, 2), (1,), (1, 2), 2, 4, 6.0, (320, 180), 1, 2)
    return Sizes("cuda", "paper", (1, 8, 32), (1, 2, 4), (1, 8, 32), 32, 32, 60.0, (640, 360), 3, 10)


def checkpoint(work: Path, s: Sizes) -> Path:
    """An untrained checkpoint of the variant (latency depends on the graph only); cached."""
    from hms_deploy.checkpoint import init_checkpoint, save_checkpoint
    from hms_deploy.config import make_config

    path = work / "models" / f"{s.variant}.pt"
    if not path.exists():
        save_checkpoint(init_checkpoint(make_config(s.variant, NUM_CLASSES[s.variant]), seed=0), path)
    return path


def reference_video(work: Path, s: Sizes) -> Path:
    """The benchmark reference video (cached; 60 s 640x360 on CUDA, 6 s 320x180 dry)."""
    from hms_deploy.data.synthetic import make_reference_video

    path = work / "media" / f"reference_{s.video_s:g}s_{s.video_size[0]}x{s.video_size[1]}.mp4"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name("partial_" + path.name)
        make_reference_video(tmp, duration_s=s.video_s, size=s.video_size)
        tmp.replace(path)
    return path


def _copies(src: Path, n: int) -> list[str]:
    """``n`` distinct paths with the same content (links; lockstep treats them as n videos)."""
    folder = src.parent / "copies"
    folder.mkdir(exist_ok=True)
    out = []
    for i in range(n):
        dst = folder / f"{src.stem}_{i}{src.suffix}"
        if not dst.exists():
            os.symlink(src, dst)
        out.append(str(dst))
    return out


def _sync(s: Sizes) -> None:
    if s.cuda:
        torch.cuda.synchronize()


def _session(work: Path, s: Sizes) -> Any:
    from hms_deploy.runtime import Session

    return Session(checkpoint=checkpoint(work, s), engine="torch", device=s.device)


# ------------------------------------------------------------------------------ b


def part_latency(work: Path, s: Sizes) -> dict[str, Any]:
    from hms_deploy.parts import random_inputs

    out: dict[str, Any] = {"variant": s.variant, "engine": "torch", "device": s.device,
                           "unit": "ms per call, median", "parts": {}}
    with _session(work, s) as session:
        engines = session.engine_set.engines
        dev = session.engine_set.device
        for name, engine in engines.items():
            batches = s.motion_batches if name == "motion_backbone" else s.batches
            rows = []
            for n in batches:
                x = {k: v.to(dev) for k, v in random_inputs(engine.spec, n, seed=1).items()}
                for precision in ("fp32", "bf16"):
                    rows.append({"batch": n, "precision": precision,
                                 **_time_calls(engine, x, n, precision, s)})
            out["parts"][name] = rows
    return out


def _time_calls(engine: Any, x: dict[str, torch.Tensor], n: int, precision: str, s: Sizes) -> dict[str, Any]:
    dtype = torch.bfloat16 if precision == "bf16" else None
    kind = "cuda" if s.cuda else "cpu"

    def call() -> None:
        with torch.autocast(kind, dtype=torch.bfloat16, enabled=dtype is not None):
            engine(x)

    for _ in range(s.warmup):
        call()
    _sync(s)
    host, device = [], []
    for _ in range(s.repeats):
        if s.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t = time.perf_counter()
        call()
        host.append((time.perf_counter() - t) * 1e3)
        if s.cuda:
            end.record()
            end.synchronize()
            device.append(start.elapsed_time(end))
    h = statistics.median(host)
    d = statistics.median(device) if device else None
    return {"host_launch_ms": round(h, 4), "device_ms": None if d is None else round(d, 4),
            "launch_bound": None if d is None else h >= 0.9 * d, "per_sample_ms": round((d or h) / n, 4)}


# ------------------------------------------------------------------------------ c


def end_to_end(work: Path, s: Sizes) -> dict[str, Any]:
    from hms_deploy.runtime import dense

    video = reference_video(work, s)
    out: dict[str, Any] = {"variant": s.variant, "engine": "torch", "device": s.device,
                           "video": video.name, "steps": s.steps, "runs": {}}
    with _session(work, s) as session:
        runs = {
            f"hms ({HMS_POLICY})": lambda: session.classify(video, policy=HMS_POLICY, steps=s.steps),
            "hms (learned)": lambda: session.classify(video, policy="learned", steps=s.steps),
            "dense (batched)": lambda: dense.classify_dense_batched(session.engine_set, video, steps=s.steps),
            "dense (stepped)": lambda: session.classify(video, policy="dense", steps=s.steps),
        }
        runs[f"hms ({HMS_POLICY})"]()  # warm-up (lazy CUDA init, cuDNN plans)
        for name, fn in runs.items():
            _sync(s)
            t = time.perf_counter()
            rec = fn()
            _sync(s)
            wall = (time.perf_counter() - t) * 1e3
            if "error" in rec:
                raise RuntimeError(f"{name}: {rec['error']}")
            timing = rec.get("timing_ms", {})
            out["runs"][name] = {"wall_ms": round(wall, 2), "decode_ms": timing.get("decode"),
                                 "timing_ms": timing, "gmac_used": rec["gflops"]["used"],
                                 "gmac_dense": rec["gflops"]["dense"]}
    return out


# ------------------------------------------------------------------------------ d


def lockstep(work: Path, s: Sizes) -> dict[str, Any]:
    video = reference_video(work, s)
    out: dict[str, Any] = {"variant": s.variant, "engine": "torch", "device": s.device,
                           "steps": s.steps, "policy": HMS_POLICY, "runs": {}}
    with _session(work, s) as session:
        list(session.classify_many(_copies(video, 1), policy=HMS_POLICY, steps=s.steps))  # warm-up
        for n in s.lockstep:
            videos = _copies(video, n)
            row: dict[str, Any] = {}
            for label, policy in (("hms", HMS_POLICY), ("dense", "dense")):
                _sync(s)
                t = time.perf_counter()
                recs = list(session.classify_many(videos, policy=policy, steps=s.steps, batch_size=n))
                _sync(s)
                wall = time.perf_counter() - t
                bad = [r["error"] for r in recs if "error" in r]
                if bad:
                    raise RuntimeError(f"N={n} {label}: {bad[0]}")
                row[label] = {"videos_per_s": round(n / wall, 4), "wall_s": round(wall, 3),
                              "gmac_per_video": round(statistics.fmean(r["gflops"]["used"] for r in recs), 3)}
            speedup = row["hms"]["videos_per_s"] / row["dense"]["videos_per_s"]
            bound = row["dense"]["gmac_per_video"] / max(row["hms"]["gmac_per_video"], 1e-9)
            row.update(speedup=round(speedup, 3), flops_bound=round(bound, 3),
                       fraction_of_bound=round(speedup / bound, 3))
            out["runs"][f"N={n}"] = row
    return out


# ------------------------------------------------------------------------------ e


def trace(work: Path, s: Sizes) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    video = reference_video(work, s)
    n = s.trace_n
    out: dict[str, Any] = {"variant": s.variant, "engine": "torch", "device": s.device, "videos": n,
                           "steps": s.steps, "policy": HMS_POLICY}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if s.cuda else [])
    with _session(work, s) as session:
        videos = _copies(video, n)
        list(session.classify_many(videos, policy=HMS_POLICY, steps=s.steps, batch_size=n))  # warm-up
        _sync(s)
        t = time.perf_counter()
        with profile(activities=activities) as prof:
            recs = list(session.classify_many(videos, policy=HMS_POLICY, steps=s.steps, batch_size=n))
            _sync(s)
        wall_us = (time.perf_counter() - t) * 1e6
    bad = [r["error"] for r in recs if "error" in r]
    if bad:
        raise RuntimeError(bad[0])
    events = list(prof.events())
    kernels = [e for e in events if _on_gpu(e)]
    syncs: dict[str, int] = {}
    for e in events:
        if any(e.name.startswith(c) for c in SYNC_CALLS):
            syncs[e.name] = syncs.get(e.name, 0) + 1
    out["wall_ms"] = round(wall_us / 1e3, 2)
    if s.cuda:
        out["kernels"] = len(kernels)
        out["kernels_per_step"] = round(len(kernels) / s.steps, 2)
        out["gpu_busy_fraction"] = round(_union_us(kernels) / wall_us, 4)
    else:  # no kernels on a CPU: count the aten ops the step loop issued instead
        ops = sum(e.name.startswith("aten::") for e in events)
        out.update(kernels=None, gpu_busy_fraction=None, aten_ops=ops,
                   aten_ops_per_step=round(ops / s.steps, 2))
    out["synchronizing_calls"] = dict(sorted(syncs.items(), key=lambda kv: -kv[1]))
    out["host_reads"] = recs[0].get("stats", {}).get("host_reads")
    return out


def _on_gpu(evt: Any) -> bool:
    kind = getattr(evt, "device_type", None)
    return kind is not None and "CUDA" in str(kind)


def _union_us(events: list[Any]) -> float:
    spans = sorted((e.time_range.start, e.time_range.end) for e in events)
    total, cur_a, cur_b = 0.0, None, None
    for a, b in spans:
        if cur_b is None or a > cur_b:
            if cur_b is not None:
                total += cur_b - cur_a
            cur_a, cur_b = a, b
        else:
            cur_b = max(cur_b, b)
    if cur_b is not None:
        total += cur_b - cur_a
    return total


SECTIONS = {"part_latency": part_latency, "end_to_end": end_to_end, "lockstep": lockstep, "trace": trace}
