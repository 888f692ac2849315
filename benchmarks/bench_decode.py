"""Decode cost of an HMS run vs decoding every frame once, on a long-GOP 720p file.

``hms-bench --suite decode`` (or ``python -m benchmarks.bench_decode``). The video is
generated once (cached in ``benchmarks/media/``): 2 minutes, 1280x720, 30 fps H.264
with x264's default keyframe placement (keyint 250 plus scene cuts: the reference
video's pattern, whose background changes every 10 s) and B-frames (x264 default 3).

Measured side by side, rounds interleaved, medians over ``repeats``:

- ``full decode``: every frame decoded once, none converted (PyAV ``container.decode``);
- the decode work of an HMS run with the policy's plan (``rates:0.6,0.03``, T = 128):
  the runtime's own :class:`~hms_deploy.runtime.frames.VideoInputs` asked for the
  appearance frame / motion clip of every planned step, in step order (conversion to
  RGB and resize/crop included, no engine), once per decoder configuration: plain
  (the decoder before read-ahead and skipping), ``skip`` (non-reference frames no
  step wants are skipped), ``thread`` (read-ahead thread, bounded by a count of
  decoded frames), ``thread+skip``, ``thread+skip+plan`` (the default: the thread
  hands over only the frames the plan can use, converted, resized and cropped, bounded
  by the bytes they hold). Every configuration's inputs are checked equal to the plain
  one's, bit for bit;
- the same plan run by the Session with the variant's exported engines (ONNX Runtime),
  ``before`` (plain decoder), ``thread+skip`` (the previous default) and ``after``
  (the default): the run's own ``timing_ms.decode``, the time its step loop spends on
  frames (waiting for the decoder, converting, resizing), with the decoder running
  ahead while the engines compute;
- the seek-vs-walk crossover: frames requested every G frames (G from 30 to 600) read
  with ``seek_threshold`` 0 (seek whenever a keyframe lies between) and "never".

The summary's ``hms_decode_over_full_decode`` is the Session run's decode time (after)
over the full decode (target <= 0.5); ``decoder_work_over_full_decode`` is the
decoder-only ``thread+skip+plan`` time over the full decode (all the decode work, hidden or
not). Frames walked (packets fed to the decoder), decoded,
skipped and converted come from the decoder's counters.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    MEDIA_DIR,
    RESULTS_DIR,
    header_lines,
    loadavg,
    provenance,
    summarize,
    write_report,
)

LONG_GOP = MEDIA_DIR / "long_gop_120s_1280x720.mp4"
TARGET = 0.5
CONFIGS = {  # name -> (read_ahead, skip_nonref, plan_ahead); read_ahead None = default
    "plain": (0, False, False),
    "skip": (0, True, False),
    "thread": (None, False, False),
    "thread+skip": (None, True, False),
    "thread+skip+plan": (None, True, True),
}
SESSION_RUNS = {  # label -> DecodeOptions fields
    "before": {"read_ahead": 0, "skip_nonref": False},
    "thread+skip": {"plan_ahead": False},
    "after": {},  # the runtime's default (thread+skip+plan)
}


@dataclass(frozen=True)
class DecodeSettings:
    video: str | None = None
    policy: str = "rates:0.6,0.03"
    steps: int = 128
    variant: str = "paper"  # sizes of the crops and the motion clip (from the config)
    repeats: int = 3
    engines: bool = True  # also run the plan through the Session (paper engines)
    session_repeats: int = 2
    gaps: tuple[int, ...] = (30, 120, 250, 600)
    out: str = str(RESULTS_DIR)
    name: str = "decode_cpu_720p_long_gop"


def replace_steps(s: DecodeSettings, steps: int) -> DecodeSettings:
    from dataclasses import replace

    return replace(s, steps=steps)


def long_gop_video(path: Path = LONG_GOP) -> Path:
    """The 2-minute 1280x720 30 fps file with x264's default GOP (made once, ~1-2 min)."""
    from hms_deploy.data.synthetic import make_reference_video

    if path.exists() and path.stat().st_size > 0:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".partial" + path.suffix)
    make_reference_video(tmp, duration_s=120.0, size=(1280, 720), gop=None)
    tmp.replace(path)
    return path


