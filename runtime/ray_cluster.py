"""The Ray side of batch jobs: a loopback-only local instance (or a user's cluster) and one
streaming map of rows over an actor pool (Ray Data).

Used by :mod:`hms_deploy.runtime.ray_batch` (classification and feature extraction);
nothing here knows about HMS.

**Local instance = loopback only.** Whoever reaches Ray's ports runs code (Ray 2.60
adds token authentication, but the token in ``~/.ray/auth_token`` is shared by every job
of the user), and a local instance normally binds its GCS, raylet and workers to the
machine's network address (and ``::`` for some ports), even with
``_node_ip_address="127.0.0.1"``. With ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` in the
environment *before Ray is imported* (Ray reads it into a constant at import), Ray
takes the single-machine path it uses on laptops: every port of the instance binds to
127.0.0.1 (Ray 2.60: GCS, raylet, runtime-env agent, driver and worker gRPC servers). :func:`ray_instance` sets it (also in the already-imported constant if Ray was
imported earlier; the child processes inherit the environment), starts Ray without the
dashboard, and ``tests/test_ray.py`` checks that no process of the instance listens on a
non-loopback address. A cluster given by address is the user's to secure.

**Nothing outlives the driver.** A local instance's GCS and raylet die with the driver
(Ray sets them to), but not its workers and agents. :func:`ray_instance` starts
:mod:`ray_reaper` beside a
local instance: when the driver ends, however (normal exit, exception, SIGTERM,
SIGKILL), it stops every process of the instance within seconds. SIGTERM stays the
caller's (Ray's core worker would install a handler that aborts the driver).

**Normal runs look normal.** Ray's own lines that every healthy run printed are not
shown: the notice that token authentication is on (Ray's default for a new local
instance, kept; its logger is quiet while the instance starts) and the driver's
``core_worker.cc`` error line about actor constructor arguments in the object store
with ``max_restarts > 0`` (Ray Data's actor pool always is so; a worker lost anyway is
retried by the pool): while the instance runs, the driver's stderr passes through a
filter that drops exactly those lines (:data:`QUIET_LINES`) and passes everything else.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from hms_deploy.errors import ConfigError, require_at_least

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
AUTH_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"
# Ray's lines on the driver's stderr that every healthy run prints (all fragments must occur)
QUIET_LINES = (
    (b"core_worker.cc", b"has constructor arguments in the object store", b"max_restarts > 0"),
)


@dataclass(frozen=True)
class RayLayout:
    """Where and how wide a job runs.

    ``address``: an existing cluster (``ray://host:10001`` or ``host:6379``; None = a
    loopback-only local instance on this machine, started for the job and stopped after
    it). ``workers``: actors in the pool (None = one per CPU of the cluster divided by
    ``threads_per_worker``, or one per GPU when ``gpus_per_worker`` > 0).
    ``threads_per_worker``: intra-op threads per actor (= CPUs it reserves).
    ``gpus_per_worker``: GPUs each actor reserves (1 on GPU machines: one actor per GPU).
    ``num_cpus``: CPUs of the local instance (None = all cores).
    """

    address: str | None = None
    workers: int | None = None
    threads_per_worker: int = 1
    gpus_per_worker: float = 0.0
    num_cpus: int | None = None

    def check(self) -> None:
        require_at_least("workers", self.workers, 1)
        require_at_least("threads_per_worker", self.threads_per_worker, 1)
        require_at_least("gpus_per_worker", self.gpus_per_worker, 0)


def import_ray(*, loopback: bool | None = None) -> Any:
    """``import ray`` (a typed error if Ray Data is missing).

    ``loopback=True``: set the single-machine switch (before a local instance starts).
    ``False``: undo it if this module set it (a driver that joins a cluster by address
    must advertise its real address). ``None``: leave it as it is.
    """
    global _switched
    if loopback:
        os.environ[LOOPBACK_ENV] = "0"
        _switched = True
    elif loopback is False and _switched:
        os.environ.pop(LOOPBACK_ENV, None)
        _switched = False
    try:
        import ray
        import ray.data
        from ray._private import ray_constants
    except ImportError as e:
        raise ConfigError(
            f"running on Ray needs Ray Data ({e}); install it with "
            "`pip install \"hms-deploy[ray]\"`", setting="ray") from None
    if loopback is not None:
        # Ray reads the switch once, at import: set the constant too if it was imported before.
        ray_constants.ENABLE_RAY_CLUSTER = ray_constants.env_bool(  # type: ignore[attr-defined,no-untyped-call]
            LOOPBACK_ENV, not ray_constants.IS_WINDOWS_OR_OSX)  # a private Ray helper, untyped
    return ray


_switched = False


@contextlib.contextmanager
def ray_instance(layout: RayLayout) -> Iterator[Any]:
    """Connect to ``layout.address``, reuse an initialised Ray, or start a loopback one.

    Yields the ``ray`` module. Only an instance started here is shut down on exit.
    """
    ray = import_ray()
    started = False
    reaper = None
    if ray.is_initialized():
        pass  # the caller's instance (e.g. a test fixture or an embedding service)
    elif layout.address:
        ray = import_ray(loopback=False)
        try:
            ray.init(address=layout.address, logging_level="WARNING", log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError) as e:
            hint = ("" if os.environ.get("RAY_AUTH_MODE") else
                    "; if the cluster uses token authentication (Ray's default for new "
                    "clusters), set RAY_AUTH_MODE=token and its token (RAY_AUTH_TOKEN or "
                    "~/.ray/auth_token)")
            raise ConfigError(
                f"Ray cluster {layout.address}: cannot connect ({e}){hint}",
                setting="ray_address", value=layout.address) from None
        started = True
    else:
        ray = import_ray(loopback=True)
        # Ray's default token auth for a new local instance, without its notice
        notice = logging.getLogger(AUTH_NOTICE_LOGGER)
        level = notice.level
        notice.setLevel(logging.ERROR)
        on_sigterm = signal.getsignal(signal.SIGTERM)
        try:
            # address="local": always a new instance, never a cluster that RAY_ADDRESS or
            # /tmp/ray/ray_current_cluster (written by `ray start`) points at
            ray.init(address="local", num_cpus=layout.num_cpus, include_dashboard=False,
                     logging_level="WARNING", log_to_driver=False,
                     _node_ip_address="127.0.0.1")
        finally:
            notice.setLevel(level)
        _restore_sigterm(on_sigterm)
        started = True
        reaper = _start_reaper(ray)
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # executor chatter; errors stay
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the job shows its own (videos done / failed / rate)
        ctx.print_on_execution_start = False
        with quiet_stderr():
            yield ray
    finally:
        if started:
            ray.shutdown()
        if reaper is not None:
            _stop_reaper(reaper)


def _restore_sigterm(handler: Any) -> None:
    """Give SIGTERM back to the handler it had before ``ray.init`` (Ray's core worker
    installs one that aborts the process: exit -6 instead of the caller's 143)."""
    if handler is None or threading.current_thread() is not threading.main_thread():
        return
    with contextlib.suppress(ValueError, OSError):
        signal.signal(signal.SIGTERM, handler)


def _start_reaper(ray: Any) -> subprocess.Popen[bytes] | None:
    """:mod:`ray_reaper` for the local instance just started (None where it cannot run)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        session = ray._private.worker._global_node.get_session_dir_path()
    except AttributeError:  # another Ray layout: no reaper (Ray's own clean-up only)
        return None
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ray_reaper.py")
    # stdin: a pipe only this process writes (not inherited: close-on-exec); EOF = gone
    return subprocess.Popen([sys.executable, "-I", script, session, str(os.getpid())],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _stop_reaper(reaper: subprocess.Popen[bytes], timeout: float = 8.0) -> None:
    """Close the reaper's pipe (it stops what ``ray.shutdown()`` left) and wait for it."""
    try:
        assert reaper.stdin is not None
        reaper.stdin.close()
        reaper.wait(timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        pass


def _quiet(line: bytes) -> bool:
    return any(all(part in line for part in parts) for parts in QUIET_LINES)


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Within the block, fd 2 of this process goes through a filter thread that drops the
    lines of :data:`QUIET_LINES` and passes everything else on at once (a line that
    could be one of them, starting with ``[``, waits for its end)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    read_end, write_end = os.pipe()

    def pump() -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(read_end, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            pending += chunk
            lines = pending.split(b"\n")
            pending = lines.pop()
            out = b"".join(ln + b"\n" for ln in lines if not _quiet(ln))
            if pending and not pending.startswith(b"["):
                out, pending = out + pending, b""
            if out:
                _write_all(saved, out)
        if pending and not _quiet(pending):
            _write_all(saved, pending)

    thread = threading.Thread(target=pump, name="ray-stderr-filter", daemon=True)
    thread.start()
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        yield
    finally:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(saved, 2)  # the pipe's last writer gone: the thread drains it and ends
        thread.join(timeout=2.0)
        os.close(read_end)
        os.close(saved)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    except OSError:
        pass


def pool_size(ray: Any, layout: RayLayout) -> int:
    """Actors for ``layout`` on the connected cluster (>= 1)."""
    if layout.workers is not None:
        return layout.workers
    res = ray.cluster_resources()
    if layout.gpus_per_worker > 0:
        gpus = int(res.get("GPU", 0) // layout.gpus_per_worker)
        if gpus < 1:
            raise ConfigError("a GPU layout was asked for but the Ray cluster has no GPU")
        return gpus
    return max(1, int(res.get("CPU", 1) // layout.threads_per_worker))


def map_rows(
    ray: Any,
    actor_cls: type,
    rows: Sequence[dict[str, Any]],
    layout: RayLayout,
    ctor_kwargs: dict[str, Any],
) -> Iterator[dict[str, Any]]:
    """Stream ``actor_cls(**ctor_kwargs)(batch)`` over ``rows``, one row per task: each
    call gets a batch of one row (numpy columns) and returns its output rows (a
    ``pyarrow.Table``, or columns Ray Data converts). Output rows come as dicts of Python
    values (``as_py``: a struct column a dict in field order).

    Each row must carry a unique int ``"index"``; every output row has it too. Rows
    come back as they finish (not in input order). The pool's actors are restarted and
    their tasks retried when a process dies (Ray Data's defaults: ``max_restarts=-1``,
    ``max_task_retries=-1``); a row that comes back twice (a retried task whose first
    result had already landed) is yielded once.
    """
    if not rows:
        return
    size = min(pool_size(ray, layout), len(rows))
    ds = ray.data.from_items(list(rows), override_num_blocks=len(rows))
    ds = ds.map_batches(
        actor_cls,
        batch_size=1,
        # one video in flight per actor: videos are seconds long, so the queue costs
        # nothing, and an actor that starts first cannot take a share of the others' work
        compute=ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=1),
        fn_constructor_kwargs=ctor_kwargs,
        num_cpus=layout.threads_per_worker,
        num_gpus=layout.gpus_per_worker or None,
        batch_format="numpy",
    )
    seen: set[int] = set()
    for row in ds.iter_rows():
        i = int(row["index"])
        if i in seen:
            continue
        seen.add(i)
        yield row


def actor_setup(threads: int, cwd: str | None) -> bool:
    """In an actor: ``threads`` intra-op threads for torch, quiet warnings, the driver's cwd.

    Returns whether the driver's working directory exists here (then relative paths
    mean what they meant to the driver; on other machines the driver sends absolute ones).
    """
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(threads)
    if cwd and os.path.isdir(cwd):
        os.chdir(cwd)
        return True
    return False
