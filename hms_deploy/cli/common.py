"""What every CLI shares: one-line errors, exit codes, ``--debug``, run settings from flags.

Exit codes (the table of docs/commands.md): 0 success; 1 a failure (a bad input, a failed
check); 2 a usage error (a bad option value or combination:
:class:`~hms_deploy.errors.ConfigError`, or click's own checks), reported before anything
is loaded where the option alone shows it; 3 a backend that is unavailable (TensorRT, a
GPU, tritonserver: :class:`~hms_deploy.errors.BackendUnavailable`), and for ``hms-run`` /
``hms-extract`` a run that stopped before attempting every input; 130 / 143 when
interrupted (SIGINT / SIGTERM). A reader that closes the pipe early (``hms-inspect DIR |
head -1``) ends the command quietly with 141, as a shell tool killed by SIGPIPE would.
Any other exception is a bug: one line naming its type, or the traceback with
``--debug``, and exit 3.

Library errors name settings, not flags (:class:`~hms_deploy.errors.HMSError`
``setting``); :func:`flag_advice` rewrites them with the flags of the running command.
"""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click

from hms_deploy.errors import BackendUnavailable, ConfigError, HMSError
from hms_deploy.outputs import OutputLocked

F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK = 0
EXIT_FAILED_INPUTS = 1  # a failure; for a batch: some inputs failed, each has an error record
EXIT_USAGE = 2  # click's code for usage errors
EXIT_STOPPED = 3  # a backend unavailable, a run stopped before every input, a bug
EXIT_SIGINT = 130
EXIT_SIGTERM = 143
BROKEN_PIPE_EXIT = 141  # 128 + SIGPIPE
SERVER_STOPPED_EXIT = 4  # hms-serve: tritonserver exited on its own while serving
RECOVERY_FAILED_EXIT = 5  # hms-serve: the model could not be reloaded (3 tries in a row)


def exit_code(e: HMSError) -> int:
    """The exit code of a library error that ends a command: another writer holding the
    output is a stop (3), not a usage error."""
    if isinstance(e, OutputLocked):
        return EXIT_STOPPED
    if isinstance(e, ConfigError):
        return EXIT_USAGE
    if isinstance(e, BackendUnavailable):
        return EXIT_STOPPED
    return EXIT_FAILED_INPUTS


def _flags() -> dict[str, str]:
    """The running command's options: parameter name -> its longest flag."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return {}
    return {p.name: max(p.opts, key=len) for p in ctx.command.params
            if isinstance(p, click.Option) and p.name}


# the command line of each library remedy step (hms_deploy.errors.REMEDY_CALLS)
REMEDY_COMMANDS = {
    "trt_plans": "hms-export --engines {path} --engine trt",
}


def flag_advice(e: BaseException | str, flags: dict[str, str] | None = None) -> str:
    """The message of ``e`` (an error, or a warning: a :class:`~hms_deploy.errors.Note`)
    with the command's flag for each setting it is about, and its remedy as a command line.

    For a setting (:attr:`HMSError.settings`, :attr:`Note.settings`) whose flag is its
    own name (``batch_size`` -> ``--batch-size``) the first mention of the name is replaced
    by the flag; any other flag the message does not show is added in parentheses
    (``budget`` -> ``... (--budget-gflops)``). A remedy (:attr:`HMSError.remedy`) shown as
    its library call is shown as its command (:data:`REMEDY_COMMANDS`).
    """
    text = str(e)
    remedy = getattr(e, "remedy", None)
    if remedy is not None and remedy.step in REMEDY_COMMANDS:
        text = text.replace(remedy.text, REMEDY_COMMANDS[remedy.step].format(path=remedy.path))
    text, missing = _name_flags(text, getattr(e, "settings", ()),
                                _flags() if flags is None else flags)
    return f"{text} ({', '.join(missing)})" if missing else text


def record_error_advice(text: str, flags: dict[str, str] | None = None) -> str:
    """An error record's line (``{"video", "error"}``, made by the library from an error
    whose settings it no longer carries) with the command's flags: every setting of the
    command whose name has an underscore and is its flag's (``no_audio_policy`` ->
    ``--no-audio-policy``) is replaced where the text after the leading ``path: `` names it.
    """
    flags = _flags() if flags is None else flags
    head, sep, rest = text.partition(": ")
    if not sep:
        head, rest = "", text
    named = [name for name in flags if "_" in name]
    rest, _ = _name_flags(rest, named, {n: flags[n] for n in named}, only_own=True)
    return head + sep + rest


def _name_flags(text: str, settings: Any, flags: dict[str, str], *, only_own: bool = False
                ) -> tuple[str, list[str]]:
    """``text`` with the first mention of each setting replaced by its flag where the flag
    is the setting's own name; the flags it could not place (none with ``only_own``)."""
    import re

    missing = []
    for name in settings:
        flag = flags.get(name)
        if flag is None or flag in text:
            continue
        pattern = rf"(?<![\w'-]){re.escape(name)}(?![\w'-])"
        if flag == "--" + name.replace("_", "-") and re.search(pattern, text):
            text = re.sub(pattern, flag, text, count=1)
        elif not only_own:
            missing.append(flag)
    return text, missing


