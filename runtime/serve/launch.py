"""Run ``tritonserver`` on a model repository, every port bound to one host address.

The binary, its Python backend and the backend stubs come from the ``nvidia-pytriton``
wheel (``pip install hms-deploy[serve]``); ``HMS_TRITONSERVER=/path/to/tritonserver``
selects another build (its ``../backends`` is then used as is). What the wheel's
backend needs on a machine like this one (README.md, "Online serving"):

- a backend directory ``python/`` = the wheel's ``backends/python/*`` plus the stub
  built for this Python (``python_backend_stubs/3.X/triton_python_backend_stub``);
- ``LD_LIBRARY_PATH`` starting with this Python's ``LIBDIR`` (else the stub loads the
  system's libpython against this Python's stdlib and fails with ``'_thread.RLock'
  object has no attribute '_recursion_count'``), then the wheel's ``nvidia_pytriton.libs``
  (its bundled libcudart);
- the stub's embedded Python ignores ``PYTHONPATH`` and finds its prefix through the
  first ``python3`` on ``PATH``: with none from a virtual environment it runs the *base*
  interpreter with the base interpreter's packages (whose numpy may not read the
  stub's BYTES inputs correctly). ``PATH``
  therefore starts with this interpreter's folder, so the stub runs in this
  environment (its ``pyvenv.cfg``, its site-packages and ``.pth`` files);
- a shared-memory region name of its own for the stubs (``shm-region-prefix-name``):
  the default name is the same for every ``tritonserver`` on the machine (PyTriton
  sets a unique one for the same reason).

``python -m hms_deploy.runtime.serve.launch REPO [--host H] [--http-port P] ...`` execs
the server (what a repository's ``launch.sh`` runs); :class:`TritonProcess` is the same
for a caller that must stop it (``hms-serve``, tests, benchmarks).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from typing_extensions import Self

from hms_deploy.errors import BackendUnavailable, ConfigError, HMSError
from hms_deploy.runtime.serve import MODEL_NAME

EXIT_TIMEOUT_S = 20  # after SIGTERM Triton serves open connections this long, then exits


@dataclass(frozen=True)
class Endpoints:
    """Where the server listens (every port on ``host``)."""

    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002

    def check(self) -> None:
        ports = {"http_port": self.http_port, "grpc_port": self.grpc_port,
                 "metrics_port": self.metrics_port}
        for name, port in ports.items():
            if not 0 < port < 65536:
                raise ConfigError(f"{name} must be a TCP port (1-65535), got {port}", setting=name,
                                  value=port, expected="1-65535")
        if len(set(ports.values())) < len(ports):
            raise ConfigError("http_port, grpc_port and metrics_port must differ",
                              setting=tuple(ports), value=tuple(ports.values()))

    @property
    def probe_host(self) -> str:
        """The address a local client uses (a wildcard host is probed on loopback)."""
        return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)

    @property
    def http_url(self) -> str:
        h = self.probe_host
        return f"[{h}]:{self.http_port}" if ":" in h else f"{h}:{self.http_port}"


def _wheel_dir() -> Path | None:
    try:
        import pytriton
    except ImportError:
        return None
    d = Path(pytriton.__file__).parent / "tritonserver"
    return d if (d / "bin" / "tritonserver").is_file() else None


def tritonserver_binary() -> Path:
    """``$HMS_TRITONSERVER``, else the nvidia-pytriton wheel's binary, else ``tritonserver`` on PATH."""
    env = os.environ.get("HMS_TRITONSERVER")
    if env:
        if not Path(env).is_file():
            raise BackendUnavailable(f"HMS_TRITONSERVER='{env}' is not a file")
        return Path(env)
    wheel = _wheel_dir()
    if wheel is not None:
        return wheel / "bin" / "tritonserver"
    found = shutil.which("tritonserver")
    if found:
        return Path(found)
    raise BackendUnavailable(
        "tritonserver not found: install the serving extra (pip install 'hms-deploy[serve]'), "
        "or set HMS_TRITONSERVER to a tritonserver binary"
    )


