"""Watching model ``hms`` inside a running ``tritonserver`` and reloading it when it breaks.

The Python backend runs each model instance in a *stub* process (a child of
``tritonserver`` named ``triton_python_backend_stub``). When a stub dies (killed, out of
memory), Triton keeps answering ``/v2/health/ready`` and ``/v2/models/hms/ready`` with
200 while every request fails with ``Stub process 'hms_0_0' is not healthy``.
:class:`Watchdog` checks, every poll, that the model is READY and has one live stub per
instance; when it does not, it

1. unloads the model through Triton's repository API (``tritonserver`` runs with
   ``--model-control-mode=explicit``): from then on both readiness endpoints answer
   400 and requests are refused (unknown model) instead of failing one by one;
2. loads the model again (a fresh stub, the engines opened again; Triton finishes
   unloading an instance whose stub died only then) and logs one line;
3. removes what the dead stub left: its upload folders (``hms-serve-<stub pid>-*``) and
   its shared-memory region (``/dev/shm/<prefix>*`` that no live stub maps; the prefix
   is the server's own).

A failed reload is retried at the next poll; after :data:`MAX_FAILURES` failures in a row
:meth:`Watchdog.poll` raises :class:`RecoveryFailed` (``hms-serve`` then exits with its
"recovery failed" code so that a supervisor restarts it).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from hms_deploy.errors import HMSError
from hms_deploy.runtime.serve import MODEL_NAME

STUB_COMM = "triton_python_b"  # /proc/PID/comm of triton_python_backend_stub (15 chars)
MAX_FAILURES = 3  # reloads that fail in a row before hms-serve gives up
SHM_DIR = Path("/dev/shm")


class ServerDied(HMSError):
    """``tritonserver`` exited while it should have been serving."""


class RecoveryFailed(HMSError):
    """The model could not be reloaded :data:`MAX_FAILURES` times in a row."""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def stub_pids(server_pid: int) -> list[int]:
    """Live backend stub processes among the children of ``server_pid`` (Linux /proc)."""
    out = []
    for task in Path(f"/proc/{server_pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                with contextlib.suppress(OSError):
                    comm = Path(f"/proc/{child}/comm").read_text().strip()
                    if comm == STUB_COMM and _alive(int(child)):
                        out.append(int(child))
    return out


def _mapped(pid: int) -> set[str]:
    """Names of the /dev/shm files that process ``pid`` maps."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return set()
    return {line.rsplit("/", 1)[1].split()[0] for line in maps.splitlines()
            if f" {SHM_DIR}/" in line}


def sweep_shm(prefix: str, keep: list[int] | tuple[int, ...] = ()) -> list[str]:
    """Remove the shared-memory regions named ``prefix*`` that none of the processes
    ``keep`` (the live stubs) maps; their names."""
    gone: list[str] = []
    if not prefix:
        return gone
    kept = set().union(*(_mapped(p) for p in keep)) if keep else set()
    for f in SHM_DIR.glob(f"{prefix}*"):
        if f.name in kept:
            continue
        with contextlib.suppress(OSError):
            f.unlink()
            gone.append(f.name)
    return gone


