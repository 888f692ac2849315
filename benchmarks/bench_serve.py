"""Online serving vs offline ``hms-run``: the same videos, the same settings, one run.

Per variant (default tiny and paper), on one video (default the 6 s 320x180 smoke cut of
the reference video) at T steps with a forced policy (default ``rates:0.6,0.03``, the
paper's regime; an untrained model's learned gates are arbitrary):

- **offline**: one :class:`~hms_deploy.runtime.session.Session` classifies the N request
  videos one after another (what ``hms-run`` does; videos/s) and in lockstep batches of
  ``clients`` (``hms-run --batch-size``);
- **serve**: ``hms-serve`` (real Triton, loopback) with ``clients`` gRPC clients, each
  sending ``requests`` path requests one after another: requests/s over the whole
  load, latency p50/p99 per request, and how many requests each lockstep batch held.

Offline and serve are measured alternately, ``rounds`` times each (default 3, on one
running server), and each figure is the total over its rounds: a change of the
machine's load hits both sides alike. One warm-up classification precedes each figure.
The serve side also reports its mean latency against the mean model run of its records
(the rest is outside the model: transport, queue, batching delay, parsing). ONNX Runtime threads per session are
``threads`` on both sides (default 1: the machine is shared; times scale with the CPU
share and stay comparable). Records of the server are checked against the offline
ones (decisions and label equal, probabilities within 1e-5).

    python -m benchmarks.bench_serve                 # tiny + paper, 4 clients
    hms-bench --suite serve --variant tiny --smoke   # seconds
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    MEDIA_DIR,
    RESULTS_DIR,
    bench_video,
    ensure_model,
    free_ports,
    header_lines,
    loadavg,
    percentile,
    provenance,
    write_report,
)
from hms_deploy.runtime.serve.client import request_inputs


@dataclass(frozen=True)
class ServeSettings:
    variants: tuple[str, ...] = ("tiny", "paper")
    clients: int = 4
    requests: dict[str, int] | None = None  # per client, per variant; default tiny 4, paper 2
    steps: dict[str, int] | None = None  # per variant; default {"tiny": 16, "paper": 32}
    policy: str = "rates:0.6,0.03"
    threads: int = 1
    max_queue_delay_us: int = 20000
    max_batch: int | None = None  # the server's --max-batch (default: clients)
    rounds: int = 3  # offline and serve measured alternately, this many times each
    video: str | None = None
    device: str = "cpu"
    work_dir: str | None = None
    out: str = str(RESULTS_DIR)
    name: str = "serve_cpu"
    smoke: bool = False

    def steps_for(self, variant: str) -> int:
        return (self.steps or {}).get(variant) or {"tiny": 16, "paper": 32}[variant]

    def requests_for(self, variant: str) -> int:
        return (self.requests or {}).get(variant) or {"tiny": 4, "paper": 2}[variant]


def smoke_settings(**overrides: Any) -> ServeSettings:
    base = ServeSettings(variants=("tiny",), clients=2, requests={"tiny": 2}, smoke=True, rounds=1,
                         out=str(MEDIA_DIR / "smoke"), name="serve_smoke")
    return replace(base, **overrides)


def _offline(engines: Path, videos: list[str], s: ServeSettings, steps: int) -> dict[str, Any]:
    from hms_deploy.runtime.session import Session

    out: dict[str, Any] = {}
    with Session(engines_dir=engines, threads=s.threads) as session:
        opts = session.options(policy=s.policy, steps=steps)
        next(iter(session.classify_many(videos[:1], options=opts)))  # warm-up
        for mode, batch in (("sequential", 1), ("lockstep", s.clients)):
            t = time.perf_counter()
            recs = list(session.classify_many(videos, options=opts, batch_size=batch))
            wall = time.perf_counter() - t
            assert all("error" not in r for r in recs), recs
            out[mode] = {"batch": batch, "videos": len(videos), "wall_s": round(wall, 3),
                         "videos_per_s": round(len(videos) / wall, 4)}
            out["records"] = recs
    return out


def _infer(client: Any, module: Any, path: str, policy: str) -> dict[str, Any]:
    ins = request_inputs(module, path=path, policy=policy)
    return json.loads(client.infer("hms", ins, client_timeout=600).as_numpy("record")[0, 0])


def served(engines: Path, root: Path, s: ServeSettings, steps: int, work: Path,
           max_batch: int) -> contextlib.AbstractContextManager[tuple[subprocess.Popen[bytes], str]]:
    """:func:`start_serve` with this benchmark's settings."""
    return start_serve(engines, work, [
        "--allowed-root", str(root), "--threads", str(s.threads), "--steps", str(steps),
        "--max-batch", str(max_batch), "--max-queue-delay-us", str(s.max_queue_delay_us)])


