"""Stops a local Ray instance's processes when its driver goes away, however it ends.

:func:`hms_deploy.runtime.ray_cluster.ray_instance` starts this file as a script
(``python -I ray_reaper.py SESSION_DIR DRIVER_PID``, standard library only, in its own
session so that a signal to the driver's process group does not stop it) with its stdin
a pipe whose writer is the driver. It follows the instance's processes: those whose
command line names the session directory (GCS, raylet, monitors, agents), the workers
whose ``RAY_RAYLET_PID`` is one of its raylets, and their children, each by pid and
start time (a pid reused by another program is never signalled). When the pipe closes
(the driver closed it after ``ray.shutdown()``, or died: exception, SIGTERM, SIGKILL)
or the driver's pid is gone, it sends SIGTERM to every one still running, SIGKILL after
:data:`GRACE_S`, and exits. Linux only (``/proc``).
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time

GRACE_S = 2.0  # SIGTERM -> SIGKILL
POLL_S = 0.25


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(ppid, start time in clock ticks, state) of ``pid``, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = data.rsplit(")", 1)[1].split()
    return int(fields[1]), int(fields[19]), fields[0]


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def scan(session: bytes, tracked: dict[int, int], raylets: set[bytes]) -> None:
    """Add the instance's live processes to ``tracked`` (pid -> start time)."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        if pid in tracked or pid == os.getpid():
            continue
        st = _stat(pid)
        if st is None:
            continue
        ppid, start, _ = st
        cmd = _read(f"/proc/{pid}/cmdline")
        mine = session in cmd or ppid in tracked
        if not mine and raylets:
            env = _read(f"/proc/{pid}/environ").split(b"\0")
            mine = any(v in env for v in raylets)
        if mine:
            tracked[pid] = start
            if cmd.split(b"\0", 1)[0].endswith(b"/raylet"):
                raylets.add(b"RAY_RAYLET_PID=%d" % pid)


def alive(tracked: dict[int, int]) -> list[int]:
    """The tracked pids still running (the same process: same start time; not a zombie)."""
    out = []
    for pid, start in tracked.items():
        st = _stat(pid)
        if st is not None and st[1] == start and st[2] != "Z":
            out.append(pid)
    return out


def stop(tracked: dict[int, int]) -> None:
    """SIGTERM every tracked process, SIGKILL whatever is left after :data:`GRACE_S`."""
    for sig, wait in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, GRACE_S)):
        pids = alive(tracked)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + wait
        while pids and time.monotonic() < deadline:
            time.sleep(0.05)
            pids = alive(tracked)
        if not pids:
            return


def main(argv: list[str]) -> int:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    session, driver = os.fsencode(argv[1]), int(argv[2])
    driver_stat = _stat(driver)
    tracked: dict[int, int] = {}
    raylets: set[bytes] = set()
    while True:
        scan(session, tracked, raylets)
        ready, _, _ = select.select([0], [], [], POLL_S)
        if ready and not os.read(0, 4096):
            break  # the driver closed the pipe, or died
        st = _stat(driver)
        if driver_stat is None or st is None or st[1] != driver_stat[1] or st[2] == "Z":
            break
    scan(session, tracked, raylets)
    stop(tracked)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
