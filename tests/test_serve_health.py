"""``hms-serve`` heals and stops cleanly: a killed backend stub under load, a model that cannot
be reloaded, ``tritonserver`` dying, a stop with a client connection open (real Triton,
loopback only; every loop bounded, every server stopped by its fixture)."""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("pytriton")
pytest.importorskip("tritonclient.http")

import tritonclient.http as thttp
from runtime_helpers import assets, one_torch_thread  # noqa: F401 - autouse fixture
from serve_helpers import HOST, Server, descendants, hms_serve, inputs, record

from hms_deploy.runtime.serve.health import stub_pids, sweep_stale

ROOT = Path(__file__).resolve().parents[1]
SHM = Path("/dev/shm")


def documented_probes(port: int) -> dict[str, list[str]]:
    """The exec probes of docs/serving.md (liveness, readiness), aimed at ``port``."""
    text = (ROOT / "docs" / "serving.md").read_text()
    out = {}
    for kind in ("liveness", "readiness"):
        m = re.search(kind + r'Probe:\s*\n\s*exec:\s*\n\s*command: (\[.*\])', text)
        assert m, f"docs/serving.md has no {kind}Probe exec command"
        import json

        cmd = json.loads(m.group(1).replace(":8000/", f":{port}/"))
        assert cmd[0] == "python"
        out[kind] = [sys.executable, *cmd[1:]]
    return out


def probe(cmd: list[str]) -> int:
    return subprocess.run(cmd, check=False, capture_output=True, timeout=30).returncode


def triton_of(server: Server) -> tuple[int, Path, str]:
    """tritonserver's pid, hms-serve's workspace and the stubs' shared-memory prefix."""
    for pid in descendants(server.proc.pid)[1:]:
        with contextlib.suppress(OSError):
            args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
            if Path(args[0]).name == "tritonserver":
                repo = next(a.split("=", 1)[1] for a in args if a.startswith("--model-repository="))
                prefix = next(a.split("shm-region-prefix-name=", 1)[1] for a in args
                              if "shm-region-prefix-name=" in a)
                return pid, Path(repo).parent, prefix
    raise AssertionError("no tritonserver below hms-serve")


def http_ready(server: Server) -> bool:
    return server.ready()


def wait_serving(log: Path) -> None:
    """Until hms-serve itself says the model is ready (it polls after the test's client)."""
    for _ in range(600):  # bounded: 60 s
        if "hms-serve: model 'hms' ready" in log.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise AssertionError("hms-serve never said the model is ready: "
                         + log.read_text(errors="replace")[-2000:])


def recovery_budget_s() -> float:
    """30 s on a machine whose CPUs are not oversubscribed; on a shared machine with more
    runnable work than cores, 30 s times the oversubscription (a reload is a fresh stub
    importing torch and opening the engines: CPU-bound)."""
    return 30.0 * max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))


def e_lines(log: Path) -> list[str]:
    return [ln for ln in log.read_text(errors="replace").splitlines() if re.match(r"E\d{4} ", ln)]


def stray_uploads(before: set[str]) -> list[str]:
    """Upload files of hms-serve in the temp dir outside its workspaces (the old layout)."""
    tmp = Path(tempfile.gettempdir())
    return [str(f) for d in tmp.glob("hms-serve-*") if d.name not in before
            for f in d.glob("r*-*")]


