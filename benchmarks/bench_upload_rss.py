"""Resident memory of ``tritonserver`` and the stub under large uploads (loopback).

``clients`` gRPC clients send ``requests`` uploads of ``upload_mb`` MiB of random bytes
in total (not a video: each is refused after it crossed HTTP/gRPC, the server's request
buffers and the stub's shared memory, and no decode time hides the transport); RSS of
``hms-serve``, ``tritonserver`` and the stub after every fifth of the requests, and the
split of ``tritonserver``'s RSS (heap, files, shared memory) at the end. With
``--malloc-arena-max N`` the server runs with glibc's ``MALLOC_ARENA_MAX=N``.

    python -m benchmarks.bench_upload_rss --requests 300 --upload-mb 13
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench_serve import start_serve
from benchmarks.bench_soak import rss_kb, serve_processes
from benchmarks.common import (
    RESULTS_DIR,
    ensure_model,
    header_lines,
    loadavg,
    proc_status_kb,
    provenance,
    write_report,
)
from hms_deploy.runtime.serve.client import request_inputs


def run(requests: int, clients: int, upload_mb: float, arena: int | None, name: str) -> dict[str, Any]:
    import tritonclient.grpc as tgrpc
    from tritonclient.utils import InferenceServerException

    prov = provenance("cpu")
    _, engines = ensure_model("tiny", log=print)
    env = dict(os.environ)
    if arena:
        env["MALLOC_ARENA_MAX"] = str(arena)
    args = ["--threads", "1", "--max-upload-mb", str(2 * upload_mb)]
    samples: list[dict[str, Any]] = []
    failed: list[str] = []  # answers other than the refusal of a non-video
    with tempfile.TemporaryDirectory(prefix="bench-upload-") as work, \
            start_serve(engines, Path(work), args, env) as (proc, url):
        data = np.random.default_rng(0).bytes(int(upload_mb * 2**20))
        done = [0]
        lock = threading.Lock()
        t0 = time.monotonic()

        def sample() -> None:
            pids = serve_processes(proc.pid)
            samples.append({"done": done[0], "elapsed_s": round(time.monotonic() - t0, 1),
                            **{f"{k}_rss_mb": round((rss_kb(p) or 0) / 1024, 1)
                               for k, p in pids.items()}})

        def client(n: int) -> None:
            c = tgrpc.InferenceServerClient(url)
            for _ in range(n):
                try:
                    c.infer("hms", request_inputs(tgrpc, video=data),
                            client_timeout=300)
                except InferenceServerException as e:
                    if "INVALID_ARGUMENT" not in str(e.status()):  # refused: not a video
                        failed.append(" ".join(str(e).split())[:200])
                with lock:
                    done[0] += 1
                    if done[0] % max(1, requests // 5) == 0:
                        sample()

        sample()
        threads = [threading.Thread(target=client, args=(requests // clients,)) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        split = {k: round(v / 1024, 1) for k, v in proc_status_kb(
            serve_processes(proc.pid)["tritonserver"], "RssAnon", "RssFile", "RssShmem").items()}
    key = "tritonserver_rss_mb"
    growth = round((samples[-1][key] - samples[-2][key]) / samples[-2][key], 4) if len(samples) > 2 else None
    out = {"provenance": prov, "requests": requests, "clients": clients, "upload_mb": upload_mb,
           "malloc_arena_max": arena, "server_args": args, "samples": samples,
           "tritonserver_split_mb": split, "tritonserver_last_fifth_growth": growth,
           "failed_other": len(failed), "failed_examples": failed[:5],
           "loadavg_at_end": loadavg()}
    write_report(RESULTS_DIR / f"{name}.json", out, markdown)
    print(json.dumps({"samples": samples, "split": split}))
    return out


def markdown(out: dict[str, Any]) -> str:
    key = "tritonserver_rss_mb"
    lines = [(f"# tritonserver RSS under {out['requests']} uploads of {out['upload_mb']} MiB from "
              f"{out['clients']} clients (MALLOC_ARENA_MAX={out['malloc_arena_max'] or 'unset'})"),
             "", *header_lines(out["provenance"]),
             f"- load average at end: {out['loadavg_at_end']}"]
    if "server_args" in out:
        lines += [(f"- uploads: random bytes (not a video: each refused with INVALID_ARGUMENT); "
                   f"hms-serve {' '.join(out['server_args'])}; other failures: "
                   f"{out['failed_other']}")]
    lines += ["", "| done | elapsed s | hms-serve MB | tritonserver MB | stub MB |",
              "| ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {s['done']} | {s['elapsed_s']} | {s.get('hms-serve_rss_mb')} | {s.get(key)} | "
              f"{s.get('stub_rss_mb')} |" for s in out["samples"]]
    lines += ["", (f"tritonserver at the end: {out['tritonserver_split_mb']}; growth over the "
                   f"last fifth: {out['tritonserver_last_fifth_growth']}.")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--upload-mb", type=float, default=13.0)
    ap.add_argument("--malloc-arena-max", type=int, default=None)
    ap.add_argument("--name", default="upload_rss_cpu_tiny")
    a = ap.parse_args(argv)
    run(a.requests, a.clients, a.upload_mb, a.malloc_arena_max, a.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