def full_decode(path: str) -> tuple[float, int]:
    """Seconds to decode every video frame once (no conversion), and the frame count."""
    import av

    t = time.perf_counter()
    n = 0
    with av.open(path) as c:
        for _ in c.decode(c.streams.video[0]):
            n += 1
    return time.perf_counter() - t, n


def hms_decode(path: str, s: DecodeSettings, read_ahead: int | None, skip: bool,
               plan_ahead: bool, plan: tuple[np.ndarray, np.ndarray], config: Any
               ) -> tuple[float, list[np.ndarray], dict[str, int]]:
    """The step loop's decode work for a plan: seconds, the inputs, the decoder counters."""
    from hms_deploy.runtime.frames import DecodeOptions, open_video

    plan_a, plan_m = plan
    t = time.perf_counter()
    vi = open_video(path, config, s.steps, decode=DecodeOptions(read_ahead, skip, plan_ahead))
    try:
        vi.plan(plan_a, plan_m)
        out = []
        for step in range(s.steps):
            if plan_a[step]:
                out.append(vi.appearance(step))
            if plan_m[step]:
                out.append(vi.motion(step))
        stats = dict(vi.decode_stats, read_ahead=vi.source.options.read_ahead)
    finally:
        vi.close()
    return time.perf_counter() - t, out, stats


def session_decode(session: Any, path: str, s: DecodeSettings, label: str) -> dict[str, Any]:
    """One Session run of the plan on ``path`` with the decoder of ``SESSION_RUNS[label]``;
    its decode time and decoder counters."""
    from dataclasses import replace

    from hms_deploy.runtime.frames import DecodeOptions

    dec = DecodeOptions(**SESSION_RUNS[label])
    opts = replace(session.options(steps=s.steps, policy=s.policy), decode=dec)
    t = time.perf_counter()
    (rec,) = list(session.classify_many([path], options=opts))
    wall = time.perf_counter() - t
    if "error" in rec:
        raise RuntimeError(f"{path}: {rec['error']}")
    st = rec["stats"]
    return {"wall_s": wall, "decode_s": rec["timing_ms"]["decode"] / 1e3,
            "timing_ms": rec["timing_ms"], "decisions": rec["decisions"], "score": rec["score"],
            **{k: st[k] for k in ("frames_walked", "frames_decoded", "frames_skipped",
                                  "frames_converted", "seeks", "window_hits")}}


def sparse_reads(path: str, gap: int, seek_threshold: int) -> tuple[float, dict[str, int]]:
    """Frames 0, G, 2G, ... read in order with a plain FrameSource (walk or seek)."""
    from hms_deploy.data.frame_source import FrameSource
    from hms_deploy.data.video import probe

    info = probe(path)
    t = time.perf_counter()
    with FrameSource(info, seek_threshold=seek_threshold, cache_frames=0) as src:
        for i in range(0, info.num_frames, gap):
            src.read([i])
        st = src.stats
    return time.perf_counter() - t, {"decoded": st.frames_decoded, "seeks": st.seeks}