def test_killed_stub_under_load_is_reloaded_and_probes_say_so(tmp_path):
    """SIGKILL of the backend stub while 4 clients upload: readiness false in between,
    requests succeed again within 30 s, one log line, no upload or shared memory left;
    then a SIGTERM with a client connection open is a normal stop (exit 0, no E-lines)."""
    a = assets()
    data = a.video.read_bytes()
    tmp_before = {d.name for d in Path(tempfile.gettempdir()).glob("hms-serve-*")}
    log = tmp_path / "log"
    with hms_serve(a.engines, log, "--drain-s", "1", "--exit-timeout-s", "6") as s:
        wait_serving(log)
        probes = documented_probes(s.http)
        assert probe(probes["liveness"]) == 0 and probe(probes["readiness"]) == 0
        triton, work, prefix = triton_of(s)
        results: list[tuple[float, float, bool]] = []  # (sent, finished, answered)
        stop = threading.Event()

        def client() -> None:
            h = thttp.InferenceServerClient(s.http_url, network_timeout=120)
            for _ in range(2000):  # bounded; stopped by the event long before
                if stop.is_set():
                    break
                sent = time.monotonic()
                try:
                    rec = record(h.infer("hms", inputs(thttp, video=data, name="clip.mp4")))
                    ok = rec["video"] == "clip.mp4"
                except Exception:  # noqa: BLE001 - failures while the stub is dead are expected
                    ok = False
                    time.sleep(1.0)  # a client retrying
                results.append((sent, time.monotonic(), ok))
            h.close()

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120
        while sum(ok for *_, ok in results) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        stubs = stub_pids(triton)
        assert len(stubs) == 1, stubs
        budget = recovery_budget_s()
        t_kill = time.monotonic()
        os.kill(stubs[0], signal.SIGKILL)
        ready_samples: list[tuple[float, bool]] = []
        probed_unready = None
        while time.monotonic() < t_kill + budget + 15:
            r = http_ready(s)
            ready_samples.append((time.monotonic(), r))
            if not r and probed_unready is None:
                probed_unready = (probe(probes["readiness"]), probe(probes["liveness"]))
            if any(ok and sent > t_kill for sent, _, ok in results):
                break
            time.sleep(0.1)
        stop.set()
        for t in threads:
            t.join(120)
        recovered = [fin for sent, fin, ok in results if ok and sent > t_kill]
        assert recovered, s.log_tail()
        lines = [ln for ln in log.read_text().splitlines() if "was unhealthy" in ln]
        assert min(recovered) - t_kill < budget, (min(recovered) - t_kill, budget, lines)
        assert any(not r for _, r in ready_samples), "readiness never went false"
        assert probed_unready == (1, 0)  # readiness probe fails, liveness holds
        assert s.ready() and probe(probes["readiness"]) == 0
        assert len(lines) == 1 and "reloaded in" in lines[0], lines
        # nothing of the dead stub is left: no upload, one region (the new stub's)
        for _ in range(100):  # the cleanup runs in hms-serve's watchdog: bounded, 10 s
            if (not list((work / "uploads").rglob("*.mp4"))
                    and len(list(SHM.glob(f"{prefix}*"))) == 1):
                break
            time.sleep(0.1)
        assert not list((work / "uploads").rglob("*.mp4"))
        assert len(list(SHM.glob(f"{prefix}*"))) == 1, list(SHM.glob(f"{prefix}*"))
        assert not stray_uploads(tmp_before)
        # a normal stop with a client connection open
        conn = http.client.HTTPConnection(HOST, s.http, timeout=10)
        conn.request("GET", "/v2/health/live")
        assert conn.getresponse().read() is not None
        s.proc.send_signal(signal.SIGTERM)
        code = s.proc.wait(60)
        conn.close()
    text = log.read_text(errors="replace")
    assert code == 0, text[-3000:]
    assert not e_lines(log), e_lines(log)
    assert "exit code 1" not in text and "hms-serve: stopped" in text
    assert not work.exists()
    assert not list(SHM.glob(f"{prefix}*"))


def test_model_that_cannot_be_reloaded_exits_5(tmp_path):
    engines = tmp_path / "engines"
    shutil.copytree(assets().engines, engines)
    log = tmp_path / "log"
    with hms_serve(engines, log) as s:
        triton, work, prefix = triton_of(s)
        wait_serving(log)
        (engines / "manifest.json").unlink()  # every reload now fails
        os.kill(stub_pids(triton)[0], signal.SIGKILL)
        code = s.proc.wait(120)
    text = log.read_text(errors="replace")
    assert code == 5, text[-3000:]
    assert len(re.findall(r"reload [123]/3 failed", text)) == 3, text[-3000:]
    assert "hms-serve: error: model 'hms' could not be reloaded 3 times in a row" in text
    assert not work.exists() and not list(SHM.glob(f"{prefix}*"))
    table = (ROOT / "docs" / "commands.md").read_text()
    assert re.search(r"^\| 5 \| `hms-serve`", table, re.MULTILINE)


def test_tritonserver_dying_exits_4(tmp_path):
    log = tmp_path / "log"
    with hms_serve(assets().engines, log) as s:
        triton, work, prefix = triton_of(s)
        wait_serving(log)
        os.kill(triton, signal.SIGKILL)
        code = s.proc.wait(60)
    text = log.read_text(errors="replace")
    assert code == 4, text[-3000:]
    assert "hms-serve: error: tritonserver exited unexpectedly" in text
    assert not work.exists() and not list(SHM.glob(f"{prefix}*"))
    assert re.search(r"^\| 4 \| `hms-serve`", (ROOT / "docs" / "commands.md").read_text(), re.MULTILINE)


def test_startup_sweep_removes_only_dead_servers_workspaces(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone, mine, foreign = (tmp_path / f"hms-serve-{n}" for n in ("dead", "live", "nopid"))
    for d in (gone, mine, foreign):
        (d / "uploads").mkdir(parents=True)
        (d / "uploads" / "r0-0.mp4").write_bytes(b"x")
    prefix = f"hmstest{os.getpid()}-sweep_"
    region = SHM / f"{prefix}abc"
    region.write_bytes(b"\0" * 16)
    (gone / "pid").write_text(f"{dead.pid} {prefix}\n")
    (mine / "pid").write_text(f"{os.getppid()} hmstest-none_\n")
    try:
        assert sweep_stale(tmp_path) == 1
        assert not gone.exists() and mine.exists() and foreign.exists()
        assert not region.exists()
    finally:
        region.unlink(missing_ok=True)