@contextlib.contextmanager
def start_serve(engines: Path, work: Path, args: Sequence[str] = (), env: dict[str, str] | None = None
                ) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``hms-serve --engines ENGINES ARGS`` on free loopback ports (its log in
    ``work/hms-serve.log``), ready: (process, gRPC url); stopped on exit. A server that
    exits or is not ready within 300 s raises, with its log's end."""
    import tritonclient.grpc as tgrpc

    http, grpc, metrics = free_ports(3)
    cmd = [sys.executable, "-m", "hms_deploy.cli.serve", "--engines", str(engines),
           "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
           *args, "--drain-s", "1"]
    log_path = work / "hms-serve.log"
    with open(log_path, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env)
    try:
        url = f"127.0.0.1:{grpc}"
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("hms-serve did not start:\n" + log_path.read_text()[-3000:])
            try:
                with tgrpc.InferenceServerClient(url) as c:
                    if c.is_model_ready("hms"):
                        break
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.5)
        yield proc, url
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _serve_load(url: str, video: Path, s: ServeSettings, requests: int) -> dict[str, Any]:
    """``s.clients`` gRPC clients, ``requests`` each, one after another: the raw figures."""
    import tritonclient.grpc as tgrpc

    latencies: list[float] = []
    recs: list[dict[str, Any]] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client() -> None:
        with tgrpc.InferenceServerClient(url) as c:
            for _ in range(requests):  # bounded
                t = time.perf_counter()
                try:
                    rec = _infer(c, tgrpc, video.name, s.policy)
                except Exception as e:  # noqa: BLE001 - counted, reported
                    with lock:
                        errors.append(str(e))
                    continue
                with lock:
                    latencies.append(1e3 * (time.perf_counter() - t))
                    recs.append(rec)

    threads = [threading.Thread(target=client) for _ in range(s.clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"wall_s": time.perf_counter() - t0, "latencies": latencies, "records": recs,
            "errors": errors}


def _serve_summary(loads: list[dict[str, Any]], s: ServeSettings, requests: int) -> dict[str, Any]:
    latencies = [x for ld in loads for x in ld["latencies"]]
    recs = [r for ld in loads for r in ld["records"]]
    wall = sum(ld["wall_s"] for ld in loads)
    n = len(latencies)
    batches = [r["stats"]["batch"] for r in recs]
    return {
        "clients": s.clients, "requests": s.clients * requests * len(loads), "answered": n,
        "errors": [e for ld in loads for e in ld["errors"]][:5], "wall_s": round(wall, 3),
        "requests_per_s": round(n / wall, 4) if wall > 0 else None,
        "latency_ms": {"p50": percentile(latencies, 50), "p99": percentile(latencies, 99),
                       "min": round(min(latencies), 1), "max": round(max(latencies), 1)}
        if latencies else None,
        "lockstep_batch": {"mean": round(float(np.mean(batches)), 2), "max": max(batches)}
        if batches else None,
        # where a request's time goes: inside the model's run (the records' timing) or
        # outside it (transport, queue, batching delay, the handler's parsing)
        "mean_ms": {"latency": round(float(np.mean(latencies)), 1),
                    "model_run": round(float(np.mean([r["timing_ms"]["total"] for r in recs])), 1)}
        if recs else None,
        "records": recs,
    }


def _merge_offline(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"records": rounds[0]["records"]}
    for mode in ("sequential", "lockstep"):
        videos = sum(r[mode]["videos"] for r in rounds)
        wall = sum(r[mode]["wall_s"] for r in rounds)
        out[mode] = {"batch": rounds[0][mode]["batch"], "videos": videos, "wall_s": round(wall, 3),
                     "videos_per_s": round(videos / wall, 4),
                     "per_round_videos_per_s": [r[mode]["videos_per_s"] for r in rounds]}
    return out


def _agree(served: list[dict[str, Any]], offline: list[dict[str, Any]]) -> bool:
    ref = offline[0]
    return all(
        r["decisions"] == ref["decisions"] and r["label"] == ref["label"]
        and all(abs(p - q) <= 1e-5 for (_, p), (_, q) in zip(r["topk"], ref["topk"]))
        for r in served
    )


def run(s: ServeSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    prov = provenance(s.device)
    video = bench_video(s.video, s.work_dir, smoke=True, log=log)
    results: dict[str, Any] = {}
    for variant in s.variants:
        steps = s.steps_for(variant)
        root = Path(s.work_dir) / "models" / variant if s.work_dir else None
        _, engines = ensure_model(variant, root=root, log=log)
        assert engines is not None
        requests = s.requests_for(variant)
        n = s.clients * requests
        with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp, served(
                engines, video.parent, s, steps, Path(tmp), s.max_batch or s.clients) as (_, url):
            import tritonclient.grpc as tgrpc

            with tgrpc.InferenceServerClient(url) as c:  # warm-up
                _infer(c, tgrpc, video.name, s.policy)
            offs, loads = [], []
            for r in range(s.rounds):  # interleaved: a load change hits both sides alike
                log(f"[{variant}] round {r + 1}/{s.rounds}: offline {n} videos, T={steps}, "
                    f"{s.policy}; serve {s.clients} clients x {requests} requests")
                offs.append(_offline(engines, [str(video)] * n, s, steps))
                loads.append(_serve_load(url, video, s, requests))
            offline = _merge_offline(offs)
            summary = _serve_summary(loads, s, requests)
        ok = _agree(summary.pop("records"), offline.pop("records"))
        seq = offline["sequential"]["videos_per_s"]
        best = max(seq, offline["lockstep"]["videos_per_s"])
        rate = summary["requests_per_s"]
        results[variant] = {
            "steps": steps, "offline": offline, "serve": summary, "records_agree": ok,
            "serve_over_offline_sequential": round(rate / seq, 3) if rate else None,
            "serve_over_offline_best": round(rate / best, 3) if rate else None,
        }
        log(f"[{variant}] offline {seq} videos/s (sequential), "
            f"{offline['lockstep']['videos_per_s']} (lockstep {s.clients}); serve "
            f"{summary['requests_per_s']} req/s ({results[variant]['serve_over_offline_best']} of "
            f"the better offline run), p50 {summary['latency_ms']['p50']} ms, "
            f"p99 {summary['latency_ms']['p99']} ms; records agree: {ok}")
    load_end = loadavg()
    out = {"provenance": prov, "settings": asdict(s), "video": str(video),
           "loadavg_at_end": load_end, "results": results}
    out_dir = Path(s.out)
    write_report(out_dir / f"{s.name}.json", out, markdown)
    log(f"wrote {out_dir / s.name}.json and .md")
    return out


def markdown(out: dict[str, Any]) -> str:
    s = out["settings"]
    lines = [f"# Serving (hms-serve on Triton) vs offline hms-run: {', '.join(s['variants'])}", ""]
    lines += header_lines(out["provenance"])
    lines += [f"- load average at end: {out['loadavg_at_end']}",
              (f"- video: {Path(out['video']).name}; policy {s['policy']}; ONNX Runtime "
              f"{s['threads']} thread(s) per session on both sides; {s['clients']} concurrent "
              f"gRPC clients (requests per client: see the JSON); the server's --max-batch "
              f"{s.get('max_batch') or s['clients']}, dynamic batching delay "
              f"{s['max_queue_delay_us']} us"), "",
              ("| variant | T | offline sequential videos/s | offline lockstep videos/s | "
              "serve requests/s | serve / offline seq. | serve / better offline | p50 latency | "
              "p99 latency | mean latency / mean model run | mean lockstep batch | records agree |"),
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for v, r in out["results"].items():
        sv, off = r["serve"], r["offline"]
        lat = sv["latency_ms"] or {}
        lines.append(
            f"| {v} | {r['steps']} | {off['sequential']['videos_per_s']} | "
            f"{off['lockstep']['videos_per_s']} | {sv['requests_per_s']} | "
            f"{r['serve_over_offline_sequential']}x | {r.get('serve_over_offline_best')}x | "
            f"{lat.get('p50')} ms | {lat.get('p99')} ms | "
            f"{(sv.get('mean_ms') or {}).get('latency')} / {(sv.get('mean_ms') or {}).get('model_run')} ms | "
            f"{(sv['lockstep_batch'] or {}).get('mean')} | {r['records_agree']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", action="append", choices=["tiny", "paper"])
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=None, help="per client (default tiny 4, paper 2)")
    ap.add_argument("--steps", type=int, default=None, help="T for every variant")
    ap.add_argument("--policy", default="rates:0.6,0.03")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-batch", type=int, default=None, help="the server's (default: --clients)")
    ap.add_argument("--max-queue-delay-us", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--video", default=None)
    ap.add_argument("--name", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args(argv)
    given: dict[str, Any] = {"clients": a.clients, "policy": a.policy, "threads": a.threads,
                             "video": a.video, "max_batch": a.max_batch,
                             "max_queue_delay_us": a.max_queue_delay_us, "rounds": a.rounds}
    given.update({k: v for k, v in (("name", a.name), ("out", a.out)) if v is not None})
    if a.requests:
        given["requests"] = {"tiny": a.requests, "paper": a.requests}
    if a.variant:
        given["variants"] = tuple(a.variant)
    if a.steps:
        given["steps"] = {"tiny": a.steps, "paper": a.steps}
    s = smoke_settings(**given) if a.smoke else ServeSettings(**given)
    print(json.dumps({k: v["serve"]["requests_per_s"] for k, v in run(s)["results"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
