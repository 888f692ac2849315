"""The device check's driver: one section per call, and the report that joins them.

Called by ``scripts/gpu_check.sh`` (which installs the bundle, caps each section's time
and runs the tests); every call writes ``<work>/sections/<name>.json`` =
``{"status": "ran" | "skipped" | "failed", "reason": ..., "result": {...}}``.

- ``sync_profiler`` (section a):

  1. **Sync-free step loop**: the torch engine classifies N videos in lockstep whose gate
     decisions diverge, under ``torch.cuda.set_sync_debug_mode``: first "warn" (every
     synchronising call the loop makes is captured with its stack), then "error". Only
     the counted reads of :class:`hms_deploy.transfer.HostReads` may synchronise (it lifts
     the mode for its one copy). Passes when no warning was raised, no record has an
     error, and ``stats.host_reads`` equals the gate engine calls.
  2. **Profiler proof**: an ``audio-only`` run under ``torch.profiler``, every engine call
     wrapped in a ``record_function("hms:<part>")`` range: passes when no kernel was
     launched inside an appearance or motion range (and those engines were not called),
     while a ``dense`` run (positive control) launches kernels in both.

  Uses the tests' tiny model with gates tuned for mixed decisions (tests/runtime_helpers.py).
- ``part_latency``, ``end_to_end``, ``lockstep``, ``trace`` (b-e): scripts/gpu_sections.py.
- ``--prepare``: the sections' checkpoint and reference video, made once (cached in --work).
- ``--record NAME STATUS REASON``: the shell's verdict for a section it ran or skipped itself.
- ``--report``: ``<out>/gpu_check.json`` (+ ``gpu_check.md``): machine, driver, versions,
  ``bundle_bytes`` and every section's status in order.

``--dry-run`` runs a section on the CPU at small sizes (the rehearsal of the offline
check, scripts/device_rehearsal.sh): no CUDA sync-debug mode and no kernels there, so a
dry run proves that the sections execute, never a GPU property.

    python scripts/gpu_check.py --section sync_profiler --work W [--dry-run]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
BACKBONES = ("appearance_backbone", "motion_backbone")
# in order of value (what a short GPU session must bring back first)
SECTIONS = ("sync_profiler", "part_latency", "end_to_end", "lockstep", "trace", "cuda_tests")
STATUSES = ("ran", "skipped", "failed")


def _videos(root: Path) -> list[Path]:
    """Five videos whose learned decisions diverge under the tests' tuned gates."""
    from runtime_helpers import assets

    from hms_deploy.data.synthetic import render_class_video

    a = assets()
    extra = [render_class_video(root / f"m{s}.mp4", "move_left", seed=s, index=s) for s in (4, 11)]
    return [a.video, extra[0], a.long, extra[1], a.silent]


