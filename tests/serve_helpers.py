"""Starting ``hms-serve`` / ``tritonserver`` for tests, on loopback, and talking to them.

Every server is a child of the test process, bound to 127.0.0.1 on free ports, and
stopped (SIGTERM, then SIGKILL) by the context manager that started it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hms_deploy.runtime.serve.client import request_inputs

HOST = "127.0.0.1"


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_free(port: int) -> bool:
    """Nothing listens on ``port`` (SO_REUSEADDR: closed connections in TIME_WAIT don't count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (from /proc/PID/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            with contextlib.suppress(OSError):
                todo.extend(int(c) for c in (task / "children").read_text().split())
    return out


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").glob("*"):
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    return inodes


def _hex_addr(text: str, v6: bool) -> str:
    addr, port = text.split(":")
    raw = bytes.fromhex(addr)
    if v6:  # four little-endian 32-bit words
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
        return f"[{socket.inet_ntop(socket.AF_INET6, raw)}]:{int(port, 16)}"
    return f"{socket.inet_ntop(socket.AF_INET, raw[::-1])}:{int(port, 16)}"


def listening(pids: list[int]) -> list[str]:
    """``addr:port`` of every TCP socket in LISTEN state held by ``pids`` (/proc/net/tcp{,6})."""
    inodes = set().union(*(_socket_inodes(p) for p in pids))
    out = []
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                f = line.split()
                if f[3] == "0A" and f[9] in inodes:  # 0A = LISTEN
                    out.append(_hex_addr(f[1], v6))
    return out


def is_loopback(addr: str) -> bool:
    host = addr.rsplit(":", 1)[0].strip("[]")
    return host.startswith("127.") or host in ("::1", "::ffff:127.0.0.1")


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    http: int
    grpc: int
    metrics: int
    log: Path

    @property
    def http_url(self) -> str:
        return f"{HOST}:{self.http}"

    @property
    def grpc_url(self) -> str:
        return f"{HOST}:{self.grpc}"

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def ready(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/models/hms/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.log_tail()}")
            if self.ready():
                return
            time.sleep(0.25)
        raise RuntimeError(f"server not ready after {timeout_s} s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 40.0) -> int:
        """SIGTERM the server; every process it started must be gone afterwards."""
        tree = descendants(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                for p in tree:
                    with contextlib.suppress(OSError):
                        os.kill(p, signal.SIGKILL)
                self.proc.wait()
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{p}").exists() and _alive(p) for p in tree[1:]):
            if time.monotonic() > deadline:
                for p in tree[1:]:
                    with contextlib.suppress(OSError):
                        os.kill(p, signal.SIGKILL)
                break
            time.sleep(0.1)
        return self.proc.returncode


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@contextlib.contextmanager
def hms_serve(engines: Path, log: Path, *args: str) -> Iterator[Server]:
    """``hms-serve --engines ENGINES ARGS`` on free loopback ports, stopped on exit."""
    http, grpc, metrics = free_ports(3)
    cmd = [sys.executable, "-m", "hms_deploy.cli.serve", "--engines", str(engines),
           "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
           "--threads", "1", *args]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = Server(proc, http, grpc, metrics, log)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


inputs = request_inputs  # the shipped request builder (runtime/serve/client.py)


def record(result: Any) -> dict[str, Any]:
    return json.loads(result.as_numpy("record")[0, 0])
