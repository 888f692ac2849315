"""What every benchmark shares: the machine and versions it ran on, statistics, models.

Results name the device, the CPU model, the GPU (if any), library versions, the git
commit and the date, so a number can always be traced to the machine that produced it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
MEDIA_DIR = REPO / "benchmarks" / "media"
MODELS_DIR = MEDIA_DIR / "models"
RESULTS_DIR = REPO / "benchmarks" / "results"
NUM_CLASSES = {"paper": 239, "tiny": 6}  # paper: ActivityNet v1.3 + FCVID-sized head


# ----------------------------------------------------------------------------- machine


def cpu_model() -> str:
    """``model name`` from /proc/cpuinfo (else platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name(device: str) -> str | None:
    if not device.startswith("cuda"):
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    dev = torch.device(device)
    return torch.cuda.get_device_name(dev.index if dev.index is not None else 0)


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001 - absent or broken optional packages are "None"
        return None
    if getattr(mod, "__file__", None) is None:
        return None  # a namespace package: type stubs only (tensorrt-stubs), no library
    return str(getattr(mod, "__version__", "unknown"))


def versions() -> dict[str, str | None]:
    """Versions of everything on the measured path (None = not installed)."""
    from hms_deploy.version import __version__

    out: dict[str, str | None] = {"python": platform.python_version(), "hms_deploy": __version__}
    for name in ("torch", "onnxruntime", "onnx", "av", "numpy", "timm", "tensorrt"):
        out[name] = _version(name)
    return out


def git_commit() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(
                ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def machine(device: str) -> dict[str, Any]:
    """Where the numbers come from (and how loaded the machine was when they started)."""
    import torch

    try:
        threads = len(os.sched_getaffinity(0))
    except AttributeError:
        threads = os.cpu_count()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "device": device,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cores": threads,
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu_name(device),
        "platform": platform.platform(),
        "loadavg_at_start": [round(x, 2) for x in load] if load else None,
    }


def loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, rounded (None where the OS has none)."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def proc_status_kb(pid: int, *keys: str) -> dict[str, int]:
    """Fields of ``/proc/PID/status`` given in kB (``VmRSS``, ``VmHWM``, ``RssAnon``...):
    ``{key: kB}`` for those of ``keys`` present; empty when the process is gone."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in keys:
                out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def provenance(device: str) -> dict[str, Any]:
    return {"date": now_utc(), "git": git_commit(), "machine": machine(device),
            "versions": versions(), "argv": sys.argv}


# -------------------------------------------------------------------------- statistics


SMOKE_NOTE = ("smoke mode: a seconds-long check that the suite runs (tiny model, few steps, "
              "one repeat); its targets do not apply")


def verdict(ok: bool | None, smoke: bool, *, bold: bool = True) -> str:
    """How a report states a target: ``met`` / ``missed`` (bold unless ``bold=False``), or
    ``n/a (smoke mode)`` where the run was a smoke run, whose figures mean nothing."""
    if smoke:
        return "n/a (smoke mode)"
    if ok is None:
        return "not measured"
    return "met" if ok else ("**missed**" if bold else "missed")


def summarize(values: Sequence[float], digits: int = 3) -> dict[str, Any]:
    """Median and spread of repeated measurements: median, p25, p75, iqr, min, max, n, values."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {"median": None, "p25": None, "p75": None, "iqr": None, "min": None,
                "max": None, "n": 0, "values": []}
    p25, med, p75 = np.percentile(v, [25, 50, 75])
    r = lambda x: round(float(x), digits)
    return {"median": r(med), "p25": r(p25), "p75": r(p75), "iqr": r(p75 - p25),
            "min": r(v.min()), "max": r(v.max()), "n": int(v.size),
            "values": [r(x) for x in v]}


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile of ``values``, rounded to 0.1 (latency tables in ms)."""
    return round(float(np.percentile(np.asarray(values, dtype=np.float64), q)), 1)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(wall seconds, result) of ``fn()``."""
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 now (for a server the benchmark starts)."""
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def bench_video(video: str | None, work_dir: str | None, *, smoke: bool,
                log: Callable[[str], None]) -> Path:
    """``video`` if given, else the reference video (the short one with ``smoke``), made on
    first use, in ``work_dir`` when given (else benchmarks/media)."""
    from benchmarks.make_reference_video import REFERENCE, SMOKE, reference_video

    if video:
        return Path(video)
    target = SMOKE if smoke else REFERENCE
    if work_dir:
        target = Path(work_dir) / target.name
    if not target.exists():
        log(f"generating {target}")
    return reference_video(target, smoke=smoke)


# ------------------------------------------------------------------------------ models


def ensure_model(
    variant: str,
    *,
    root: str | Path | None = None,
    checkpoint: str | Path | None = None,
    engines_dir: str | Path | None = None,
    need_export: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[Path, Path | None]:
    """A checkpoint and its export for ``variant`` (made once, cached under benchmarks/media/).

    Given paths are used as they are (an export is verified when opened). Otherwise an
    untrained checkpoint (``NUM_CLASSES[variant]`` classes, seed 0) is written to
    ``<root>/ckpt.pt`` (default root ``benchmarks/media/models/<variant>``) and exported
    to ``<root>/engines``.
    Latency does not depend on the weights, only on the graph.
    """
    root = Path(root) if root else MODELS_DIR / variant
    ck = Path(checkpoint) if checkpoint else root / "ckpt.pt"
    if not ck.exists():
        if checkpoint:
            raise FileNotFoundError(f"checkpoint {ck} not found")
        from hms_deploy.checkpoint import init_checkpoint, save_checkpoint
        from hms_deploy.config import make_config

        log(f"making an untrained {variant} checkpoint at {ck}")
        ck.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(init_checkpoint(make_config(variant, NUM_CLASSES[variant]), seed=0), ck)
    if not need_export:
        return ck, Path(engines_dir) if engines_dir else None
    eng = Path(engines_dir) if engines_dir else root / "engines"
    if not (eng / "manifest.json").exists():
        if engines_dir:
            raise FileNotFoundError(f"export dir {eng} has no manifest.json")
        from hms_deploy.export.pipeline import export_checkpoint

        log(f"exporting {ck} to {eng} (once; cached)")
        export_checkpoint(ck, eng, log=lambda s: log("  " + s))
    return ck, eng


def set_threads(threads: int | None) -> None:
    """Intra-op threads of torch (CPU) for this process; None leaves the default."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def engine_options(engine: str, device: str, threads: int | None) -> dict[str, Any]:
    """Backend options: ORT CUDA provider on a GPU; ``threads`` per ORT session."""
    options: dict[str, Any] = {}
    if engine == "onnx" and device.startswith("cuda"):
        options["providers"] = ("cuda",)
    if engine == "onnx" and threads:
        options["threads"] = threads
    if engine == "trt":
        from hms_deploy.export import add_trt_plans

        options["build_plans"] = add_trt_plans  # plans built on first use, as hms-run does
    return options


