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
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench_soak import rss_kb, serve_processes
from benchmarks.common import (
    RESULTS_DIR,
    ensure_model,
    free_ports,
    header_lines,
    provenance,
    write_json,
)


def _status(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
            k, v = line.split(":")
            out[k] = round(int(v.split()[0]) / 1024, 1)
    return out


def run(requests: int, clients: int, upload_mb: float, arena: int | None, name: str) -> dict[str, Any]:
    import tritonclient.grpc as tgrpc
    from tritonclient.utils import InferenceServerException

    prov = provenance("cpu")
    _, engines = ensure_model("tiny", log=print)
    http, grpc, metrics = free_ports(3)
    env = dict(os.environ)
    if arena:
        env["MALLOC_ARENA_MAX"] = str(arena)
    cmd = [sys.executable, "-m", "hms_deploy.cli.serve", "--engines", str(engines), "--threads",
           "1", "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
           "--max-upload-mb", str(2 * upload_mb), "--drain-s", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"127.0.0.1:{grpc}"
    samples: list[dict[str, Any]] = []
    try:
        for _ in range(600):  # bounded wait for the model
            with contextlib.suppress(Exception):  # not up yet
                if tgrpc.InferenceServerClient(url).is_model_ready("hms"):
                    break
            time.sleep(0.5)
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
                x = tgrpc.InferInput("video", [1, 1], "BYTES")
                x.set_data_from_numpy(np.array([[data]], dtype=object))
                try:
                    c.infer("hms", [x], client_timeout=300)
                except InferenceServerException:
                    pass  # refused: not a video
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
        split = _status(serve_processes(proc.pid)["tritonserver"])
    finally:
        proc.terminate()
        proc.wait(60)
    key = "tritonserver_rss_mb"
    growth = round((samples[-1][key] - samples[-2][key]) / samples[-2][key], 4) if len(samples) > 2 else None
    out = {"provenance": prov, "requests": requests, "clients": clients, "upload_mb": upload_mb,
           "malloc_arena_max": arena, "samples": samples, "tritonserver_split_mb": split,
           "tritonserver_last_fifth_growth": growth,
           "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]}
    write_json(RESULTS_DIR / f"{name}.json", out)
    lines = [(f"# tritonserver RSS under {requests} uploads of {upload_mb} MiB from {clients} clients "
             f"(MALLOC_ARENA_MAX={arena or 'unset'})"), "", *header_lines(prov),
             f"- load average at end: {out['loadavg_at_end']}", "",
             "| done | elapsed s | hms-serve MB | tritonserver MB | stub MB |",
             "| ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {s['done']} | {s['elapsed_s']} | {s.get('hms-serve_rss_mb')} | {s.get(key)} | "
              f"{s.get('stub_rss_mb')} |" for s in samples]
    lines += ["", f"tritonserver at the end: {split}; growth over the last fifth: {growth}."]
    (RESULTS_DIR / f"{name}.md").write_text("\n".join(lines) + "\n")
    print(json.dumps({"samples": samples, "split": split}))
    return out


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