def given(**values: Any) -> dict[str, Any]:
    """The flags the user gave, by the options object's field names: a flag left at None
    is left out, so that the options object's default applies."""
    return {k: v for k, v in values.items() if v is not None}


def settings_from_flags(**overrides: Any) -> Any:
    """The :class:`~hms_deploy.runtime.options.RunSettings` of the running command: every
    parameter named as one of its fields (a flag left at None keeps the field's default),
    then ``overrides``. The settings' checks are the only ones: a bad value is a
    :class:`ConfigError` naming the field, which :func:`flag_advice` turns into the flag."""
    from hms_deploy.runtime.options import FIELD_NAMES, RunSettings

    params = click.get_current_context().params
    fields = given(**{k: v for k, v in params.items() if k in FIELD_NAMES})
    return RunSettings(**{**fields, **overrides})


def setting_default(name: str) -> Any:
    """A :class:`~hms_deploy.runtime.options.RunSettings` field's default (for ``--help``)."""
    from hms_deploy.runtime.options import RunSettings

    return getattr(RunSettings(), name)


def quiet_third_party_warnings() -> None:
    """fvcore/pytorchvideo and torch.onnx print FutureWarnings that users cannot act on."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx.*")


def fail(prog: str, message: str, code: int = 1) -> NoReturn:
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
                fail(prog, flag_advice(e), exit_code(e))
            except OSError as e:
                if debug:
                    raise
                fail(prog, f"{e.strerror or e}: {e.filename}" if e.filename else str(e))
            except Exception as e:
                if debug:
                    raise
                fail(prog, f"internal error ({type(e).__name__}: {e}); rerun with --debug",
                     EXIT_STOPPED)

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


def _ray_default(name: str) -> Any:
    from hms_deploy.runtime.ray_cluster import RayLayout

    return getattr(RayLayout(), name)


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
        click.option("--threads-per-worker", type=int, default=None,
                     help="With --ray: intra-op threads (= CPUs reserved) per actor "
                          f"[default: {_ray_default('threads_per_worker')}]."),
    ]):
        f = opt(f)
    return f


def ray_layout(ray: bool, address: str | None, workers: int | None, threads: int | None, *,
               local_workers: bool = False) -> Any:
    """The :class:`~hms_deploy.runtime.ray_cluster.RayLayout` of the options, or None without
    --ray. An option that only applies with --ray is refused without it (a usage error):
    --ray-address, --threads-per-worker, and --workers unless ``local_workers`` (a
    command whose --workers also means something without Ray)."""
    if not ray:
        extra = [flag for flag, value in (("--ray-address", address),
                                          ("--workers", None if local_workers else workers),
                                          ("--threads-per-worker", threads)) if value is not None]
        if extra:
            raise click.UsageError(f"{' and '.join(extra)} need{'s' if len(extra) == 1 else ''} "
                                   "--ray")
        return None
    from hms_deploy.runtime.ray_cluster import RayLayout

    layout = RayLayout(address=address, workers=workers,  # its defaults and check
                       **given(threads_per_worker=threads))
    layout.check()
    return layout
