"""Soak: N requests, 10 % of them bad, from 8 gRPC clients against one ``hms-serve`` (loopback).

Good requests alternate between a ``path`` request and an upload of the same video (the
6 s 320x180 smoke cut of the reference video by default); bad ones cycle through ten
kinds (not a video, empty, truncated, unknown policy, missing input, ``..``, outside the
root, no such file, a text file, both inputs). Reported: good answered (and equal to the
first answer: label and decisions), bad refused with INVALID_ARGUMENT, anything else,
latency p50/p99 of the good ones, and the resident memory (RSS) of ``hms-serve``,
``tritonserver`` and the backend stub after the warm-up and at each 25 % of the requests;
RSS *plateaus* when each grew < 5 % over the last quarter. At the end: the uploads left
in the server's workspace and its shared-memory regions (one: the live stub's).

Bounded: N requests, and no new request after ``max_s`` seconds (the report says how
many were sent).

    hms-bench --suite serve --soak 5000            # tiny variant, T = 8
    python -m benchmarks.bench_soak --requests 200 --smoke
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.bench_serve import ServeSettings, served
from benchmarks.common import (
    MEDIA_DIR,
    RESULTS_DIR,
    bench_video,
    ensure_model,
    header_lines,
    loadavg,
    percentile,
    proc_status_kb,
    provenance,
    write_report,
)
from hms_deploy.runtime.serve.client import request_inputs


@dataclass(frozen=True)
class SoakSettings:
    requests: int = 5000
    clients: int = 8
    bad_every: int = 10  # request i is bad when i % bad_every == bad_every - 1
    variant: str = "tiny"
    steps: int = 8
    policy: str = "rates:0.6,0.03"
    threads: int = 1
    max_batch: int = 8
    max_queue_delay_us: int = 2000
    max_s: float = 3600.0
    video: str | None = None
    work_dir: str | None = None
    out: str = str(RESULTS_DIR)
    name: str = "serve_soak_cpu_tiny"
    smoke: bool = False


def bad_kinds(data: bytes) -> list[dict[str, Any]]:
    return [
        {"video": b"not a video\n" * 50, "name": "x.mp4"}, {"video": b""},
        {"video": data[: len(data) // 20], "name": "t.mp4"},
        {"path": "clip.mp4", "policy": "sometimes"}, {"policy": "dense"},
        {"path": "../x/clip.mp4"}, {"path": "/etc/passwd"}, {"path": "nope.mp4"},
        {"path": "notes.txt"}, {"video": data, "path": "clip.mp4"},
    ]


def rss_kb(pid: int) -> int | None:
    """Resident set size of process ``pid`` (kB; None if gone)."""
    return proc_status_kb(pid, "VmRSS").get("VmRSS")


def serve_processes(serve_pid: int) -> dict[str, int]:
    """The pids of hms-serve ``serve_pid``, its tritonserver and the model's Python stub."""
    from hms_deploy.runtime.serve.health import stub_pids

    out = {"hms-serve": serve_pid}
    for task in Path(f"/proc/{serve_pid}/task").glob("*"):
        try:
            for child in (task / "children").read_text().split():
                if Path(f"/proc/{child}/comm").read_text().strip() == "tritonserver":
                    out["tritonserver"] = int(child)
        except OSError:
            continue
    if "tritonserver" in out:
        stubs = stub_pids(out["tritonserver"])
        if stubs:
            out["stub"] = stubs[0]
    return out


@dataclass
class _Tally:
    good: int = 0
    good_answered: int = 0
    good_wrong: int = 0
    bad: int = 0
    bad_refused: int = 0
    other: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    done: int = 0


