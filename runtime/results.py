"""``hms-run --output results.jsonl``: append-only, crash-safe, resumable result files.

One JSON object per line, one line per finished video (never the partial records of
``--online``). Each line is written with one ``write`` call, flushed and fsynced before
the next video starts, so a crash loses at most the video in progress and can tear at
most the last line.

On reopening (a rerun):

- a video with a result line (an object with ``"video"`` and no ``"error"``) is done and
  skipped; its name is matched as given and as an absolute path, so a rerun from the
  same directory with the same arguments finds it;
- a video with only error lines is retried (its new line is appended; old lines stay);
- a torn last line (no trailing newline and not valid JSON, i.e. a crash mid-write) is
  cut off before anything is appended; other lines that are not valid JSON are ignored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from typing_extensions import Self

from hms_deploy.errors import ConfigError


def _key(video: str) -> str:
    return os.path.abspath(video)


class ResultsFile:
    """An open ``results.jsonl``; :meth:`done` tells which videos to skip."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_dir():
            raise ConfigError(f"--output {self.path}: is a directory, expected a .jsonl file")
        self._done: set[str] = set()
        self.torn = False
        self._scan()
        self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def _scan(self) -> None:
        if not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        tail = lines.pop()  # b"" when the file ends with a newline
        if tail:
            try:
                obj = json.loads(tail)
            except ValueError:
                obj = None
            if isinstance(obj, dict):
                # a complete object that only lacks its newline: keep it, add the newline
                lines.append(tail)
                with open(self.path, "ab") as f:
                    f.write(b"\n")
            else:
                self.torn = True
                with open(self.path, "r+b") as f:
                    f.truncate(len(data) - len(tail))
        for line in lines:
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if (
                isinstance(obj, dict) and isinstance(obj.get("video"), str)
                and "error" not in obj and not obj.get("partial")
            ):
                self._done.add(_key(obj["video"]))

    def done(self, video: str) -> bool:
        """Whether ``video`` already has a result line."""
        return _key(video) in self._done

    def append(self, record: dict[str, Any]) -> None:
        """Write one line, flush and fsync."""
        self._f.write(json.dumps(record, separators=(", ", ": ")) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        if "error" not in record and not record.get("partial"):
            self._done.add(_key(str(record.get("video"))))

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
