"""A ``--ray`` driver's end, on a real loopback-only local Ray instance in a child process:
whatever the exit (normal, exception, SIGTERM, SIGKILL), every process of its instance is
gone within 10 s; and a normal run's stderr holds none of Ray's own warnings or E-lines.

The instance's processes are found independently of the library: every process whose
working directory is the driver's own (a fresh folder; Ray's GCS, raylet, agents and
workers inherit it, and the actors change into it), watched while the job runs.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from runtime_helpers import assets, make_videos

pytest.importorskip("ray.data", reason="the [ray] extra is not installed")
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

LIMIT_S = 10.0

_EXCEPTION_DRIVER = """
import sys
from hms_deploy.runtime.ray_batch import RayLayout, classify_ray
videos, engines = sys.argv[2:], sys.argv[1]
for rec in classify_ray(videos, engines_dir=engines, layout=RayLayout(workers=2)):
    print("record", flush=True)
    raise RuntimeError("the caller failed")
"""


def _start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[19])  # a zombie counts as gone


def _in(cwd: Path, exclude: int) -> dict[int, int]:
    """Processes (pid -> start time) whose working directory is ``cwd``."""
    found = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) not in (exclude, os.getpid()):
            try:
                if os.readlink(f"/proc/{name}/cwd") == str(cwd):
                    start = _start_time(int(name))
                    if start is not None:
                        found[int(name)] = start
            except OSError:
                continue
    return found


def _alive(procs: dict[int, int]) -> list[int]:
    return [pid for pid, start in procs.items() if _start_time(pid) == start]


def _driver(kind: str, cwd: Path, videos: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("RAY_ADDRESS", None)
    engines = str(assets().engines)
    if kind == "exception":
        cmd = [sys.executable, "-c", _EXCEPTION_DRIVER, engines, *videos]
    else:
        cmd = [sys.executable, "-m", "hms_deploy.cli.run", *videos, "--engines", engines,
               "--ray", "--workers", "2", "--output", str(cwd / "out.jsonl"), "--no-progress"]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("kind", ["normal", "exception", "sigterm", "sigkill"])
def test_ray_processes_are_gone_within_10_s_of_the_driver(tmp_path, kind):
    videos = [str(v) for v in make_videos(tmp_path / "videos", 4)]
    cwd = tmp_path / "driver"
    cwd.mkdir()
    proc = _driver(kind, cwd, videos)
    seen: dict[int, int] = {}
    out = cwd / "out.jsonl"
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            seen.update(_in(cwd, proc.pid))
            if kind in ("sigterm", "sigkill") and out.exists() and out.read_text().count("\n"):
                break  # the actors are up and classifying
            time.sleep(0.1)
        assert time.monotonic() < deadline, "the job did not get going"
        if kind in ("sigterm", "sigkill"):
            assert proc.poll() is None, proc.communicate()
            seen.update(_in(cwd, proc.pid))
            proc.send_signal(signal.SIGTERM if kind == "sigterm" else signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    ended = time.monotonic()
    assert proc.returncode == {"normal": 0, "exception": 1, "sigterm": 143,
                               "sigkill": -signal.SIGKILL}[kind], stderr
    if kind == "exception":
        assert "record" in stdout and "RuntimeError: the caller failed" in stderr
    assert len(seen) >= 3, f"the instance's processes were not seen: {seen}"
    left = _alive(seen)
    while left and time.monotonic() - ended < 30:
        time.sleep(0.1)
        left = _alive(seen)
    took = time.monotonic() - ended
    print(f"{kind}: {len(seen)} processes of the instance, all gone {took:.1f} s after the "
          "driver's exit" if not left else f"{kind}: {len(left)} of {len(seen)} still alive")
    assert not left and took <= LIMIT_S, (
        f"{len(_alive(seen))} of {len(seen)} Ray processes alive {took:.1f} s after the "
        f"driver's {kind} exit")
    if kind == "normal":
        _assert_quiet(stderr)


def _assert_quiet(stderr: str) -> None:
    """A normal --ray run: only hms-run's own lines, none of Ray's warnings or E-lines."""
    assert "Token authentication" not in stderr and "core_worker.cc" not in stderr, stderr
    ray_lines = [ln for ln in stderr.splitlines()
                 if re.match(r"^\[?\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d", ln) or " WARNING " in ln]
    assert ray_lines == [], stderr
    assert all(ln.startswith("hms-run: ") for ln in stderr.splitlines()), stderr