def prepare_backends(dest: str | Path, binary: Path | None = None) -> Path:
    """A backend directory for ``binary``; for the wheel's server, built under ``dest``."""
    binary = binary or tritonserver_binary()
    wheel = _wheel_dir()
    if wheel is None or binary.resolve() != (wheel / "bin" / "tritonserver").resolve():
        return binary.resolve().parent.parent / "backends"  # a full install: /opt/tritonserver
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = wheel / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise BackendUnavailable(f"the nvidia-pytriton wheel has no Python backend stub for Python {version}")
    out = Path(dest) / "backends"
    py = out / "python"
    if (py / "triton_python_backend_stub").is_file():
        return out
    staging = Path(tempfile.mkdtemp(prefix=".backends-", dir=dest))
    shutil.copytree(wheel / "backends" / "python", staging / "python",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(stub, staging / "python" / "triton_python_backend_stub")
    try:
        staging.rename(out)
    except OSError:  # another process made it first
        shutil.rmtree(staging, ignore_errors=True)
    return out


def server_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment the server and its backend stubs need (see the module docstring)."""
    env = dict(os.environ if base is None else base)
    libs = []
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        libs.append(str(sysconfig.get_config_var("LIBDIR")))
    wheel = _wheel_dir()
    if wheel is not None:
        wheel_libs = wheel.parent.parent / "nvidia_pytriton.libs"
        if wheel_libs.is_dir():
            libs.append(str(wheel_libs))
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
    # the stub's embedded Python finds its prefix through "python3" on PATH: this
    # interpreter's folder first makes it a virtual environment's (pyvenv.cfg) Python
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def shm_prefix() -> str:
    """A shared-memory region prefix of this server's own (``hms<pid>-<random>_``)."""
    return f"hms{os.getpid()}-{secrets.token_hex(4)}_"


def server_command(repo: str | Path, ends: Endpoints, backends: Path, *, binary: Path | None = None,
                   log_verbose: int = 0, exit_timeout_s: int = EXIT_TIMEOUT_S,
                   shm_region_prefix: str | None = None) -> list[str]:
    """``tritonserver`` argv serving ``repo`` with HTTP, gRPC and metrics on ``ends.host``.

    The model is loaded at start and can be unloaded/loaded again through the repository
    API (``--model-control-mode=explicit``): :mod:`~hms_deploy.runtime.serve.health`
    reloads a model whose stub died.
    """
    binary = binary or tritonserver_binary()
    return [
        str(binary), f"--model-repository={Path(repo).resolve()}",
        f"--backend-directory={backends}",
        f"--http-address={ends.host}", f"--http-port={ends.http_port}",
        f"--grpc-address={ends.host}", f"--grpc-port={ends.grpc_port}",
        f"--metrics-address={ends.host}", f"--metrics-port={ends.metrics_port}",
        "--allow-gpu-metrics=false",
        f"--exit-timeout-secs={exit_timeout_s}",
        "--strict-readiness=true", "--exit-on-error=true",
        # hms-serve reloads a model whose stub died through the repository API
        "--model-control-mode=explicit", f"--load-model={MODEL_NAME}",
        # the stubs' shared-memory regions: a name of our own (the default one is shared
        # by every tritonserver on the machine; PyTriton makes its own unique too)
        f"--backend-config=python,shm-region-prefix-name={shm_region_prefix or shm_prefix()}",
        f"--log-verbose={log_verbose}",
    ]


# Triton's own lines that are not errors of this server: the CUDA driver helper on a
# machine without a GPU driver (every start), and the exit timeout expiring after a stop
# that hms-serve asked for (a client kept its connection open).
QUIET_ALWAYS = (b"CudaDriverHelper has not been initialized",)
QUIET_ON_CPU = (b"Unable to allocate pinned system memory",)  # no CUDA driver: expected
EXIT_TIMEOUT_LINE = b"failed to stop server: Internal - Exit timeout expired"


class TritonProcess:
    """A ``tritonserver`` child process; ``start()`` waits until model ``hms`` is ready.

    ``log``: where the server's output goes (a file, ``None`` = inherited); with
    ``filtered=True`` its lines pass through this process to ``sys.stderr`` and the
    lines holding one of ``quiet`` (and the exit-timeout line of a stop this process
    asked for) are left out. ``shm_prefix`` names the stubs' shared-memory regions
    (``/dev/shm/<prefix>*``, removed by :meth:`stop`).
    """

    def __init__(self, repo: str | Path, ends: Endpoints, *, workdir: str | Path,
                 log: IO[bytes] | int | None = None, exit_timeout_s: int = EXIT_TIMEOUT_S,
                 filtered: bool = False, quiet: tuple[bytes, ...] = QUIET_ALWAYS):
        self.exit_timeout_s = exit_timeout_s
        self.repo = Path(repo)
        self.ends = ends
        self.workdir = Path(workdir)
        self.log = log
        self.filtered = filtered
        self.quiet = quiet
        self.shm_prefix = shm_prefix()
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopping = False  # stop() was called: the exit is ours
        self.exit_timed_out = False  # Triton closed open connections at its exit timeout
        self._pump: threading.Thread | None = None

    def start(self, timeout_s: float = 120.0) -> TritonProcess:
        binary = tritonserver_binary()
        cmd = server_command(self.repo, self.ends, prepare_backends(self.workdir, binary),
                             binary=binary, exit_timeout_s=self.exit_timeout_s,
                             shm_region_prefix=self.shm_prefix)
        out = subprocess.PIPE if self.filtered else self.log
        err = subprocess.STDOUT if self.filtered else self.log
        self.proc = subprocess.Popen(cmd, env=server_env(), stdout=out, stderr=err,
                                     stdin=subprocess.DEVNULL)
        if self.filtered:
            self._pump = threading.Thread(target=self._forward, daemon=True,
                                          name="tritonserver-log")
            self._pump.start()
        self.wait_ready(timeout_s)
        return self

    def _forward(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        sink = sys.stderr.buffer
        for line in self.proc.stdout:
            if EXIT_TIMEOUT_LINE in line and self.stopping:
                self.exit_timed_out = True
                continue
            if any(q in line for q in self.quiet):
                continue
            with contextlib.suppress(OSError, ValueError):
                sink.write(line)
                sink.flush()

    def ready(self) -> bool:
        from hms_deploy.runtime.serve.health import ModelControl

        return ModelControl(self.ends.http_url).ready(timeout=2.0)

    def wait_ready(self, timeout_s: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HMSError(f"tritonserver exited with code {self.proc.returncode} before model "
                               f"'{MODEL_NAME}' was ready (see its log)")
            if self.ready():
                return
            time.sleep(0.25)
        self.stop()
        raise HMSError(f"model '{MODEL_NAME}' not ready after {timeout_s:.0f} s (see the server log)")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGTERM (Triton refuses new connections, serves the open ones until they close or
        its exit timeout passes), then SIGKILL after ``timeout_s`` (default: that + 5 s)."""
        if timeout_s is None:
            timeout_s = self.exit_timeout_s + 5
        if self.proc is None:
            return None
        self.stopping = True  # (a Ctrl-C reaches tritonserver too: it may be exiting already)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._pump is not None:
            self._pump.join(5)
        from hms_deploy.runtime.serve.health import sweep_shm

        sweep_shm(self.shm_prefix)  # a stub killed before its server leaves its region
        return self.proc.returncode

    def stopped_normally(self) -> bool:
        """The server exited on our stop: code 0, or 1 because its exit timeout closed
        connections that clients kept open."""
        code = None if self.proc is None else self.proc.returncode
        return self.stopping and (code == 0 or (code == 1 and self.exit_timed_out))

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="launch.sh", description="Serve a Triton model repository "
                                 "written by hms-export --triton-repo (every port on --host).")
    ap.add_argument("repo")
    default = Endpoints()
    ap.add_argument("--host", default=default.host)
    ap.add_argument("--http-port", type=int, default=default.http_port)
    ap.add_argument("--grpc-port", type=int, default=default.grpc_port)
    ap.add_argument("--metrics-port", type=int, default=default.metrics_port)
    ap.add_argument("--log-verbose", type=int, default=0)
    a = ap.parse_args(argv)
    repo = Path(a.repo)
    try:
        ends = Endpoints(a.host, a.http_port, a.grpc_port, a.metrics_port)
        ends.check()  # the options before the repository
        if not (repo / MODEL_NAME / "config.pbtxt").is_file():
            raise ConfigError(f"'{repo}' holds no {MODEL_NAME}/config.pbtxt (not a repository "
                              "written by hms-export --triton-repo)")
        binary = tritonserver_binary()
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hms-deploy" / (
            f"triton-py{sys.version_info[0]}.{sys.version_info[1]}")
        cache.mkdir(parents=True, exist_ok=True)
        cmd = server_command(repo, ends, prepare_backends(cache, binary), binary=binary,
                             log_verbose=a.log_verbose)
    except HMSError as e:
        print(f"launch: error: {e}", file=sys.stderr)
        return 1
    sys.stdout.flush()
    os.execve(cmd[0], cmd, server_env())
    return 0  # not reached


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