def run(s: SoakSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    import tritonclient.grpc as tgrpc
    from tritonclient.utils import InferenceServerException

    prov = provenance("cpu")
    load_start = loadavg()
    video = bench_video(s.video, s.work_dir, smoke=True, log=log)
    root_models = Path(s.work_dir) / "models" / s.variant if s.work_dir else None
    _, engines = ensure_model(s.variant, root=root_models, log=log)
    assert engines is not None
    data = video.read_bytes()
    kinds = bad_kinds(data)
    tally = _Tally()
    lock = threading.Lock()
    counter = itertools.count()
    marks = [round(s.requests * q / 4) for q in (1, 2, 3, 4)]
    rss: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        work = Path(tmp)
        root = work / "root"
        root.mkdir()
        (root / "clip.mp4").write_bytes(data)
        (root / "notes.txt").write_text("not a video\n")
        serve = ServeSettings(threads=s.threads, max_queue_delay_us=s.max_queue_delay_us)
        with served(engines, root, serve, s.steps, work, s.max_batch) as (proc, url):
            with tgrpc.InferenceServerClient(url) as c:
                first = json.loads(c.infer("hms", request_inputs(tgrpc, path="clip.mp4", policy=s.policy),
                                           client_timeout=600).as_numpy("record")[0, 0])

            def sample(done: int) -> None:
                pids = serve_processes(proc.pid)
                rss.append({"done": done, "elapsed_s": round(time.monotonic() - t0, 1),
                            "loadavg": loadavg(),
                            **{f"{k}_rss_mb": round((rss_kb(p) or 0) / 1024, 1) for k, p in pids.items()}})
                log(f"  {done}/{s.requests}: {rss[-1]}")

            def client() -> None:
                with tgrpc.InferenceServerClient(url) as c:
                    while True:
                        i = next(counter)
                        if i >= s.requests or time.monotonic() - t0 > s.max_s:
                            return
                        bad = i % s.bad_every == s.bad_every - 1
                        if bad:
                            values = kinds[(i // s.bad_every) % len(kinds)]
                        elif i % 2:
                            values = {"video": data, "name": "clip.mp4", "policy": s.policy}
                        else:
                            values = {"path": "clip.mp4", "policy": s.policy}
                        t = time.perf_counter()
                        try:
                            rec = json.loads(c.infer("hms", request_inputs(tgrpc, **values), client_timeout=600)
                                             .as_numpy("record")[0, 0])
                            err = None
                        except InferenceServerException as e:
                            rec, err = None, e
                        ms = 1e3 * (time.perf_counter() - t)
                        with lock:
                            if bad:
                                tally.bad += 1
                                if err is not None and "INVALID_ARGUMENT" in str(err.status()):
                                    tally.bad_refused += 1
                                else:
                                    tally.other.append(f"bad #{i} not refused: {err or 'answered'}")
                            else:
                                tally.good += 1
                                if rec is not None:
                                    tally.good_answered += 1
                                    tally.latencies.append(ms)
                                    if (rec["label"], rec["decisions"]) != (first["label"], first["decisions"]):
                                        tally.good_wrong += 1
                                else:
                                    tally.other.append(f"good #{i} failed: {err}")
                            tally.done += 1
                            if tally.done in marks:
                                sample(tally.done)

            t0 = time.monotonic()
            sample(0)
            threads = [threading.Thread(target=client) for _ in range(s.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.monotonic() - t0
            if tally.done not in marks:
                sample(tally.done)
            from hms_deploy.runtime.serve.health import SHM_DIR

            tpid = serve_processes(proc.pid).get("tritonserver")
            cmdline = Path(f"/proc/{tpid}/cmdline").read_bytes().decode() if tpid else ""
            prefix = cmdline.split("shm-region-prefix-name=", 1)[1].split("\0")[0] if cmdline else ""
            repo = next((a.split("=", 1)[1] for a in cmdline.split("\0")
                         if a.startswith("--model-repository=")), None)
            uploads = Path(repo).parent / "uploads" if repo else None
            left = {"upload_files": len([f for f in uploads.rglob("*") if f.is_file()])
                    if uploads and uploads.is_dir() else None,
                    "shm_regions": len(list(SHM_DIR.glob(f"{prefix}*"))) if prefix else None}
    growth = {}
    if len(rss) >= 2 and rss[-1]["done"] >= marks[-1]:
        q3 = next(r for r in rss if r["done"] == marks[2])
        for k in rss[-1]:
            if k.endswith("_rss_mb") and q3.get(k):
                growth[k[:-7]] = round((rss[-1][k] - q3[k]) / q3[k], 4)
    out = {
        "provenance": prov, "settings": asdict(s), "video": str(video),
        "loadavg_at_start": load_start, "loadavg_at_end": loadavg(),
        "sent": tally.done, "wall_s": round(wall, 1), "good": tally.good,
        "good_answered": tally.good_answered, "good_different": tally.good_wrong,
        "bad": tally.bad, "bad_refused": tally.bad_refused, "other": tally.other[:20],
        "other_count": len(tally.other),
        "latency_ms": {"p50": percentile(tally.latencies, 50), "p99": percentile(tally.latencies, 99)}
        if tally.latencies else None,
        "rss": rss, "last_quarter_growth": growth,
        "plateau": bool(growth) and all(g < 0.05 for g in growth.values()),
        "left_at_end": left,
    }
    out_dir = Path(s.out)
    write_report(out_dir / f"{s.name}.json", out, markdown)
    log(f"wrote {out_dir / s.name}.json and .md")
    return out


def markdown(out: dict[str, Any]) -> str:
    s = out["settings"]
    lines = [(f"# Soak: {s['requests']} requests ({100 // s['bad_every']} % bad) from {s['clients']} "
             f"clients against hms-serve ({s['variant']}, T={s['steps']})"), ""]
    lines += header_lines(out["provenance"])
    lines += [(f"- load average before the server started: {out['loadavg_at_start']}, at the end: "
              f"{out['loadavg_at_end']}"),
              (f"- policy {s['policy']}; ONNX Runtime {s['threads']} thread(s); --max-batch "
              f"{s['max_batch']}, --max-queue-delay-us {s['max_queue_delay_us']}"), "",
              (f"Sent {out['sent']} in {out['wall_s']} s: good {out['good_answered']}/{out['good']} "
              f"answered ({out['good_different']} different from the first answer), bad "
              f"{out['bad_refused']}/{out['bad']} refused, other failures {out['other_count']}; "
              f"latency of the good ones p50 {(out['latency_ms'] or {}).get('p50')} ms, p99 "
              f"{(out['latency_ms'] or {}).get('p99')} ms."), "",
              "| requests done | elapsed s | load average | " + " | ".join(
                  k[:-7] + " RSS MB" for k in out["rss"][0] if k.endswith("_rss_mb")) + " |",
              "| ---: | ---: | --- |" + " ---: |" * sum(k.endswith("_rss_mb") for k in out["rss"][0])]
    for r in out["rss"]:
        lines.append(f"| {r['done']} | {r['elapsed_s']} | {r['loadavg']} | " + " | ".join(
            str(r.get(k)) for k in out["rss"][0] if k.endswith("_rss_mb")) + " |")
    lines += ["", (f"Growth over the last quarter: {out['last_quarter_growth']} -> plateau "
              f"(< 5 % each): {out['plateau']}. Left at the end: {out['left_at_end']}.")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--max-s", type=float, default=3600.0)
    ap.add_argument("--name", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args(argv)
    given: dict[str, Any] = {"requests": a.requests, "steps": a.steps, "max_s": a.max_s}
    if a.smoke:
        given.update(out=str(MEDIA_DIR / "smoke"), name="serve_soak_smoke", smoke=True)
    given.update({k: v for k, v in (("name", a.name), ("out", a.out)) if v is not None})
    out = run(SoakSettings(**given))
    print(json.dumps({k: out[k] for k in ("sent", "good_answered", "bad_refused", "plateau")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
