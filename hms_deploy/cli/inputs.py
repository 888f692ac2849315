"""What ``hms-run VIDEO...`` classifies: files, directories (scanned), ``@list.txt``.

Rules (each skip that is not by extension is reported, and counted in the summary):

- A file named on the command line (or in a list) is classified whatever its extension.
  One that does not exist stays in the list (its error record says "no such file");
  a dangling symlink or a symlink loop becomes an error record saying so.
- A directory is scanned recursively for :data:`VIDEO_EXTENSIONS` (case-insensitive),
  in sorted order. A regular file without an extension is probed (:func:`looks_like_video`:
  the first bytes of the common containers) and classified when it is one; the others
  are reported in one warning per directory. Symlinked sub-directories are **followed**, with loop protection: a
  directory already scanned (the same device and inode, e.g. a link back to an
  ancestor) is skipped with a warning. A dangling symlink or a symlink loop whose name
  has a video extension becomes an error record; an entry with a video extension that
  is not a regular file (a FIFO, a socket) and a sub-directory that cannot be read are
  warnings.
- A video reached twice (the same file: given twice, through a symlink, by another
  relative path, or another name of the same device and inode: a hard link, a bind
  mount) is classified once, under the first name; a warning names both.
- A list file has one path a line (blank lines and ``#`` comments skipped); relative
  paths are relative to the current directory.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path

from hms_deploy.data.datasets import VIDEO_EXTENSIONS
from hms_deploy.errors import ConfigError


@dataclass
class Inputs:
    """The expanded inputs: ``videos`` to classify, ``problems`` (name, error) that become
    error records without running, ``warnings`` (one line each), ``duplicates`` dropped."""

    videos: list[str] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    duplicates: int = 0
    _seen: dict[str, str] = field(default_factory=dict)
    _inodes: dict[tuple[int, int], str] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Inputs that get a record: videos plus problems."""
        return len(self.videos) + len(self.problems)

    def add(self, name: str) -> None:
        """Add a file by name (the checks and the duplicate rule of the module docstring)."""
        problem = link_problem(name)
        key = os.path.realpath(name) if problem is None else os.path.abspath(name)
        try:
            st = os.stat(key)
            inode: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except OSError:
            inode = None
        first = self._seen.get(key) or (self._inodes.get(inode) if inode else None)
        if first is not None:
            self.duplicates += 1
            self.warnings.append(
                f"'{name}' is the same file as '{first}': classified once"
                if name != first else f"'{name}' given more than once: classified once"
            )
            return
        self._seen[key] = name
        if inode is not None:
            self._inodes[inode] = name
        if problem is None:
            self.videos.append(name)
        else:
            self.problems.append((name, problem))


def link_problem(name: str) -> str | None:
    """Why a symlink ``name`` cannot be read (dangling, loop), or None."""
    if not os.path.islink(name):
        return None
    try:
        os.stat(name)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symbolic link loop (too many levels of symbolic links)"
        if e.errno == errno.ENOENT:
            return f"dangling symbolic link to '{os.readlink(name)}' (no such file)"
        return f"unreadable symbolic link ({e.strerror})"
    return None


def looks_like_video(path: str) -> bool:
    """Whether the file starts like a video container: ISO BMFF (MP4/MOV/3GP: ``ftyp``,
    ``moov``, ``mdat``... at byte 4), Matroska/WebM (EBML), AVI (RIFF...AVI), FLV, Ogg,
    MPEG-PS (pack header), ASF/WMV, or MPEG-TS (sync byte 0x47 every 188 bytes)."""
    try:
        with open(path, "rb") as f:
            head = f.read(188 * 3 + 1)
    except OSError:
        return False
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
        return True
    if head.startswith((b"\x1a\x45\xdf\xa3", b"FLV\x01", b"OggS", b"\x00\x00\x01\xba",
                        b"\x30\x26\xb2\x75\x8e\x66\xcf\x11")):
        return True
    if head.startswith(b"RIFF") and head[8:11] == b"AVI":
        return True
    return len(head) > 376 and head[0] == head[188] == head[376] == 0x47


def scan_dir(top: str, into: Inputs) -> int:
    """Add the videos under directory ``top`` (see the module rules).

    Returns how many entries with a video extension (or without an extension and probed
    as a video) it met, duplicates included.
    """
    found = 0
    not_videos: list[str] = []
    seen_dirs: dict[tuple[int, int], str] = {}
    st = os.stat(top)
    seen_dirs[(st.st_dev, st.st_ino)] = top

    def walk(d: str) -> None:
        nonlocal found
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:
            into.warnings.append(f"cannot read directory '{d}' ({e.strerror}): skipped")
            return
        for entry in entries:
            path = os.path.join(d, entry.name)
            is_video = Path(entry.name).suffix.lower() in VIDEO_EXTENSIONS
            if not Path(entry.name).suffix and entry.is_file(follow_symlinks=True):
                is_video = looks_like_video(path)
                if not is_video:
                    not_videos.append(path)
            found += is_video
            problem = link_problem(path) if entry.is_symlink() else None
            if problem is not None:
                if is_video:
                    into.add(path)  # becomes an error record
                else:
                    into.warnings.append(f"'{path}': {problem}: skipped")
                continue
            if entry.is_dir(follow_symlinks=True):
                s = os.stat(path)
                ident = (s.st_dev, s.st_ino)
                if ident in seen_dirs:
                    into.warnings.append(
                        f"'{path}' leads to '{seen_dirs[ident]}', already scanned "
                        "(a symlink loop or a second link): skipped"
                    )
                    continue
                seen_dirs[ident] = path
                walk(path)
            elif is_video:
                if entry.is_file(follow_symlinks=True):
                    into.add(path)
                else:
                    into.warnings.append(f"'{path}' is not a regular file: skipped")

    walk(top)
    if not_videos:
        shown = ", ".join(f"'{p}'" for p in not_videos[:3])
        more = f" and {len(not_videos) - 3} more" if len(not_videos) > 3 else ""
        into.warnings.append(f"{len(not_videos)} file(s) without an extension are not videos "
                             f"(probed): skipped: {shown}{more}")
    return found


def expand(items: tuple[str, ...] | list[str], into: Inputs | None = None) -> Inputs:
    """Expand command-line items (files, directories, ``@list.txt``) into :class:`Inputs`."""
    out = into if into is not None else Inputs()
    for item in items:
        if item.startswith("@"):
            lst = Path(item[1:])
            if not lst.is_file():
                raise ConfigError(f"list file '{lst}' not found")
            lines = [ln.strip() for ln in lst.read_text(encoding="utf-8").splitlines()]
            expand([ln for ln in lines if ln and not ln.startswith("#")], out)
        elif os.path.isdir(item):
            warned = len(out.warnings)
            if scan_dir(item, out) == 0 and len(out.warnings) == warned:
                raise ConfigError(
                    f"directory '{item}' holds no video files ({' '.join(sorted(VIDEO_EXTENSIONS))})"
                )
        else:
            out.add(item)
    return out


def expand_inputs(items: tuple[str, ...]) -> list[str]:
    """The names to classify (files, then problems, as :func:`expand` orders them)."""
    inputs = expand(items)
    return inputs.videos + [name for name, _ in inputs.problems]