def run(s: DecodeSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    from hms_deploy.config import make_config
    from hms_deploy.data.video import probe
    from hms_deploy.runtime.policy import parse_policy

    t0 = time.perf_counter()
    prov = provenance("cpu")
    video = Path(s.video) if s.video else None
    if video is None:
        if not LONG_GOP.exists():
            log(f"generating {LONG_GOP} (once)")
        video = long_gop_video()
    path = str(video)
    info = probe(path)
    config = make_config(s.variant, 2)
    plan = parse_policy(s.policy).plan(s.steps)
    full: list[float] = []
    times: dict[str, list[float]] = {k: [] for k in CONFIGS}
    counters: dict[str, dict[str, int]] = {}
    identical: dict[str, bool] = {}
    reference: list[np.ndarray] | None = None
    names = list(CONFIGS)
    for r in range(s.repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        dt, frames = full_decode(path)
        full.append(dt)
        log(f"round {r + 1}: full decode {dt:.2f} s ({frames} frames)")
        for name in order:
            ra, skip, ahead = CONFIGS[name]
            dt, inputs, st = hms_decode(path, s, ra, skip, ahead, plan, config)
            times[name].append(dt)
            counters[name] = st
            if name == "plain" and reference is None:
                reference = inputs
            if reference is not None:
                same = len(inputs) == len(reference) and all(
                    np.array_equal(a, b) for a, b in zip(inputs, reference))
                identical[name] = identical.get(name, True) and same
            log(f"round {r + 1}: {name:<12} {dt:.2f} s {st}")
    session_runs: dict[str, list[dict[str, Any]]] = {k: [] for k in SESSION_RUNS}
    if s.engines:
        from benchmarks.common import ensure_model
        from hms_deploy.runtime.session import Session

        _, eng = ensure_model(s.variant, log=log)
        with Session(engines_dir=eng, engine="onnx", device="cpu") as session:
            session_decode(session, path, replace_steps(s, 8), "after")  # warm-up
            labels = list(SESSION_RUNS)
            for r in range(s.session_repeats):
                for label in (labels if r % 2 == 0 else labels[::-1]):
                    x = session_decode(session, path, s, label)
                    session_runs[label].append(x)
                    log(f"session {label}: wall {x['wall_s']:.2f} s, decode {x['decode_s']:.2f} s")
    crossover = []
    for gap in s.gaps:
        row: dict[str, Any] = {"gap": gap}
        for label, thr in (("seek", 0), ("walk", 10**9)):
            dt, st = sparse_reads(path, gap, thr)
            row[label] = {"s": round(dt, 3), **st}
        crossover.append(row)
        log(f"gap {gap}: seek {row['seek']['s']:.2f} s, walk {row['walk']['s']:.2f} s")
    full_med = summarize(full)["median"]
    results = {k: {"seconds": summarize(v), **counters[k], "over_full_decode":
                   round(summarize(v)["median"] / full_med, 4),
                   "inputs_identical_to_plain": identical.get(k)} for k, v in times.items()}
    sess = {}
    for label, xs in session_runs.items():
        if xs:
            sess[label] = {"decode_s": summarize([x["decode_s"] for x in xs]),
                           "wall_s": summarize([x["wall_s"] for x in xs]),
                           **{k: xs[0][k] for k in xs[0] if k.startswith("frames_") or
                              k in ("seeks", "window_hits")}}
            sess[label]["over_full_decode"] = round(sess[label]["decode_s"]["median"] / full_med, 4)
    if "after" in sess:
        b = session_runs["before"][0]
        sess["same_decisions_and_scores"] = all(
            x["decisions"] == b["decisions"] and x["score"] == b["score"]
            for xs in session_runs.values() for x in xs)
    work = results["thread+skip+plan"]["over_full_decode"]
    ratio = sess["after"]["over_full_decode"] if "after" in sess else work
    kt = info.keyframe_times
    out = {
        "benchmark": "decode", "schema": 1, **prov,
        "video": {"path": path, "size": [info.width, info.height], "fps": round(info.fps, 3),
                  "frames": info.num_frames, "duration_s": round(info.duration_s, 3),
                  "keyframes": int(kt.size),
                  "keyframe_interval_s": round(float(np.max(np.diff(kt))), 3) if kt.size > 1
                  else None},
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(s).items()},
        "full_decode_s": summarize(full),
        "hms": results,
        "session": sess,
        "seek_vs_walk": crossover,
        "summary": {"hms_decode_over_full_decode": ratio, "target_max": TARGET,
                    "met": bool(ratio <= TARGET),
                    "decoder_work_over_full_decode": work,
                    "plain_over_full_decode": results["plain"]["over_full_decode"],
                    "session_thread_skip_over_full_decode": sess.get("thread+skip", {}).get(
                        "over_full_decode"),
                    "session_before_over_full_decode": sess.get("before", {}).get(
                        "over_full_decode")},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out["machine"]["loadavg_at_end"] = loadavg()
    outdir = Path(s.out)
    write_report(outdir / f"{s.name}.json", out, markdown)
    log(f"hms_decode_over_full_decode = {ratio:.3f} (target <= {TARGET}); "
        f"wrote {outdir / s.name}.json/.md")
    return out


def markdown(r: dict[str, Any]) -> str:
    v, s = r["video"], r["settings"]
    lines = [f"# Decode: HMS `{s['policy']}` (T = {s['steps']}) vs full decode", "",
             *header_lines(r), f"- load average at end: {r['machine']['loadavg_at_end']}",
             (f"- video: {Path(v['path']).name}, {v['duration_s']} s, {v['size'][0]}x{v['size'][1]}, "
             f"{v['fps']} fps, {v['frames']} frames, {v['keyframes']} keyframes "
             f"(longest interval {v['keyframe_interval_s']} s)"),
             (f"- full decode (every frame once, no conversion): "
             f"{r['full_decode_s']['median']:.2f} s (n={r['full_decode_s']['n']})"), "",
             ("| decoder | seconds (median) | / full decode | walked | decoded | skipped | "
             "converted | seeks | window hits | read-ahead | inputs = plain |"),
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, x in r["hms"].items():
        lines.append(f"| {name} | {x['seconds']['median']:.2f} | {x['over_full_decode']:.3f} | "
                     f"{x['frames_walked']} | {x['frames_decoded']} | {x['frames_skipped']} | "
                     f"{x['frames_converted']} | {x['seeks']} | {x['window_hits']} | "
                     f"{x['read_ahead']} | {x['inputs_identical_to_plain']} |")
    sess = r.get("session") or {}
    if "after" in sess:
        lines += ["", (f"Session runs (engines: {s['variant']} on ONNX Runtime; decode = the "
                  "run's timing_ms.decode, the step loop's time on frames):"), "",
                  ("| decoder | decode (median) | / full decode | wall | walked | decoded | "
                  "skipped | converted |"), "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for label in SESSION_RUNS:
            if label not in sess:
                continue
            x = sess[label]
            lines.append(f"| {label} | {x['decode_s']['median']:.2f} s | {x['over_full_decode']:.3f} "
                         f"| {x['wall_s']['median']:.2f} s | {x['frames_walked']} | "
                         f"{x['frames_decoded']} | {x['frames_skipped']} | {x['frames_converted']} |")
        lines.append(f"\nDecisions and scores equal in every run: "
                     f"{sess.get('same_decisions_and_scores')}")
    sm = r["summary"]
    lines += ["", (f"**hms_decode_over_full_decode = {sm['hms_decode_over_full_decode']:.3f}** "
              f"(target <= {sm['target_max']}): {'met' if sm['met'] else '**missed**'}; "
              f"decoder work (decoder-only thread+skip+plan) / full decode: "
              f"{sm['decoder_work_over_full_decode']:.3f}; the decoder before this change "
              f"(decoder-only): {sm['plain_over_full_decode']:.3f}"), "",
              "## Seek vs walk (frames 0, G, 2G, ... read in order, plain FrameSource)", "",
              ("| gap G (frames) | seek at every keyframe between: s | decoded | seeks | "
              "walk: s | decoded |"), "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in r["seek_vs_walk"]:
        sk, wk = row["seek"], row["walk"]
        lines.append(f"| {row['gap']} | {sk['s']:.2f} | {sk['decoded']} | {sk['seeks']} | "
                     f"{wk['s']:.2f} | {wk['decoded']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--video", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--out", default=str(RESULTS_DIR))
    ap.add_argument("--name", default="decode_cpu_720p_long_gop")
    ap.add_argument("--variant", default="paper")
    ap.add_argument("--no-engines", action="store_true", help="decoder-only runs")
    a = ap.parse_args(argv)
    run(DecodeSettings(video=a.video, repeats=a.repeats, steps=a.steps, out=a.out, name=a.name,
                       variant=a.variant, engines=not a.no_engines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
