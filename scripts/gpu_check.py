"""Device checks that need a CUDA GPU (called by scripts/gpu_check.sh; see issue #10).

1. **Sync-free step loop**: the torch engine on CUDA classifies N videos in lockstep
   whose gate decisions diverge, under ``torch.cuda.set_sync_debug_mode``: first "warn"
   (every synchronising call the loop makes is captured with its stack), then "error".
   Only the counted reads of :class:`hms_deploy.transfer.HostReads` may synchronise (it
   lifts the mode for its one copy). Passes when no warning was raised, no record has an
   error, and ``stats.host_reads`` equals the gate engine calls.
2. **Profiler proof**: an ``audio-only`` run under ``torch.profiler`` (CPU + CUDA
   activity), every engine call wrapped in a ``record_function("hms:<part>")`` range:
   passes when no CUDA kernel was launched inside an appearance or motion range (and
   those engines were not called), while a ``dense`` run (positive control) launches
   kernels in both.

Writes ``<out>/gpu_check.json`` and prints one line per check. Exit status 1 if a check
failed. Uses the tests' tiny model with gates tuned for mixed decisions
(tests/runtime_helpers.py), so it needs no download.

    python scripts/gpu_check.py --out gpu_out
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_out")
    ap.add_argument("--device", default="cuda",
                    help="cuda (the check); cpu: a dry run of the checks' logic (tests use it)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check.py: no CUDA device visible to torch; nothing checked")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO / "tests"))
    from runtime_helpers import assets

    from hms_deploy.runtime import Session

    cuda = args.device.startswith("cuda")
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if cuda else "cpu (dry run)",
                              "torch": torch.__version__}
    status = 0
    torch.set_num_threads(min(4, torch.get_num_threads()))
    try:
        with Session(checkpoint=assets().checkpoint, engine="torch", device=args.device) as session:
            for name, fn in (("sync_debug", lambda: check_sync(session, _videos(out / "media"))),
                             ("profiler", lambda: check_profiler(session, assets().video))):
                try:
                    report[name] = fn()
                except Exception as e:  # noqa: BLE001 - a check that crashes is a failed check
                    report[name] = {"ok": False, "crash": f"{type(e).__name__}: {e}",
                                    "traceback": traceback.format_exc()}
    finally:
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    s, p = report.get("sync_debug", {}), report.get("profiler", {})
    print(f"sync-debug loop: {'PASS' if s.get('ok') else 'FAIL'} (N={s.get('videos')}, "
          f"{s.get('partial_steps')} steps with partial appearance, host_reads {s.get('host_reads')} "
          f"= gate calls {s.get('gate_calls')}; syncs seen {len(s.get('warn_mode_syncs', []))}, "
          f"errors {len(s.get('error_mode_errors', []))}){' ' + s['crash'] if 'crash' in s else ''}")
    print(f"profiler audio-only: {'PASS' if p.get('ok') else 'FAIL'} (kernels in appearance/motion "
          f"{[p.get('audio_only_kernels', {}).get(b) for b in BACKBONES]}, dense control "
          f"{[p.get('dense_kernels', {}).get(b) for b in BACKBONES]})"
          f"{' ' + p['crash'] if 'crash' in p else ''}")
    if not (s.get("ok") and p.get("ok")):
        status = 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())
