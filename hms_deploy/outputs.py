"""What every command that writes resumable output shares: a lock, file identities.

``hms-run --output`` (:mod:`hms_deploy.runtime.results`) and ``hms-extract --out`` (the
feature store) follow the same rules:

- **One writer.** A run takes an exclusive ``fcntl.flock`` on a lock file beside its
  output (``results.jsonl.lock``, or ``.lock`` inside a feature store) and holds it to
  the end. A second run on the same output does not wait: it refuses at once with one
  line naming the output and the process that holds it (:class:`OutputLocked`).
  The lock file stays after the run (deleting it would race with a waiting opener);
  the lock, not the file, is what counts, and the kernel drops it when the process
  dies, even by SIGKILL.
- **A video is its resolved path and its identity** (:func:`file_identity`: size and
  modification time in ns). A finished record counts for a rerun only while both
  match; a file that changed (grew, was rewritten) is processed again and its record
  superseded.
- **Exit codes** are the CLI's (:mod:`hms_deploy.cli.common`): a run that stops before
  attempting every input (output locked, not writable, settings that do not match it,
  disk full) exits 3, interrupted 130 / 143; what is written stays valid.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from typing_extensions import Self

from hms_deploy.errors import ConfigError


class OutputLocked(ConfigError):
    """Another process holds the lock of this output."""


class Terminated(BaseException):
    """SIGTERM, raised in the main thread by :func:`sigterm_raises` (like KeyboardInterrupt)."""


def file_identity(path: str | os.PathLike[str]) -> dict[str, int] | None:
    """``{"size": bytes, "mtime_ns": ns}`` of the file ``path`` resolves to; None if unreadable."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def check_output_parent(path: Path, what: str) -> None:
    """:class:`ConfigError` if ``path`` cannot be a file: it is a directory, or a parent is a
    file. ``what``: the setting that names it (the error's ``setting``)."""
    if path.is_dir():
        raise ConfigError(f"{what} {path}: is a directory, expected a file", setting=what,
                          value=str(path), expected="a file")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{what} {path}: '{parent}' is a file, not a directory",
                                  setting=what, value=str(path), expected="a file")
            return


class OutputLock:
    """An exclusive, non-blocking ``flock`` on ``lock_path`` (created if needed).

    :meth:`acquire` raises :class:`OutputLocked` naming ``output`` and the holder's pid
    (written into the lock file) when another process holds it.
    """

    def __init__(self, lock_path: str | os.PathLike[str], output: str | os.PathLike[str],
                 command: str):
        self.path = Path(lock_path)
        self.output = output
        self.command = command
        self._fd: int | None = None

    def acquire(self) -> Self:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
            os.close(fd)
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise OutputLocked(
                f"{self.output}: another {self.command} is writing it{who}; wait for it to "
                f"finish or use another output (lock: {self.path})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        import fcntl

        try:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def fsync_dir(path: Path) -> None:
    """fsync a directory (a rename in it becomes durable); ignored where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, rename it over ``path``.

    A crash at any moment leaves either the old file or the new one (plus, at worst, a
    stray ``.NAME.tmp`` that the next call overwrites).
    """
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


@contextmanager
def sigterm_raises(exc: type[BaseException] = Terminated) -> Iterator[None]:
    """Within the block, SIGTERM raises ``exc`` (default :class:`Terminated`) in the main
    thread; the previous handler is restored after it. Off the main thread: no change."""
    def handler(signum: int, frame: Any) -> None:
        raise exc()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave SIGTERM alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
