"""The feature store: raw per-step backbone features of many videos, resumable.

HMS trains on frozen features (docs/method.md §4): ``hms-extract`` runs the three encoders
of a checkpoint once per video and step and stores the *raw* features x (before the
projection), and ``hms-train`` / ``hms-eval`` read them.

Layout of a store directory::

    store.json                    metadata (written once, when the store is created)
    index.jsonl                   one JSON line per finished video (see VideoRecord)
    errors.jsonl                  one JSON line per video that failed in the latest run
    features/<modality>/<shard:05d>.bin
                                  raw little-endian arrays, C order, shape
                                  (videos in shard, T, D_modality), dtype of store.json

``store.json`` holds ``format``/``format_version``, ``steps`` (T), ``dtype``
(``float16`` or ``float32``), ``dims`` {modality: D}, ``shard_size`` (videos per shard
file), ``labels`` (the checkpoint's class names, index order), ``backbone_hash`` (see
:func:`backbone_hash`), the checkpoint's variant and the producer's version.

An index line is ``{"key", "path", "label", "label_index", "duration_s", "has_audio",
"shard", "slot"}``: the video's features are row ``slot`` of every modality's shard file
``shard``. Shards fill in order, so file offsets follow from (shard, slot).

Crash safety (one writer at a time, enforced by a lock file): a video's features are
appended to its shard files and fsynced *before* its index line is appended and fsynced.
A run killed at any point therefore leaves either a complete record or none: readers
ignore a torn last index line and any shard bytes past the last indexed slot; a writer
reopening the store truncates both (so a rerun appends where the last complete record
ended and skips every video already indexed).

Filled by :func:`hms_deploy.data.extraction.extract` (``hms-extract``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import DTypeLike, NDArray

from hms_deploy.config import MODALITIES
from hms_deploy.data.store_meta import (  # noqa: F401 - part of this module's API
    DEFAULT_SHARD_SIZE,
    DTYPES,
    FORMAT,
    FORMAT_VERSION,
    StoreMeta,
    VideoRecord,
    backbone_hash,
)
from hms_deploy.errors import DatasetError
from hms_deploy.outputs import OutputLock, OutputLocked, replace_atomically
from hms_deploy.outputs import fsync_dir as _fsync_dir


def _current(records: Iterable[VideoRecord]) -> list[VideoRecord]:
    """One record per key: a later index line (the video re-extracted after its file
    changed) supersedes an earlier one, in the earlier one's place."""
    out: list[VideoRecord] = []
    where: dict[str, int] = {}
    for r in records:
        if r.key in where:
            out[where[r.key]] = r
        else:
            where[r.key] = len(out)
            out.append(r)
    return out


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Complete lines of a JSONL file and the byte length they span (a torn tail is dropped)."""
    if not path.is_file():
        return [], 0
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # bytes up to and including the last newline
    out = []
    for ln in data[:end].splitlines():
        if not ln.strip():
            continue
        try:
            out.append(json.loads(ln))
        except ValueError:
            raise DatasetError(f"{path}: corrupt line (not JSON): {ln[:80]!r}") from None
    return out, end


# ----------------------------------------------------------------------------- store


class FeatureStore:
    """Read (and, with :meth:`open_for_writing`, append to) a feature store directory."""

    def __init__(self, root: str | os.PathLike[str], *, _writer: bool = False) -> None:
        self.root = Path(root)
        meta_path = self.root / "store.json"
        if not meta_path.is_file():
            raise DatasetError(f"{self.root}: not a feature store (no store.json)")
        try:
            self.meta = StoreMeta.from_json(json.loads(meta_path.read_text()), meta_path)
        except ValueError as e:
            raise DatasetError(f"{meta_path}: not JSON ({e})") from None
        if self.meta.dtype not in DTYPES:
            raise DatasetError(f"{meta_path}: dtype {self.meta.dtype!r}, expected one of {DTYPES}")
        rows, self._index_end = _read_jsonl(self.root / "index.jsonl")
        try:
            records = [VideoRecord.from_json(r) for r in rows]
        except (KeyError, TypeError, ValueError) as e:
            raise DatasetError(f"{self.root / 'index.jsonl'}: malformed record ({e})") from None
        # a record whose features are not all on disk (should not happen) is ignored
        self._sizes: dict[tuple[str, int], int] = {}
        self.records: list[VideoRecord] = _current(r for r in records if self._complete(r))
        self._by_key = {r.key: i for i, r in enumerate(self.records)}
        self._slots: dict[int, int] = {}  # shard -> indexed slots
        for r in self.records:
            self._slots[r.shard] = max(self._slots.get(r.shard, 0), r.slot + 1)
        self._maps: dict[tuple[str, int], np.memmap[Any, np.dtype[np.floating[Any]]]] = {}
        self._writer = _writer
        self._lock_fd: OutputLock | None = None
        self._superseded = 0  # index lines superseded in this session (compacted on close)

    # -- geometry ---------------------------------------------------------------------
    @property
    def steps(self) -> int:
        return self.meta.steps

    @property
    def labels(self) -> list[str]:
        return self.meta.labels

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m in MODALITIES if m in self.meta.dims)

    def _row_bytes(self, modality: str) -> int:
        return self.meta.steps * self.meta.dims[modality] * np.dtype(self.meta.dtype).itemsize

    def shard_path(self, modality: str, shard: int) -> Path:
        return self.root / "features" / modality / f"{shard:05d}.bin"

    def _complete(self, r: VideoRecord) -> bool:
        """Whether every modality's shard file holds the record's row (sizes cached)."""
        sizes = self._sizes
        for m in self.modalities:
            key = (m, r.shard)
            if key not in sizes:
                p = self.shard_path(m, r.shard)
                sizes[key] = p.stat().st_size if p.is_file() else -1
            if sizes[key] < (r.slot + 1) * self._row_bytes(m):
                return False
        return True

    # -- reading ----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.records)

    def __contains__(self, key: object) -> bool:
        return key in self._by_key

    def keys(self) -> list[str]:
        return [r.key for r in self.records]

    def label_indices(self) -> NDArray[np.int64]:
        """``(N,)`` int64 class index of every record, in index order."""
        return np.array([r.label_index for r in self.records], dtype=np.int64)

    def _map(self, modality: str, shard: int) -> np.memmap[Any, np.dtype[np.floating[Any]]]:
        key = (modality, shard)
        slots = self._slots[shard]
        m = self._maps.get(key)
        if m is None or m.shape[0] < slots:
            m = np.memmap(
                self.shard_path(modality, shard), dtype=self.meta.dtype, mode="r",
                shape=(slots, self.meta.steps, self.meta.dims[modality]),
            )
            self._maps[key] = m
        return m

    def read(
        self,
        indices: Sequence[int] | NDArray[np.int64] | None = None,
        modalities: Iterable[str] | None = None,
        dtype: DTypeLike = np.float32,
    ) -> dict[str, NDArray[np.floating[Any]]]:
        """Features of records ``indices`` (all if None): ``{modality: (n, T, D)}`` in ``dtype``."""
        idx = np.arange(len(self.records)) if indices is None else np.asarray(indices, np.int64)
        mods = tuple(modalities) if modalities is not None else self.modalities
        out: dict[str, NDArray[np.floating[Any]]] = {}
        for m in mods:
            if m not in self.meta.dims:
                raise DatasetError(f"{self.root}: store has no {m!r} features")
            arr = np.empty((idx.size, self.meta.steps, self.meta.dims[m]), dtype=dtype)
            for j, i in enumerate(idx.tolist()):
                r = self.records[i]
                arr[j] = self._map(m, r.shard)[r.slot]
            out[m] = arr
        return out

    def errors(self) -> list[dict[str, Any]]:
        """Failures recorded by the latest extraction run: ``[{"key", "path", "error"}]``."""
        rows, _ = _read_jsonl(self.root / "errors.jsonl")
        return rows

    def check_backbones(self, expected_hash: str, what: str = "checkpoint") -> None:
        """Raise :class:`DatasetError` unless the store was extracted with these backbones."""
        if expected_hash != self.meta.backbone_hash:
            raise DatasetError(
                f"{self.root}: features were extracted with other backbones than the {what} "
                f"(backbone hash {self.meta.backbone_hash[:12]} in the store vs "
                f"{expected_hash[:12]}); re-extract with this checkpoint"
            )

    # -- writing ----------------------------------------------------------------------
    @classmethod
    def open_for_writing(cls, root: str | os.PathLike[str], meta: StoreMeta, *,
                         lock: OutputLock | None = None) -> FeatureStore:
        """Create the store or reopen it to resume; refuses a store with other metadata.

        Takes an exclusive lock (``.lock``; a second writer fails; ``lock``: one taken
        earlier with :func:`lock_store`, then owned by the store), drops a torn index
        tail and truncates shard files to the last indexed slot, and clears
        ``errors.jsonl`` (failures are retried and re-recorded by the new run).
        """
        root = Path(root)
        lock_fd = lock if lock is not None else lock_store(root)
        try:
            meta_path = root / "store.json"
            if meta_path.is_file():
                store = cls(root, _writer=True)
                diffs = store.meta.compatible_with(meta)
                if diffs:
                    raise StoreMismatch(
                        f"{root}: existing store does not match this extraction: "
                        + "; ".join(diffs) + " (use another out directory)",
                        setting="out", value=str(root))
            else:
                if any(root.iterdir()) and not ({p.name for p in root.iterdir()} <= {".lock"}):
                    raise DatasetError(f"{root}: not empty and not a feature store")
                tmp = root / ".store.json.tmp"
                tmp.write_text(json.dumps(meta.to_json(), indent=2))
                os.replace(tmp, meta_path)
                _fsync_dir(root)
                store = cls(root, _writer=True)
            store._lock_fd = lock_fd
            store._repair()
            (root / "errors.jsonl").write_text("")
            return store
        except BaseException:
            _unlock(lock_fd)
            raise

    def _repair(self) -> None:
        """Truncate a torn index tail and unindexed shard bytes (writer only)."""
        index = self.root / "index.jsonl"
        if index.is_file() and index.stat().st_size != self._index_end:
            with index.open("r+b") as f:
                f.truncate(self._index_end)
                f.flush()
                os.fsync(f.fileno())
        # the index may also hold lines whose features are missing: rewrite without them
        rows, _ = _read_jsonl(index)
        if len(rows) != len(self.records):  # also drops superseded lines (one per video)
            replace_atomically(
                index, "".join(json.dumps(asdict(r)) + "\n" for r in self.records).encode()
            )
        slots = self._slots
        for m in self.modalities:
            d = self.root / "features" / m
            d.mkdir(parents=True, exist_ok=True)
            for p in d.glob("*.bin"):
                try:
                    shard = int(p.stem)
                except ValueError:
                    continue
                want = slots.get(shard, 0) * self._row_bytes(m)
                if p.stat().st_size > want:
                    with p.open("r+b") as f:
                        f.truncate(want)
        self._maps.clear()

    def _next_slot(self) -> tuple[int, int]:
        if not self._slots:
            return 0, 0
        shard = max(self._slots)
        if self._slots[shard] < self.meta.shard_size:
            return shard, self._slots[shard]
        return shard + 1, 0

    def write_features(self, feats: dict[str, NDArray[np.float32]]) -> tuple[int, int]:
        """Append one video's features (not yet indexed) and fsync; returns (shard, slot).

        ``feats[modality]`` is (T, D). Call :meth:`commit` with the returned position to
        make the video visible; until then a crash loses only this video.
        """
        if not self._writer:
            raise DatasetError(f"{self.root}: store opened read-only")
        shard, slot = self._next_slot()
        for m in self.modalities:
            a = np.ascontiguousarray(feats[m], dtype=self.meta.dtype)
            want = (self.meta.steps, self.meta.dims[m])
            if a.shape != want:
                raise DatasetError(f"{m} features have shape {a.shape}, expected {want}")
            p = self.shard_path(m, shard)
            p.parent.mkdir(parents=True, exist_ok=True)
            with p.open("ab") as f:
                if f.tell() != slot * self._row_bytes(m):
                    f.truncate(slot * self._row_bytes(m))
                    f.seek(slot * self._row_bytes(m))
                f.write(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())
                f.flush()
                os.fsync(f.fileno())
        return shard, slot

    def commit(
        self, *, key: str, path: str, label: str, label_index: int, duration_s: float,
        has_audio: bool, shard: int, slot: int, identity: dict[str, int] | None = None,
    ) -> VideoRecord:
        """Append the index line of a video whose features :meth:`write_features` wrote.

        ``identity``: the file's :func:`~hms_deploy.outputs.file_identity` taken before
        it was read. A key already in the store is superseded (its old rows become dead
        space in the shard files).
        """
        ident = identity or {}
        rec = VideoRecord(key, path, label, int(label_index), float(duration_s), bool(has_audio),
                          int(shard), int(slot), ident.get("size"), ident.get("mtime_ns"))
        with (self.root / "index.jsonl").open("ab") as f:
            f.write((json.dumps(asdict(rec)) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
        if key in self._by_key:
            self.records[self._by_key[key]] = rec
            self._superseded += 1
        else:
            self._by_key[key] = len(self.records)
            self.records.append(rec)
        self._slots[rec.shard] = max(self._slots.get(rec.shard, 0), rec.slot + 1)
        return rec

    def add(self, *, feats: dict[str, NDArray[np.float32]], **fields: Any) -> VideoRecord:
        """:meth:`write_features` then :meth:`commit`."""
        shard, slot = self.write_features(feats)
        return self.commit(shard=shard, slot=slot, **fields)

    def record_error(self, key: str, path: str, error: str) -> None:
        line = json.dumps({"key": key, "path": path, "error": error, "time": time.time()})
        with (self.root / "errors.jsonl").open("a") as f:
            f.write(line + "\n")
            f.flush()

    def close(self) -> None:
        self._maps.clear()
        if self._superseded and self._lock_fd is not None:  # one index line per video
            self._superseded = 0
            replace_atomically(
                self.root / "index.jsonl",
                "".join(json.dumps(asdict(r)) + "\n" for r in self.records).encode(),
            )
        if self._lock_fd is not None:
            _unlock(self._lock_fd)
            self._lock_fd = None



class StoreMismatch(DatasetError):
    """The store was made with other settings (steps, dtype, backbones, ...)."""


class StoreLocked(OutputLocked, DatasetError):
    """Another ``hms-extract`` holds the store's lock."""


def lock_store(root: str | os.PathLike[str]) -> OutputLock:
    """Create the store directory ``root`` if needed and take its writer's lock
    (:class:`StoreLocked` if another run holds it): before anything is loaded."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise DatasetError(f"{root}: exists and is not a directory")
    root.mkdir(parents=True, exist_ok=True)
    try:
        return OutputLock(root / ".lock", root, "hms-extract").acquire()
    except OutputLocked as e:
        raise StoreLocked(str(e)) from None


def _unlock(lock: OutputLock) -> None:
    lock.release()


def open_store(root: str | os.PathLike[str]) -> FeatureStore:
    """Open a store for reading (:class:`DatasetError` if it is not one)."""
    return FeatureStore(root)
