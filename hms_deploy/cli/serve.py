"""``hms-serve``: Triton Inference Server with one model, ``hms``, over an export.

Writes a model repository (engines referenced in place) into a temporary workspace,
starts ``tritonserver`` on it with every port (HTTP, gRPC, metrics) bound to ``--host``
and blocks until SIGINT/SIGTERM; then Triton stops taking requests, answers the
in-flight ones (up to 25 s), frees its ports, and the workspace is removed (exit 0).

While it runs, :class:`~hms_deploy.runtime.serve.health.Watchdog` checks the model twice
a second and reloads it when its backend stub died (docs/serving.md); 3 failed reloads
in a row exit 5, ``tritonserver`` exiting on its own exits 4. Triton's output passes
through this process, without the lines that are not errors of this server.

Why not PyTriton's ``Triton.bind``: a PyTriton callable that raises fails every request
of its dynamic batch with the same message, and a bad request must fail alone. The
repository's Python-backend model answers each request of a batch separately; PyTriton's
wheel still provides the server binary, its Python backend and the stubs.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import click

from hms_deploy.cli.common import (
    RECOVERY_FAILED_EXIT,
    SERVER_STOPPED_EXIT,
    debug_option,
    given,
    handle_errors,
)
from hms_deploy.errors import ConfigError, HMSError
from hms_deploy.runtime.serve.health import (
    ModelControl,
    RecoveryFailed,
    ServerDied,
    Watchdog,
    sweep_stale,
)
from hms_deploy.runtime.serve.launch import EXIT_TIMEOUT_S, Endpoints
from hms_deploy.runtime.serve.options import RepositoryOptions

_SERVED = RepositoryOptions()  # the defaults of the served model's settings
_ENDS = Endpoints()  # where it listens by default


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--engines", "engines_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("engines"), show_default=True, help="Export directory from hms-export.")
@click.option("--engine", default=None,
              help=f"Backend of the engines: onnx or trt. [default: {_SERVED.engine}]")
@click.option("--device", default=None, help=f"cpu, cuda or cuda:N. [default: {_SERVED.device}]")
@click.option("--host", default=None,
              help="Address EVERY port binds to (Triton has no authentication: keep loopback "
                   f"unless a proxy in front of it authenticates). [default: {_ENDS.host}]")
@click.option("--http-port", type=int, default=None, help=f"[default: {_ENDS.http_port}]")
@click.option("--grpc-port", type=int, default=None, help=f"[default: {_ENDS.grpc_port}]")
@click.option("--metrics-port", type=int, default=None, help=f"[default: {_ENDS.metrics_port}]")
@click.option("--max-batch", type=int, default=None,
              help=f"Largest dynamic batch (requests stepped in lockstep). [default: {_SERVED.max_batch}]")
@click.option("--max-queue-delay-us", type=int, default=None,
              help=f"How long Triton waits to fill a dynamic batch. [default: {_SERVED.max_queue_delay_us}]")
@click.option("--allowed-root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Accept 'path' inputs naming files under this folder (default: uploads only).")
@click.option("--max-upload-mb", type=float, default=None,
              help=f"Largest 'video' upload in MiB. [default: {_SERVED.max_upload_bytes / 2**20:g}]")
@click.option("--steps", type=int, default=None, help="Steps T of every request (default: the model's).")
@click.option("--instances", type=int, default=None,
              help=f"Model instances (each opens the engines once). [default: {_SERVED.instances}]")
@click.option("--threads", type=int, default=None,
              help="ONNX Runtime intra-op threads per instance (default: all cores).")
@click.option("--drain-s", type=float, default=10.0, show_default=True,
              help="After SIGINT/SIGTERM: seconds during which queued and new requests on open "
                   "connections are still answered; later ones are refused (UNAVAILABLE).")
@click.option("--exit-timeout-s", type=int, default=EXIT_TIMEOUT_S, show_default=True,
              help="After SIGINT/SIGTERM: the longest Triton waits for open connections.")
@click.option("--log-verbose", type=int, default=0, show_default=True, help="Triton log level.")
@debug_option
@handle_errors("hms-serve")
def main(
    engines_dir: Path,
    engine: str | None,
    device: str | None,
    host: str | None,
    http_port: int | None,
    grpc_port: int | None,
    metrics_port: int | None,
    max_batch: int | None,
    max_queue_delay_us: int | None,
    allowed_root: Path | None,
    max_upload_mb: float | None,
    steps: int | None,
    instances: int | None,
    threads: int | None,
    drain_s: float,
    exit_timeout_s: int,
    log_verbose: int,
    debug: bool,
) -> None:
    """Serve the export in --engines with Triton Inference Server (model 'hms')."""
    from hms_deploy.runtime.options import RunSettings
    from hms_deploy.runtime.serve.launch import QUIET_ALWAYS, QUIET_ON_CPU, TritonProcess
    from hms_deploy.runtime.serve.repository import write_repository

    ends = Endpoints(**given(host=host, http_port=http_port, grpc_port=grpc_port,
                             metrics_port=metrics_port))
    ends.check()
    if not 0 <= drain_s < exit_timeout_s:
        raise ConfigError(f"--drain-s must be >= 0 and below --exit-timeout-s ({exit_timeout_s}), "
                          f"got {drain_s:g}")
    if max_upload_mb is not None and not max_upload_mb > 0:  # MiB: the command's unit
        raise ConfigError(f"--max-upload-mb must be > 0, got {max_upload_mb:g}")
    options = RepositoryOptions(  # its defaults and checks are the only ones
        allowed_root=allowed_root, run=RunSettings(steps=steps),
        **given(engine=engine, device=device, max_batch=max_batch,
                max_queue_delay_us=max_queue_delay_us, instances=instances, threads=threads,
                max_upload_bytes=None if max_upload_mb is None else int(max_upload_mb * 2**20)),
    )
    options.check()
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    sweep_stale(Path(tempfile.gettempdir()))  # workspaces of hms-serve processes that died
    failure: tuple[int, str] | None = None
    with tempfile.TemporaryDirectory(prefix="hms-serve-") as work:
        stop_file = Path(work) / "drain-deadline"
        uploads = Path(work) / "uploads"
        uploads.mkdir()
        options = dataclasses.replace(options, stop_file=stop_file, upload_dir=uploads)
        repo = write_repository(Path(work) / "repository", engines_dir.resolve(), options,
                                copy_engines=False)
        quiet = QUIET_ALWAYS + (QUIET_ON_CPU if options.device == "cpu" else ())
        server = TritonProcess(repo, ends, workdir=work, exit_timeout_s=exit_timeout_s,
                               filtered=True, quiet=quiet)
        (Path(work) / "pid").write_text(f"{os.getpid()} {server.shm_prefix}\n")
        watchdog = Watchdog(ModelControl(ends.http_url), lambda: server.proc.pid if server.alive()
                            and server.proc else None, instances=options.instances, upload_dir=uploads,
                            shm_prefix=server.shm_prefix, log=_say, stopping=stop.is_set)
        try:
            server.start()
            _say(f"model 'hms' ready: HTTP {ends.host}:{ends.http_port}, gRPC "
                 f"{ends.host}:{ends.grpc_port}, metrics {ends.host}:{ends.metrics_port} (pid {server.proc.pid if server.proc else '?'})")
            while not stop.wait(0.5):
                if not server.alive():
                    code = server.proc.returncode if server.proc else "?"
                    raise ServerDied(f"tritonserver exited unexpectedly (code {code})")
                watchdog.poll()
            stop_file.write_text(f"{time.time() + drain_s:.3f}")
            _say(f"stopping: no new connections; requests answered for {drain_s:g} s more, "
                 "then refused")
        except ServerDied as e:
            failure = (SERVER_STOPPED_EXIT, str(e))
        except RecoveryFailed as e:
            failure = (RECOVERY_FAILED_EXIT, str(e))
        finally:
            code = server.stop()
    if failure is not None:
        click.echo(f"hms-serve: error: {failure[1]}", err=True)
        raise click.exceptions.Exit(failure[0])
    if not server.stopped_normally():
        raise HMSError(f"tritonserver exited with code {code} on stop (see its log above)")
    _say("stopped" + (" (connections that clients kept open were closed at the exit timeout)"
                      if server.exit_timed_out else ""))


def _say(line: str) -> None:
    click.echo(f"hms-serve: {line}", err=True)
    sys.stderr.flush()


if __name__ == "__main__":  # pragma: no cover
    main()