def sweep_uploads(folder: Path | None) -> None:
    """Remove the batch folders of ``folder`` whose stub is gone (named ``hms-serve-<pid>-*``
    by the handler); a live stub's running batch keeps its uploads."""
    if folder is None or not folder.is_dir():
        return
    for entry in folder.iterdir():
        parts = entry.name.split("-")
        if len(parts) > 2 and parts[2].isdigit() and _alive(int(parts[2])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()


class ModelControl:
    """Triton's HTTP health and repository endpoints for one model (``base`` = host:port)."""

    def __init__(self, base: str, model: str = MODEL_NAME):
        self.base = f"http://{base}"
        self.model = model

    def _call(self, path: str, *, post: bool = False, timeout: float = 5.0) -> tuple[int, bytes]:
        req = urllib.request.Request(self.base + path, data=b"{}" if post else None,
                                     method="POST" if post else "GET")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except (urllib.error.URLError, OSError) as e:
            return 0, str(e).encode()

    def ready(self, timeout: float = 5.0) -> bool:
        return self.answer_ready(timeout) is True

    def answer_ready(self, timeout: float = 5.0) -> bool | None:
        """Whether the model says it is ready; None when the server did not answer."""
        code = self._call(f"/v2/models/{self.model}/ready", timeout=timeout)[0]
        return None if code == 0 else code == 200

    def unload(self, timeout_s: float = 5.0) -> bool:
        """Ask Triton to unload; True once the model no longer says READY. (An instance whose
        stub died finishes unloading only when the model is loaded again: no waiting for it.)"""
        code, _ = self._call(f"/v2/repository/models/{self.model}/unload", post=True,
                             timeout=timeout_s)
        deadline = time.monotonic() + timeout_s
        while code == 200 and time.monotonic() < deadline:
            if self.answer_ready() is False:
                return True
            time.sleep(0.05)
        return False

    def load(self, timeout_s: float = 120.0) -> str | None:
        """Load (blocks until loaded); None on success, else Triton's message."""
        code, body = self._call(f"/v2/repository/models/{self.model}/load", post=True,
                                timeout=timeout_s)
        if code == 200 and self.ready():
            return None
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            return str(json.loads(body).get("error") or f"HTTP {code}")
        return body.decode(errors="replace")[:300] or f"HTTP {code}"


class Watchdog:
    """Checks the model's health each :meth:`poll` and reloads it when it is unhealthy.

    ``server_pid``: a callable giving tritonserver's pid (None when not running);
    ``instances``: stubs the model runs; ``upload_dir`` and ``shm_prefix``: what a dead
    stub leaves behind; ``log``: one line per event; ``stopping``: true once the server
    is being stopped (a model unloading then is no fault, and is not reloaded).
    """

    def __init__(self, control: ModelControl, server_pid: Callable[[], int | None], *,
                 instances: int, upload_dir: Path | None, shm_prefix: str,
                 log: Callable[[str], None], max_failures: int = MAX_FAILURES,
                 stopping: Callable[[], bool] = lambda: False):
        self.control = control
        self.server_pid = server_pid
        self.instances = instances
        self.upload_dir = upload_dir
        self.shm_prefix = shm_prefix
        self.log = log
        self.max_failures = max_failures
        self.failures = 0
        self.recoveries = 0
        self.stopping = stopping
        self.not_ready = 0  # polls in a row on which Triton answered "not ready"

    def problem(self) -> str | None:
        """Why the model is unhealthy now, or None."""
        pid = self.server_pid()
        if pid is None or self.stopping():
            return None  # the caller sees the server itself exit / stops it
        stubs = len(stub_pids(pid))
        if stubs < self.instances:
            if stubs == 0 and self.instances == 1:
                return "its backend stub process exited"
            return f"{self.instances - stubs} of its {self.instances} backend stub processes exited"
        ready = self.control.answer_ready()  # no answer (a busy machine) is not a fault
        self.not_ready = self.not_ready + 1 if ready is False else 0
        if self.not_ready >= 2:  # twice in a row: not a model caught between two states
            return "Triton reports it not ready"
        return None

    def recover(self, why: str) -> bool:
        """Unload, clean up, load again; True when the model is ready again."""
        t = time.monotonic()
        self.control.unload()
        sweep_uploads(self.upload_dir)  # the dead stubs' batches
        if self.stopping():
            return True
        error = self.control.load()
        pid = self.server_pid()
        stubs = stub_pids(pid) if pid is not None else []
        sweep_uploads(self.upload_dir)  # and those of stubs finalized meanwhile
        sweep_shm(self.shm_prefix, keep=stubs)  # every region no live stub maps
        took = time.monotonic() - t
        if error is None and not self.problem():
            self.failures = 0
            self.recoveries += 1
            self.log(f"model '{self.control.model}' was unhealthy ({why}): reloaded in {took:.1f} s")
            return True
        self.failures += 1
        self.log(f"model '{self.control.model}' was unhealthy ({why}): reload "
                 f"{self.failures}/{self.max_failures} failed after {took:.1f} s"
                 f"{f' ({error})' if error else ''}")
        return False

    def poll(self) -> None:
        """One check (and a recovery if needed); RecoveryFailed after too many failures."""
        why = self.problem()
        if why is None:
            return
        if not self.recover(why) and self.failures >= self.max_failures:
            raise RecoveryFailed(f"model '{self.control.model}' could not be reloaded "
                                 f"{self.failures} times in a row ({why})")


def stale_workspaces(parent: Path, prefix: str = "hms-serve-") -> list[Path]:
    """Workspaces of ``hms-serve`` processes that are gone (their ``pid`` file names a dead pid)."""
    out = []
    for d in parent.glob(f"{prefix}*"):
        pid_file = d / "pid"
        try:
            pid = int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        if pid != os.getpid() and not _alive(pid):
            out.append(d)
    return out


def sweep_stale(parent: Path, prefix: str = "hms-serve-") -> int:
    """Remove dead servers' workspaces (and their shared-memory regions); how many."""
    n = 0
    for d in stale_workspaces(parent, prefix):
        with contextlib.suppress(OSError, IndexError):
            sweep_shm((d / "pid").read_text().split()[1])
        shutil.rmtree(d, ignore_errors=True)
        n += 1
    return n