@contextlib.contextmanager
def _sync_debug(cuda: bool, mode: str) -> Iterator[None]:
    if not cuda:  # the CPU dry run checks the counting logic only
        yield
        return
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def check_sync(session: Any, videos: list[Path]) -> dict[str, Any]:
    n = len(videos)
    cuda = session.engine_set.device.type == "cuda"
    list(session.classify_many(videos, batch_size=n))  # warm-up: lazy CUDA init, cuDNN plans
    if cuda:
        torch.cuda.synchronize()
    out: dict[str, Any] = {"videos": n, "sync_debug_mode": cuda}
    with _sync_debug(cuda, "warn"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recs = list(session.classify_many(videos, batch_size=n))
    syncs = [str(w.message).splitlines()[0] + f" ({w.filename}:{w.lineno})" for w in caught
             if "synchroniz" in str(w.message)]
    out["warn_mode_syncs"] = syncs
    with _sync_debug(cuda, "error"):
        recs = list(session.classify_many(videos, batch_size=n))
    errors = [r["error"] for r in recs if "error" in r]
    out["error_mode_errors"] = errors
    st = recs[0].get("stats", {})
    calls = st.get("engine_calls", {})
    gates = calls.get("appearance_gate", 0) + calls.get("motion_gate", 0)
    dec = [r["decisions"]["appearance"] for r in recs if "decisions" in r]
    partial = sum(0 < sum(col) < n for col in zip(*dec)) if len(dec) == n else 0
    out.update(host_reads=st.get("host_reads"), gate_calls=gates, partial_steps=partial,
               batch=st.get("batch"))
    out["ok"] = not syncs and not errors and st.get("host_reads") == gates and partial > 0
    return out


def _kernels_in(evt: Any, cuda: bool) -> int:
    """Kernel launches under a profiler range: CUDA launch API calls and attached kernels
    (on the CPU dry run: aten ops).

    Either kind may be what a torch version reports; zero vs non-zero is what matters,
    and the dense run is the positive control that the count sees kernels at all.
    """
    if cuda:
        own = len(getattr(evt, "kernels", None) or [])
        own += "LaunchKernel" in evt.name or "GraphLaunch" in evt.name
    else:
        own = evt.name.startswith("aten::")
    return own + sum(_kernels_in(c, cuda) for c in evt.cpu_children)


def _profile(session: Any, video: Path, policy: str, steps: int) -> tuple[dict[str, int], dict[str, Any]]:
    from torch.profiler import ProfilerActivity, profile, record_function

    engines = session.engine_set.engines
    cuda = session.engine_set.device.type == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    originals = {name: e.run for name, e in engines.items()}

    def wrap(name: str, run: Any) -> Any:
        def ranged(inputs: Any, n: int) -> Any:
            with record_function(f"hms:{name}"):
                return run(inputs, n)
        return ranged

    for name, e in engines.items():
        e.run = wrap(name, originals[name])
    try:
        with profile(activities=activities) as prof:
            rec = session.classify(video, policy=policy, steps=steps)
            if cuda:
                torch.cuda.synchronize()
    finally:
        for name, e in engines.items():
            e.run = originals[name]
    kernels: dict[str, int] = dict.fromkeys(engines, 0)
    for evt in prof.events():
        if evt.name.startswith("hms:"):  # engine calls never nest
            kernels[evt.name[4:]] += _kernels_in(evt, cuda)
    return kernels, rec


def check_profiler(session: Any, video: Path, steps: int = 8) -> dict[str, Any]:
    audio, rec_a = _profile(session, video, "audio-only", steps)
    dense, _ = _profile(session, video, "dense", steps)
    calls = rec_a["stats"]["engine_calls"]
    ok = (all(audio[p] == 0 and calls[p] == 0 for p in BACKBONES)
          and all(dense[p] > 0 for p in BACKBONES) and audio["audio_backbone"] > 0)
    return {"steps": steps, "audio_only_kernels": audio, "dense_kernels": dense,
            "audio_only_engine_calls": calls, "ok": ok}




def sync_profiler(work: Path, dry_run: bool) -> tuple[str, str | None, dict[str, Any]]:
    sys.path.insert(0, str(REPO / "tests"))
    from runtime_helpers import assets

    from hms_deploy.runtime import Session

    device = "cpu" if dry_run else "cuda"
    torch.set_num_threads(min(4, torch.get_num_threads()))
    result: dict[str, Any] = {"device": device, "sync_debug_mode": not dry_run}
    with Session(checkpoint=assets().checkpoint, engine="torch", device=device) as session:
        result["sync_debug"] = check_sync(session, _videos(work / "media"))
        result["profiler"] = check_profiler(session, assets().video)
    s, p = result["sync_debug"], result["profiler"]
    bad = [n for n, r in (("sync-debug loop", s), ("profiler audio-only", p)) if not r["ok"]]
    reason = None
    if bad:
        reason = f"{' and '.join(bad)} failed (host_reads {s.get('host_reads')} vs gate calls " \
                 f"{s.get('gate_calls')}; syncs seen {len(s.get('warn_mode_syncs', []))})"
    return ("failed" if bad else "ran"), reason, result


def run_section(name: str, work: Path, dry_run: bool) -> int:
    """Run one section; its JSON under ``work/sections``; exit status 0 if it ran."""
    out = work / "sections" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        if name == "sync_profiler":
            status, reason, result = sync_profiler(work, dry_run)
        else:
            sys.path.insert(0, str(REPO / "scripts"))
            import gpu_sections

            sizes = gpu_sections.sizes(dry_run)
            if sizes.cuda and not torch.cuda.is_available():
                raise RuntimeError("torch sees no CUDA device")
            status, reason = "ran", None
            result = gpu_sections.SECTIONS[name](work, sizes)
            if dry_run:
                reason = "dry run on the CPU at small sizes: not a GPU measurement"
    except Exception as e:  # noqa: BLE001 - a section that crashes is a failed section
        status, reason = "failed", f"{type(e).__name__}: {e}"
        result = {"traceback": traceback.format_exc()}
    record(work, name, status, reason, result)
    print(f"{name}: {status}" + (f" ({reason})" if reason else ""))
    return 0 if status == "ran" else 1


def record(work: Path, name: str, status: str, reason: str | None, result: Any = None) -> None:
    if name not in SECTIONS or status not in STATUSES:
        raise SystemExit(f"gpu_check.py: unknown section {name!r} or status {status!r}")
    out = work / "sections" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"status": status, "reason": reason, "result": result}, indent=1))
    tmp.replace(out)


