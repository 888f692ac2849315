"""What every CLI shares: one-line errors, exit codes, ``--debug``.

Exit codes: 0 success; 1 a failure (a bad input, a failed check); 2 a usage error (a bad
option value or combination: :class:`~hms_deploy.errors.ConfigError`, or click's own
checks), reported before anything is loaded where the option alone shows it; 130 when
interrupted. A reader that closes the pipe early (``hms-inspect DIR | head -1``) ends the
command quietly with 141, as a shell tool killed by SIGPIPE would.
"""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import click

from hms_deploy.errors import ConfigError, HMSError

F = TypeVar("F", bound=Callable[..., Any])

USAGE_EXIT = 2  # click's code for usage errors
BROKEN_PIPE_EXIT = 141  # 128 + SIGPIPE


def quiet_third_party_warnings() -> None:
    """fvcore/pytorchvideo and torch.onnx print FutureWarnings that users cannot act on."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx.*")


def fail(prog: str, message: str, code: int = 1) -> None:
    """Print ``prog: error: message`` (one line) on stderr and exit with ``code``."""
    first = " ".join(str(message).split())
    click.echo(f"{prog}: error: {first}", err=True)
    sys.exit(code)


def broken_pipe_exit() -> None:
    """The reader of stdout went away: stop quietly (no 'Broken pipe' line) with 141.

    stdout is pointed at /dev/null first so that the interpreter's final flush cannot
    raise again.
    """
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    sys.exit(BROKEN_PIPE_EXIT)


def debug_option(f: F) -> F:
    return click.option(
        "--debug", is_flag=True, default=False, help="Show tracebacks instead of one-line errors."
    )(f)


def handle_errors(prog: str) -> Callable[[F], F]:
    """Turn library errors (and OSError / KeyboardInterrupt) into one line and an exit code.

    The wrapped click command must accept ``debug``. Unexpected exceptions also print one
    line (with the exception type) unless ``--debug`` is given.
    """

    def wrap(f: F) -> F:
        @functools.wraps(f)
        def inner(*args: Any, **kwargs: Any) -> Any:
            debug = kwargs.get("debug", False)
            quiet_third_party_warnings()
            try:
                result = f(*args, **kwargs)
                sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
                return result
            except click.exceptions.Exit:
                raise
            except (click.ClickException, click.Abort):
                raise
            except KeyboardInterrupt:
                fail(prog, "interrupted", 130)
            except BrokenPipeError:
                broken_pipe_exit()
            except HMSError as e:
                if debug:
                    raise
                fail(prog, str(e), USAGE_EXIT if isinstance(e, ConfigError) else 1)
            except OSError as e:
                if debug:
                    raise
                fail(prog, f"{e.strerror or e}: {e.filename}" if e.filename else str(e))
            except Exception as e:
                if debug:
                    raise
                fail(prog, f"internal error ({type(e).__name__}: {e}); rerun with --debug")

        return inner  # type: ignore[return-value]

    return wrap


def set_threads(threads: int | None) -> None:
    """``--threads N``: torch intra-op threads of this process (None leaves torch's default)."""
    if threads is None:
        return
    if threads < 1:
        raise click.BadParameter(f"must be >= 1, got {threads}", param_hint="--threads")
    import torch

    torch.set_num_threads(threads)


RAY_WORKERS_HELP = ("With --ray: actors (default: one per CPU / threads per worker; one per "
                    "GPU with --device cuda).")


def ray_options(f: F, workers_help: str = RAY_WORKERS_HELP, workers_min: int = 1) -> F:
    """``--ray [--ray-address ADDR] [--workers K] [--threads-per-worker J]`` (hms-run, hms-extract).

    ``workers_min``: the smallest ``--workers`` (a usage error below it, exit 2).
    """
    for opt in reversed([
        click.option("--ray", is_flag=True, default=False,
                     help="Run on a Ray Data actor pool (a loopback-only local Ray instance "
                          "unless --ray-address is given)."),
        click.option("--ray-address", default=None,
                     help="With --ray: an existing Ray cluster (e.g. ray://head:10001); its "
                          "nodes must see the model and the videos at the same paths."),
        click.option("--workers", type=click.IntRange(min=workers_min), default=None,
                     help=workers_help),
        click.option("--threads-per-worker", type=click.IntRange(min=1), default=1, show_default=True,
                     help="With --ray: intra-op threads (= CPUs reserved) per actor."),
    ]):
        f = opt(f)
    return f


def ray_layout(ray: bool, address: str | None, workers: int | None, threads: int) -> Any:
    """The :class:`~hms_deploy.runtime.ray_cluster.RayLayout` of the options, or None without --ray."""
    if not ray:
        if address is not None:
            raise click.UsageError("--ray-address needs --ray")
        return None
    from hms_deploy.runtime.ray_cluster import RayLayout

    layout = RayLayout(address=address, workers=workers, threads_per_worker=threads)
    layout.check()
    return layout
