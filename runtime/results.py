"""``hms-run --output results.jsonl``: crash-safe, resumable, one current record per video.

One JSON object per line, one line per finished video (never the partial records of
``--online``): the record ``hms-run --json`` prints plus two fields that key resume:

- ``"source"``: ``{"path": resolved path, "size": bytes, "mtime_ns": ns, "ino": inode}``
  of the video when its run started (null for a file that could not be read);
- ``"settings"``: what changes a record (:func:`run_settings`: the model's hash, engine,
  device, policy, budget, T, topk, ...).

Writing: each line is one ``write`` on an ``O_APPEND`` descriptor, then fsync, before the
next video starts; if the write fails (disk full) the partial line is cut off again. A
kill at any moment therefore loses at most the videos in flight and leaves, at worst, a
torn last line, which the next open cuts off.

Reopening (a rerun) with the default mode ``resume``:

- a video is its resolved path; its *current* record is its last line (a rerun that
  reaches it by another relative path, or through a symlink, finds it; so does one
  through another name of the same inode, a hard link or a bind mount, while the inode,
  size and mtime match its record);
- it is skipped if its current record is a result (no ``"error"``) whose ``source``
  identity still matches the file (same size, mtime and inode) and whose ``settings`` equal this
  run's; a changed file, an error record or a legacy line (without ``source``) is run
  again, and the new line supersedes the old one;
- if any current record was made with other settings, opening refuses
  (:class:`SettingsMismatch`, naming each differing setting): use another file, or the
  mode ``new`` (write ``NAME.1.jsonl``, ``NAME.2.jsonl``, ...: the first free name) or
  ``overwrite`` (start the file over);
- lines that are not records (corrupted in the middle of the file) are reported in
  :attr:`ResultsFile.warnings`, kept as they are, and ignored.

One current record per video, on disk: superseding lines are appended during the run
(a crash leaves old and new lines; the reader takes the last one) and the file is
*compacted* when opened and when closed, if it holds superseded lines: the kept lines are
written to ``.NAME.tmp``, fsynced and renamed over the file (atomic: a crash leaves the
old file or the new one). So after a run that ended (even by Ctrl-C) the file has one
line per video, and counting lines or error records counts videos. A reader that
follows the file while a run writes it (``tail -f``) must reopen it after a compaction.

One writer: the run holds ``fcntl.flock`` on ``NAME.lock`` beside the resolved file and
on the file's inode (:func:`lock_output`, :class:`~hms_deploy.outputs.OutputLock`); a
second run, by any name of the file, refuses at once.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from typing_extensions import Self

from hms_deploy.errors import ConfigError
from hms_deploy.outputs import OutputLock, check_output_parent, file_stamp, replace_atomically

MODES = ("resume", "new", "overwrite")


class SettingsMismatch(ConfigError):
    """The output holds records made with other settings than this run's."""


def video_key(video: str | os.PathLike[str]) -> str:
    """A video's identity in an output file: its fully resolved path."""
    return os.path.realpath(video)


@dataclass(frozen=True)
class _Current:
    """What the current line of one video says (the line itself stays on disk)."""

    error: bool
    identity: dict[str, Any] | None
    settings: dict[str, Any] | None


def _line_key(obj: Any) -> str | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("video"), str) or obj.get("partial"):
        return None
    src = obj.get("source")
    path = src.get("path") if isinstance(src, dict) else None
    if isinstance(path, str):
        return path
    return video_key(obj["video"])


def _same_file(recorded: dict[str, Any] | None, now: dict[str, Any] | None) -> bool:
    """Whether a record's ``source`` identity is the file now: size and mtime, and the
    inode where the record has one (a file replaced by an atomic ``mv`` has a new one)."""
    if recorded is None or now is None:
        return False
    keys = ("size", "mtime_ns", "ino") if recorded.get("ino") is not None else ("size", "mtime_ns")
    return all(recorded.get(k) == now.get(k) for k in keys)


def _ident(path: str) -> dict[str, Any] | None:
    stamp = file_stamp(path)
    return None if stamp is None else {k: stamp[k] for k in ("size", "mtime_ns", "ino")}


def lock_output(path: str | Path, *, mode: str = "resume", command: str = "hms-run",
                wait: bool = False) -> OutputLock:
    """Take the lock of the output ``path`` (before anything is loaded).

    The lock file is ``NAME.lock`` beside the *resolved* path, and the output file's
    inode is locked too, so every name of one file (a symlink, ``..``, a hard link, a
    bind mount) meets the same lock. Mode ``new`` picks the first free ``NAME.N.jsonl``
    first. ``lock.target`` is the resolved path the run writes. Raises
    :class:`ConfigError` for a path that cannot be a file,
    :class:`~hms_deploy.outputs.OutputLocked`, ``OSError``.
    """
    if mode not in MODES:
        raise ConfigError(f"output mode {mode!r}, expected one of {', '.join(MODES)}",
                          setting="output_mode", value=mode, expected=" | ".join(MODES))
    path = Path(path)
    check_output_parent(path, "output")
    path.parent.mkdir(parents=True, exist_ok=True)
    real = Path(os.path.realpath(path))
    if mode == "new":
        real = _free_name(real)
    lock = OutputLock(real.with_name(real.name + ".lock"), path if mode != "new" else real,
                      command, target=real)
    return lock.acquire(wait=wait)