def _nvidia_smi() -> dict[str, str] | None:
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return None
    done = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                           "--format=csv,noheader"], capture_output=True, text=True, timeout=30,
                          check=False)
    if done.returncode != 0 or not done.stdout.strip():
        return None
    name, driver, memory = (x.strip() for x in done.stdout.splitlines()[0].split(",", 2))
    return {"name": name, "driver": driver, "memory": memory}


def _version(module: str) -> str | None:
    try:
        return str(__import__(module).__version__)
    except Exception:  # noqa: BLE001 - absent or broken: no version
        return None


def report(work: Path, out: Path, *, dry_run: bool, bundle_bytes: int | None, budget_s: int,
           caps: dict[str, int], backends: dict[str, str]) -> int:
    """Join the sections into ``out/gpu_check.json`` and ``out/gpu_check.md``; 0 if all ran."""
    import datetime
    import platform

    sections: dict[str, Any] = {}
    results: dict[str, Any] = {}
    for name in SECTIONS:
        f = work / "sections" / f"{name}.json"
        if f.is_file():
            d = json.loads(f.read_text())
        else:
            d = {"status": "skipped", "reason": "not reached (out of time budget or stopped before it)"}
        sections[name] = {"status": d["status"], "reason": d.get("reason")}
        if d.get("result") is not None:
            results[name] = d["result"]
    cuda = torch.cuda.is_available()
    data = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dry_run": dry_run,
        "device": "cpu (dry run)" if dry_run else (torch.cuda.get_device_name(0) if cuda else None),
        "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else None,
        "nvidia_smi": _nvidia_smi(),
        "python": platform.python_version(),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "numpy": _version("numpy"), "onnxruntime": _version("onnxruntime"), "av": _version("av"),
        "hms_deploy": _version("hms_deploy"),
        "bundle_bytes": bundle_bytes, "budget_s": budget_s, "caps_s": caps, "backends": backends,
        "sections": sections, "results": results,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(data, indent=1, default=str))
    smi = data["nvidia_smi"] or {}
    head = f"# Device check {data['date']}" + (" (DRY RUN on the CPU: no GPU figure)" if dry_run else "")
    device = (f"- device: {data['device']} (cc {data['compute_capability']}), driver {smi.get('driver')}, "
              f"torch {data['torch']} (CUDA {data['cuda']}), numpy {data['numpy']}")
    bundle = (f"- bundle: {bundle_bytes} bytes; budget {budget_s} s; backends: "
              + ", ".join(f"{k} {v}" for k, v in backends.items()))
    lines = [head, "", device, bundle, "", "| section | status | reason |", "| --- | --- | --- |"]
    lines += [f"| {n} | {s['status']} | {s['reason'] or ''} |" for n, s in sections.items()]
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    return 0 if all(s["status"] == "ran" for s in sections.values()) else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="scratch folder (models, media, sections)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, small sizes (the rehearsal)")
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--section", choices=[s for s in SECTIONS if s != "cuda_tests"])
    what.add_argument("--record", nargs=3, metavar=("NAME", "STATUS", "REASON"))
    what.add_argument("--prepare", action="store_true",
                      help="make the sections' checkpoint and reference video (cached in --work)")
    what.add_argument("--report", type=Path, metavar="OUT")
    ap.add_argument("--bundle-bytes", type=int)
    ap.add_argument("--budget", type=int, default=0)
    ap.add_argument("--caps", default="", help="NAME=SECONDS,...")
    ap.add_argument("--backends", default="", help="NAME=WHAT;...")
    args = ap.parse_args(argv)
    if args.section:
        return run_section(args.section, args.work, args.dry_run)
    if args.prepare:
        sys.path.insert(0, str(REPO / "scripts"))
        import gpu_sections

        sizes = gpu_sections.sizes(args.dry_run)
        print(f"prepared {gpu_sections.checkpoint(args.work, sizes).name}, "
              f"{gpu_sections.reference_video(args.work, sizes).name}")
        return 0
    if args.record:
        name, status, reason = args.record
        record(args.work, name, status, reason or None)
        return 0
    caps = {k: int(v) for k, v in (c.split("=") for c in args.caps.split(",") if c)}
    backends = dict(b.split("=", 1) for b in args.backends.split(";") if b)
    return report(args.work, args.report, dry_run=args.dry_run, bundle_bytes=args.bundle_bytes,
                  budget_s=args.budget, caps=caps, backends=backends)


if __name__ == "__main__":
    raise SystemExit(main())