def open_session(engine: str, checkpoint: Path, engines_dir: Path | None, device: str,
                 threads: int | None = None):
    """A :class:`~hms_deploy.runtime.session.Session` on ``engine`` (torch: the checkpoint).

    ``threads``: intra-op threads per ONNX Runtime session and for torch (None: defaults,
    all usable cores). On a shared machine, 1 thread keeps other jobs from stalling a
    thread pool's barriers, so times scale with the CPU share and CPU time stays exact.
    """
    from hms_deploy.runtime.session import Session

    set_threads(threads)
    if engine == "torch":
        return Session(checkpoint=checkpoint, engine="torch", device=device)
    return Session(engines_dir=engines_dir, engine=engine, device=device,
                   **engine_options(engine, device, threads))


@contextlib.contextmanager
def ort_spinning(enabled: bool | None) -> Iterator[None]:
    """An experiment, not a product setting: ONNX Runtime sessions created inside this
    block get ``session.intra_op.allow_spinning`` = 1/0 (None: the backend's default,
    which is ORT's: spinning on). Spinning worker threads of nine sessions compete with
    the host's decoding on a small CPU; this measures by how much."""
    if enabled is None:
        yield
        return
    import onnxruntime as ort

    original = ort.SessionOptions

    class _Options(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.add_session_config_entry("session.intra_op.allow_spinning",
                                          "1" if enabled else "0")

    ort.SessionOptions = _Options
    try:
        yield
    finally:
        ort.SessionOptions = original


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".partial")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)
    return path


def write_report(path: Path, data: dict[str, Any], markdown: Callable[[dict[str, Any]], str]) -> Path:
    """A benchmark's results: ``path`` (JSON, :func:`write_json`) and beside it the same
    name with ``.md``, ``markdown(data)``. Returns ``path``."""
    write_json(path, data)
    path.with_suffix(".md").write_text(markdown(data))
    return path


def fmt_gmac(x: float) -> str:
    return f"{x:.1f}" if x >= 10 else f"{x:.3g}"


def fmt_ms(x: float | None) -> str:
    if x is None:
        return "-"
    if x >= 10_000:
        return f"{x / 1000:.1f} s"
    if x >= 1000:
        return f"{x / 1000:.2f} s"
    if x >= 10:
        return f"{x:.0f} ms"
    if x >= 0.1 or x == 0:
        return f"{x:.2f} ms"
    return f"{1000 * x:.0f} us"


def fmt_commit(git: dict[str, Any]) -> str:
    """:func:`git_commit`'s answer as text: the commit's first 12 digits (+ " (dirty)")."""
    return (git.get("commit") or "unknown")[:12] + (" (dirty)" if git.get("dirty") else "")


def header_lines(prov: dict[str, Any]) -> list[str]:
    m, v, g = prov["machine"], prov["versions"], prov["git"]
    dev = m["gpu"] or f"CPU: {m['cpu_model']} ({m['usable_cores']} cores usable)"
    vers = ", ".join(f"{k} {val}" for k, val in v.items() if val)
    commit = fmt_commit(g)
    return [
        f"- device: {m['device']}; {dev}",
        f"- date: {prov['date']}; git {commit}",
        f"- versions: {vers}",
        f"- load average at start: {m['loadavg_at_start']}",
    ]