def _free_name(path: Path) -> Path:
    if not path.exists() or path.stat().st_size == 0:
        return path
    stem, suffix = (path.stem, path.suffix) if path.suffix else (path.name, "")
    for i in range(1, 10_000):
        p = path.with_name(f"{stem}.{i}{suffix}")
        if not p.exists():
            return p
    raise ConfigError(f"output {path}: no free name {stem}.N{suffix} left", setting="output",
                      value=str(path))


def _normal(settings: dict[str, Any] | None) -> dict[str, Any]:
    normal: dict[str, Any] = json.loads(json.dumps(settings or {}))  # as read back from the file
    return normal


class ResultsFile:
    """An open, locked ``results.jsonl``: :meth:`done` tells which videos to skip.

    ``settings``: what changes a record (stored on every line; see the module docstring).
    ``mode``: ``resume`` (default), ``new`` or ``overwrite``.
    ``lock``: the output's lock, taken earlier with :func:`lock_output` (the same
    ``path`` and ``mode``; then owned by this object); None takes it here. ``path`` is
    the resolved one. Raises :class:`ConfigError`
    for a path that cannot be a file, :class:`~hms_deploy.outputs.OutputLocked` if
    another run holds it, :class:`SettingsMismatch`; ``OSError`` if it cannot be written.
    """

    def __init__(self, path: str | Path, *, settings: dict[str, Any] | None = None,
                 mode: str = "resume", command: str = "hms-run", lock: OutputLock | None = None):
        if lock is None:
            lock = lock_output(path, mode=mode, command=command)
        assert lock.target is not None
        self.path = path = lock.target
        self.settings = _normal(settings)
        self._settings_json = record_json(self.settings)
        self.warnings: list[str] = []
        self.torn = False
        self._state: dict[str, _Current] = {}
        self._identity: dict[str, dict[str, Any] | None] = {}
        self._inodes: dict[tuple[Any, Any, Any], str] = {}  # (ino, size, mtime) -> key
        self._alias: dict[str, str] = {}  # another name of a recorded file -> its key
        self._stale = 0  # superseded lines in the file
        self._fd: int | None = None
        self._lock = lock
        try:
            if mode == "overwrite" and path.exists():
                replace_atomically(path, b"")
                lock.retarget()
            self._scan()
            if self._stale:
                self.compact()
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except BaseException:
            self._lock.release()
            raise

    # -- reading -------------------------------------------------------------------------
    def _scan(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        tail = lines.pop()  # b"" when the file ends with a newline
        if tail:
            try:
                obj = json.loads(tail)
            except ValueError:
                obj = None
            with open(self.path, "r+b") as f:
                if isinstance(obj, dict):  # a complete object that only lacks its newline
                    lines.append(tail)
                    f.seek(0, os.SEEK_END)
                    f.write(b"\n")
                else:  # torn by a crash mid-write: cut it off
                    self.torn = True
                    f.truncate(len(data) - len(tail))
                f.flush()
                os.fsync(f.fileno())
        bad = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                obj = None
            key = _line_key(obj)
            if key is None:
                bad.append(number)
                continue
            if key in self._state:
                self._stale += 1
            src = obj.get("source") if isinstance(obj.get("source"), dict) else None
            ident = ({k: src.get(k) for k in ("size", "mtime_ns", "ino")}
                     if src is not None else None)
            settings = obj.get("settings") if isinstance(obj.get("settings"), dict) else None
            self._state[key] = _Current("error" in obj, ident, settings)
            self._remember(key, ident)
        if bad:
            shown = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
            self.warnings.append(
                f"{self.path}: {len(bad)} line(s) are not result records (line {shown}): "
                "kept as they are and ignored"
            )
        self._check_settings()

    def _check_settings(self) -> None:
        diffs: dict[str, tuple[Any, Any]] = {}
        for cur in self._state.values():
            if cur.settings is None:
                continue  # a legacy line: run again, never refused
            for k in sorted(set(cur.settings) | set(self.settings)):
                old, new = cur.settings.get(k), self.settings.get(k)
                if old != new and k not in diffs:
                    diffs[k] = (old, new)
        if diffs:
            what = "; ".join(f"{k} {json.dumps(o)} there, {json.dumps(n)} now"
                             for k, (o, n) in diffs.items())
            raise SettingsMismatch(
                f"{self.path} holds records made with other settings ({what}): use another "
                "output file, or output_mode new (a new file beside it) or overwrite",
                setting="output_mode", value=self.settings)

    def _remember(self, key: str, ident: dict[str, Any] | None) -> None:
        if ident is not None and ident.get("ino") is not None:
            self._inodes[(ident["ino"], ident["size"], ident["mtime_ns"])] = key

    def done(self, video: str | os.PathLike[str]) -> bool:
        """Whether ``video`` has a current result for this file content and these settings.

        Remembers the file's identity now, before it runs: a file that changes while it is
        classified is classified again by the next run. A file recorded under another
        name (a hard link, a bind mount: the same inode, size and mtime) is that record's
        video: skipped or superseded under its first name, never recorded twice.
        """
        key = video_key(video)
        ident = _ident(key)
        self._alias.pop(key, None)
        if key not in self._state and ident is not None:
            first = self._inodes.get((ident["ino"], ident["size"], ident["mtime_ns"]))
            if first is not None and first != key and _same_file(self._state[first].identity,
                                                                 ident):
                self._alias[key] = key = first
        self._identity[key] = ident
        cur = self._state.get(key)
        return (cur is not None and not cur.error and _same_file(cur.identity, ident)
                and cur.settings == self.settings)

    def counts(self) -> dict[str, int]:
        """Current records in the file: ``{"videos", "results", "errors"}``."""
        errors = sum(c.error for c in self._state.values())
        return {"videos": len(self._state), "results": len(self._state) - errors,
                "errors": errors}

    # -- writing -------------------------------------------------------------------------
    def append(self, record: dict[str, Any], text: str | None = None) -> None:
        """Write one finished record (with ``source`` and ``settings``), fsynced.

        ``text``: the record already serialised (:func:`record_json`), so that a record
        printed and stored is serialised once. Partial records are not results and are not
        written. Raises ``OSError`` if the line cannot be written; the file is left as it was.
        """
        if record.get("partial"):
            return
        if self._fd is None:
            raise ConfigError(f"{self.path}: closed")
        key = video_key(str(record.get("video")))
        key = self._alias.get(key, key)
        ident = self._identity.pop(key, None) or _ident(key)
        source: dict[str, Any] = {"path": key, **(ident or {"size": None, "mtime_ns": None})}
        if "source" in record or "settings" in record:  # replaced below, as dict keys would be
            text = record_json({k: v for k, v in record.items() if k not in ("source", "settings")})
        elif text is None:
            text = record_json(record)
        # the record's object with two more keys: as json.dumps of the extended dict
        tail = f"{SEP[0]}\"source\"{SEP[1]}{record_json(source)}{SEP[0]}\"settings\"{SEP[1]}"
        if text != "{}":
            data = f"{text[:-1]}{tail}{self._settings_json}}}\n".encode()
        else:
            data = f"{{{tail[len(SEP[0]):]}{self._settings_json}}}\n".encode()
        start = os.fstat(self._fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)
        except OSError:
            try:
                os.ftruncate(self._fd, start)  # no partial line left behind
            except OSError:
                pass
            raise
        if key in self._state:
            self._stale += 1
        self._state[key] = _Current("error" in record, ident, self.settings)
        self._remember(key, ident)

    def compact(self) -> None:
        """Rewrite the file with the current line of each video (atomic; see module doc)."""
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        tail = lines.pop()
        keys = []
        for line in lines:
            try:
                keys.append(_line_key(json.loads(line)))
            except ValueError:
                keys.append(None)
        last = {k: i for i, k in enumerate(keys) if k is not None}
        kept = [ln for i, (ln, k) in enumerate(zip(lines, keys))
                if (k is None and ln.strip()) or (k is not None and last[k] == i)]
        replace_atomically(self.path, b"".join(ln + b"\n" for ln in kept) + tail)
        self._lock.retarget()
        if self._fd is not None:  # the open descriptor points at the replaced file
            os.close(self._fd)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._stale = 0

    def close(self) -> None:
        """Compact (if needed; a failure leaves a valid file and a warning) and unlock."""
        if self._fd is None:
            return
        try:
            if self._stale:
                try:
                    self.compact()
                except OSError as e:
                    self.warnings.append(
                        f"{self.path}: not compacted ({e.strerror or e}); it stays valid, "
                        "the last line of each video is its record"
                    )
        finally:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self._lock.release()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


SEP = (", ", ": ")  # the separators of every JSON line (hms-run --json, --output)


def record_json(obj: Any) -> str:
    """One record (or any JSON value) as the JSON text of ``hms-run --json`` / ``--output``."""
    return json.dumps(obj, separators=SEP)


def run_settings(session: Any, options: Any, **extra: Any) -> dict[str, Any]:
    """The settings that change a record, for :class:`ResultsFile` (``extra``: more of them).

    ``model`` is the export's manifest hash (or the checkpoint's, torch engine); then
    engine, device, and the run settings' resume key
    (:meth:`~hms_deploy.runtime.options.RunSettings.resume_key`: policy, budget (GMAC), T,
    topk, the no-audio policy and whether truncated files are classified; batch size,
    online mode and decoding do not change a final record's decisions or probabilities).
    """
    es = session.engine_set
    return {
        "model": es.export_sha256 or session.checkpoint_sha256,
        "engine": es.backend, "device": str(es.device), **options.resume_key(), **extra,
    }
