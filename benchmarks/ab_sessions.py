"""One version's side of :mod:`benchmarks.e2e_ab` ``--sessions-only``: the Session on one
video, per policy (and the per-video fixed cost: ``audio-only`` at T = 1), after one
warm-up call each, interleaved repeats; prints JSON (medians of wall and CPU time, and
each policy's record without its timings, to check that both versions give the same).
Its fixed-cost row is the one of :mod:`benchmarks.e2e_runs` (same run) measured this way:
``REPEATS`` interleaved calls after a warm-up at full T, where ``e2e_runs.measure_fixed``
takes at least 5 calls.

    python -m benchmarks.ab_sessions ENGINES VIDEO STEPS REPEATS POLICY...
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any

from benchmarks.e2e_runs import FIXED_RUN as FIXED
from benchmarks.e2e_runs import cpu_s

# counters that vary between repeats of one version (where the read-ahead thread is when
# a seek or the end stops it): not compared
READ_AHEAD_COUNTERS = ("frames_decoded", "frames_walked", "frames_skipped", "frames_converted")


def main(argv: list[str]) -> int:
    from hms_deploy.runtime.session import Session

    engines, video, steps, repeats, *policies = argv
    runs = {p: (int(steps), p) for p in policies}
    runs[FIXED] = (1, "audio-only")
    out: dict[str, Any] = {}
    with Session(engines_dir=engines) as s:
        for name, (t, pol) in runs.items():
            rec = s.classify(video, steps=t, policy=pol)
            rec.pop("timing_ms", None)
            for k in READ_AHEAD_COUNTERS:
                rec.get("stats", {}).pop(k, None)
            out[name] = {"record": rec, "wall_ms": [], "cpu_ms": []}
        for _ in range(int(repeats)):
            for name, (t, pol) in runs.items():
                c0, t0 = cpu_s(), time.perf_counter()
                s.classify(video, steps=t, policy=pol)
                out[name]["wall_ms"].append(1e3 * (time.perf_counter() - t0))
                out[name]["cpu_ms"].append(1e3 * (cpu_s() - c0))
    for v in out.values():
        v["wall_median_ms"] = statistics.median(v["wall_ms"])
        v["cpu_median_ms"] = statistics.median(v["cpu_ms"])
    json.dump(out, sys.stdout, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
