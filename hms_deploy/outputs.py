"""What every command that writes resumable output shares: a lock, file identities.

``hms-run --output`` (:mod:`hms_deploy.runtime.results`) and ``hms-extract --out`` (the
feature store) follow the same rules:

- **One writer.** A run takes an exclusive ``fcntl.flock`` on a lock file beside its
  resolved output (``results.jsonl.lock``, or ``.lock`` inside a feature store), and on
  the output file itself, and holds them to the end, so every name of one file meets
  one lock. A second run on the same output does not wait: it refuses at once with one
  line naming the output and the process that holds it: pid, host, start time
  (:class:`OutputLocked`).
  The lock file stays after the run (deleting it would race with a waiting opener);
  the lock, not the file, is what counts, and the kernel drops it when the process
  dies, even by SIGKILL.
- **A video is its resolved path and its identity** (:func:`file_identity`: size and
  modification time in ns; :func:`file_stamp` adds the inode and device). A finished
  record counts for a rerun only while they match; a file that changed (grew, was
  rewritten, was replaced by a ``mv``) is processed again and its record superseded.
- **Exit codes** are the CLI's (:mod:`hms_deploy.cli.common`): a run that stops before
  attempting every input (output locked, not writable, settings that do not match it,
  disk full) exits 3, interrupted 130 / 143; what is written stays valid.
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from typing_extensions import Self

from hms_deploy.errors import ConfigError

DISK_FULL = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})  # a full disk, a size limit


def disk_full(e: BaseException) -> OSError | None:
    """The disk-full ``OSError`` (:data:`DISK_FULL`) that is ``e`` or behind it (its cause
    chain), if any."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in DISK_FULL:
            return cur
        cur = cur.__cause__ or cur.__context__
    return None


class OutputLocked(ConfigError):
    """Another process holds the lock of this output."""


class Terminated(BaseException):
    """SIGTERM, raised in the main thread by :func:`sigterm_raises` (like KeyboardInterrupt)."""


def file_identity(path: str | os.PathLike[str]) -> dict[str, int] | None:
    """``{"size": bytes, "mtime_ns": ns}`` of the file ``path`` resolves to; None if unreadable."""
    stamp = file_stamp(path)
    return None if stamp is None else {"size": stamp["size"], "mtime_ns": stamp["mtime_ns"]}


def file_stamp(path: str | os.PathLike[str]) -> dict[str, int] | None:
    """:func:`file_identity` plus ``"ino"`` and ``"dev"``: what tells a file that was
    replaced (an atomic ``mv``: a new inode) and another name of the same file (a hard
    link, a bind mount: the same device and inode). None if unreadable."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns), "ino": int(st.st_ino),
            "dev": int(st.st_dev)}


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
    """An exclusive ``flock`` on ``lock_path`` (created if needed), and on ``target``.

    ``target``: the output file itself (its resolved path), locked too while it exists,
    so that another name of the same inode (a hard link, a bind mount of the file) that
    would give another lock file still meets the lock; :meth:`retarget` moves that lock
    to a file that replaced it (a compaction's rename).

    :meth:`acquire` raises :class:`OutputLocked` naming ``output`` and the holder (pid,
    host and start time, written into the lock file) when another process holds it;
    ``acquire(wait=True)`` blocks until it is free instead (after ``on_wait(message)``).
    ``remove``: delete the lock file on release (while still holding it; an opener that
    then gets the lock on the deleted file sees that and opens the path again).
    """

    def __init__(self, lock_path: str | os.PathLike[str], output: str | os.PathLike[str],
                 command: str, *, target: str | os.PathLike[str] | None = None,
                 remove: bool = False):
        self.path = Path(lock_path)
        self.remove = remove
        self.output = output
        self.command = command
        self.target = None if target is None else Path(target)
        self._fd: int | None = None
        self._target_fd: int | None = None

    def _refusal(self, holder: str) -> OutputLocked:
        return OutputLocked(
            f"{self.output}: another {self.command} is writing it{holder}; wait for it to "
            f"finish or use another output (lock: {self.path})"
        )

    def _holder(self, fd: int) -> str:
        """`` (pid N) on HOST since TIME`` from the lock file open as ``fd`` ("" if it says
        nothing)."""
        fields = os.pread(fd, 256, 0).decode("utf-8", "replace").split()
        if not fields or not fields[0].isdigit():
            return ""
        text = f" (pid {fields[0]})"
        if len(fields) >= 3:
            text += f" on {fields[1]} since {fields[2]}"
        return text

    def acquire(self, *, wait: bool = False,
                on_wait: Callable[[str], None] | None = None) -> Self:
        import fcntl
        import socket

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                if not wait:
                    holder = self._holder(fd)
                    os.close(fd)
                    raise self._refusal(holder) from None
                if on_wait is not None:
                    on_wait(f"{self.output}: waiting for another {self.command}"
                            f"{self._holder(fd)} to finish (lock: {self.path})")
                    on_wait = None
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except BaseException:
                    os.close(fd)
                    raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # its holder removed it on release: lock the path's file
        try:
            self._target_fd = self._lock_target(wait)
        except BaseException:
            os.close(fd)
            raise
        start = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()} {start}\n".encode(), 0)
        self._fd = fd
        return self

    def _lock_target(self, wait: bool) -> int | None:
        import fcntl

        if self.target is None:
            return None
        try:
            fd = os.open(self.target, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block
        except FileNotFoundError:
            return None  # no other name can lead to a file that does not exist yet
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError:
            os.close(fd)
            raise self._refusal(" (through another name of the same file)") from None
        return fd

    def retarget(self) -> None:
        """Lock ``target`` again (the file now at that path replaced the locked one)."""
        old, self._target_fd = self._target_fd, self._lock_target(False)
        if old is not None:
            os.close(old)

    def release(self) -> None:
        import fcntl

        if self._target_fd is not None:
            os.close(self._target_fd)
            self._target_fd = None
        if self._fd is None:
            return
        try:
            if self.remove:
                self.path.unlink(missing_ok=True)
            else:
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


def replace_atomically(path: Path, data: bytes | memoryview) -> None:
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


@contextmanager
def signals_held() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM wait: they are delivered (and their handlers
    raise) when it ends, so that what the block does happens whole, e.g. a record written
    and counted. Off the main thread (where Python runs signal handlers): no change.

    A signal mask would not do: the kernel gives a signal sent to the process to any thread
    that does not block it (a decode or ONNX Runtime thread), and Python then runs the
    handler in the main thread at once. So the block's handlers note the signal, and on the
    way out the previous handlers are put back and each noted signal is raised again.
    """
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []

    def note(signum: int, frame: Any) -> None:
        noted.append(signum)

    previous = {}
    for s in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(s) is not None:  # None: a handler not set from Python; left alone
            previous[s] = signal.signal(s, note)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for signum in dict.fromkeys(noted):
            signal.raise_signal(signum)
