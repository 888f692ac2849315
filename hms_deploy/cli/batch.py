"""The job behind ``hms-run``: records to stdout and ``--output``, progress, the outcome.

Exit codes (:mod:`hms_deploy.cli.common`): 0 every input has a result (classified now or
skipped as already in ``--output``); 1 the run completed and some inputs failed (each
has an error record); 3 the run stopped, or could not start, before attempting every
input (output locked, not writable, made with other settings, disk full, an engine
failure): one line naming the output or the cause and how many inputs were not
attempted; 130 / 143 on SIGINT / SIGTERM, also saying how many were not attempted.
Whatever the outcome, ``--output`` is left valid and a rerun resumes.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import click

from hms_deploy.cli.common import (
    EXIT_FAILED_INPUTS,
    EXIT_OK,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    EXIT_STOPPED,
    fail,
    flag_advice,
    record_error_advice,
)
from hms_deploy.cli.inputs import Inputs
from hms_deploy.errors import ConfigError
from hms_deploy.outputs import Terminated, signals_held, sigterm_raises

PROG = "hms-run"
PROGRESS_MIN_INPUTS = 20  # show progress on a non-TTY stderr only for this many videos
# warn when the steps' audio windows see less than this share of a video this long
LOW_COVERAGE, LONG_VIDEO_S = 0.25, 30.0


class _Stopped(Exception):
    """The run cannot go on (the output cannot be written)."""


@dataclass
class JobOptions:
    output: Path | None = None
    output_mode: str = "resume"
    as_json: bool = False
    progress: bool | None = None
    debug: bool = False
    show_partial: bool = True  # print the partial records of online mode (False: --explain only)
    collect: list[dict[str, Any]] | None = None  # every record that is not an error (--explain)
    # where the records come from: ``records(videos)`` (e.g. a Ray Data actor pool,
    # ``--ray``); None classifies in this process with the session
    records: Callable[[list[str]], Iterable[dict[str, Any]]] | None = None
    lock: Any = None  # --output's lock, taken before the model loads (lock_output_or_exit)


def error_line(rec: dict[str, Any]) -> str:
    """``video: error``, without repeating the path when the error already starts with it."""
    video, error = str(rec["video"]), str(rec["error"])
    return error if error.startswith(f"{video}:") else f"{video}: {error}"


def warn(message: str) -> None:
    click.echo(f"{PROG}: warning: {message}", err=True)


def low_coverage(rec: dict[str, Any]) -> bool:
    """Whether a final record's steps saw under :data:`LOW_COVERAGE` of a long video's audio."""
    cov = rec.get("coverage")
    return (isinstance(cov, dict) and cov.get("duration_s", 0) >= LONG_VIDEO_S
            and cov.get("share", 1.0) < LOW_COVERAGE)


def coverage_warning(recs: list[dict[str, Any]]) -> str:
    """One line for the videos of :func:`low_coverage`, suggesting more steps."""
    rec = min(recs, key=lambda r: r["coverage"]["share"])
    cov, steps = rec["coverage"], int(rec["T"])
    # the audio seen grows with the steps: this many times T covers LOW_COVERAGE
    more = steps * max(2, math.ceil(LOW_COVERAGE * cov["duration_s"] / max(cov["audio_s"], 1e-9)))
    return (f"{len(recs)} video(s) of {LONG_VIDEO_S:g} s or more had under "
            f"{LOW_COVERAGE:.0%} of their audio seen by T={steps} steps (least: {rec['video']}, "
            f"{cov['share']:.1%} of {cov['duration_s']:g} s); the audio between steps is "
            f"unseen: raise --steps (e.g. --steps {more})")


def lock_output_or_exit(output: Path, mode: str, total: int) -> Any:
    """Take ``--output``'s lock (before any model loads): a second writer refuses at once
    with one line and exit 3. Returns the :class:`~hms_deploy.outputs.OutputLock`."""
    from hms_deploy.runtime.results import lock_output

    try:
        return lock_output(output, mode=mode, command=PROG)
    except (ConfigError, OSError) as e:
        output_not_started(e, output, total)


def output_not_started(e: ConfigError | OSError, output: Path, total: int) -> NoReturn:
    """``--output`` cannot be locked or opened: one line, nothing attempted, exit 3."""
    if isinstance(e, ConfigError):
        fail(PROG, f"{flag_advice(e)}; {total} input(s) not attempted", EXIT_STOPPED)
    fail(PROG, f"cannot write {e.filename or output}: {e.strerror or e}; "
               f"{total} input(s) not attempted", EXIT_STOPPED)


def run_job(session: Any, opts: Any, inputs: Inputs, job: JobOptions,
            summary: Callable[[dict[str, Any]], str]) -> int:
    """Classify ``inputs`` with an open-able ``session``; returns the exit code."""
    from hms_deploy.runtime.results import ResultsFile, record_json, run_settings

    total = inputs.total
    results = None
    if job.output is not None:
        try:
            results = ResultsFile(job.output, settings=run_settings(session, opts),
                                  mode=job.output_mode, command=PROG, lock=job.lock)
        except (ConfigError, OSError) as e:
            output_not_started(e, job.output, total)
        for w in results.warnings:
            warn(w)
        results.warnings.clear()
        if job.output_mode == "new" and results.path != job.output:
            click.echo(f"{PROG}: writing {results.path}", err=True)
    todo = [v for v in inputs.videos if results is None or not results.done(v)]
    skipped = len(inputs.videos) - len(todo)
    if skipped:
        click.echo(f"{PROG}: {skipped} video(s) already in {results.path if results else ''}, "
                   "skipped", err=True)
    attempt = len(todo) + len(inputs.problems)
    progress = job.progress
    if progress is None:
        progress = sys.stderr.isatty() or attempt >= PROGRESS_MIN_INPUTS
    bar = None
    if progress and attempt:
        from tqdm import tqdm

        bar = tqdm(total=attempt, unit="video", file=sys.stderr, dynamic_ncols=True)
    finished = failed = 0
    sparse: list[dict[str, Any]] = []  # final records of long videos that T covers thinly

    def emit(rec: dict[str, Any]) -> None:
        nonlocal finished, failed
        if "error" in rec:  # the library names settings; this command's records name flags
            rec = {**rec, "error": record_error_advice(str(rec["error"]))}
        partial = rec.get("partial", False)
        if job.collect is not None and "error" not in rec:
            job.collect.append(rec)
        if partial and not job.show_partial:
            return  # computed for --explain only
        line = record_json(rec) if job.as_json or (results is not None and not partial) else None
        if job.as_json:
            (bar.write(line, file=sys.stdout) if bar else click.echo(line))
        elif "error" in rec:
            msg = f"{PROG}: error: {error_line(rec)}"
            (bar.write(msg, file=sys.stderr) if bar else click.echo(msg, err=True))
        else:
            text = summary(rec)
            (bar.write(text, file=sys.stdout) if bar else click.echo(text))
        sys.stdout.flush()
        if partial:
            return
        with signals_held():  # a signal now comes after the record is both written and counted
            if results is not None:
                try:
                    results.append(rec, line)  # serialised once, above
                except OSError as e:
                    raise _Stopped(f"cannot write {results.path}: {e.strerror or e}") from None
            finished += 1
            failed += "error" in rec
        if low_coverage(rec):
            sparse.append(rec)
        if bar is not None:
            bar.update(1)

    code = EXIT_OK
    stop: str | None = None
    try:
        with sigterm_raises():
            for name, error in inputs.problems:
                emit({"video": name, "error": error})
            if todo and job.records is not None:
                stream = job.records(todo)
                try:
                    for rec in stream:
                        emit(rec)
                finally:  # a generator's cleanup (e.g. stopping Ray) runs now, not at GC
                    close = getattr(stream, "close", None)
                    if close is not None:
                        close()
            elif todo:
                with session:
                    for rec in session.classify_many(todo, opts):
                        emit(rec)
    except KeyboardInterrupt:
        code, stop = EXIT_SIGINT, "interrupted (SIGINT)"
    except Terminated:
        code, stop = EXIT_SIGTERM, "terminated (SIGTERM)"
    except _Stopped as e:
        code, stop = EXIT_STOPPED, str(e)
    except Exception as e:  # an engine or the host failed: no input after it can run
        if job.debug:
            raise
        code, stop = EXIT_STOPPED, f"stopped by {type(e).__name__}: {' '.join(flag_advice(e).split())}"
    finally:
        if bar is not None:
            bar.close()
        if results is not None:
            results.close()
            for w in results.warnings:
                warn(w)
    for w in inputs.warnings:
        warn(w)
    if sparse:
        warn(coverage_warning(sparse))
    if stop is not None:
        where = f" (rerun with the same --output {results.path} to resume)" if results else ""
        fail(PROG, f"{stop}; {attempt - finished} of {total} input(s) not attempted{where}", code)
    parts = [f"{finished - failed} classified", f"{failed} failed"]
    if skipped:
        parts.append(f"{skipped} already in {results.path if results else ''}")
    scan = len(inputs.warnings)
    if scan:
        parts.append(f"{scan} scan warning(s) (above)")
    if failed or total > 1 or scan:  # one summary line
        click.echo(f"{PROG}: {total} input(s): " + ", ".join(parts), err=True)
    if failed:
        code = EXIT_FAILED_INPUTS
    return code
