"""The feature store: raw per-step backbone features of many videos, resumable.

HMS trains on frozen features (HMS_SPEC.md 8): ``hms-extract`` runs the three encoders
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

Extraction (:func:`extract`, behind ``hms-extract``): decoding processes turn each video
into the inputs of all T steps (:func:`prepare_video`: log-mel patches, appearance
frames, the distinct frames of the motion clips); the main process runs the three
encoders of the checkpoint on them, ``batch_size`` steps per call, and appends the raw
features. Memory: a video in flight holds its distinct motion frames, e.g. up to
~150 kB each at 224 px (a 2-minute 30 fps video at T = 128: <= 3600 frames, ~0.5 GB), and
up to ``2 * workers`` videos are in flight.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hms_deploy.config import MODALITIES, HMSConfig
from hms_deploy.errors import DatasetError
from hms_deploy.version import __version__

FORMAT = "hms-feature-store"
FORMAT_VERSION = 1
DTYPES = ("float16", "float32")
DEFAULT_SHARD_SIZE = 256


# --------------------------------------------------------------------------- hashing


def backbone_hash(config: HMSConfig, state_dict: dict[str, Any]) -> str:
    """sha256 identifying what the stored features depend on.

    Covers every tensor of the three encoders (``<modality>_backbone.encoder.*``, by
    sorted name: name, dtype, shape and bytes) and the preprocessing of the config
    (backbone archs, widths, feature dims, resize/crop, mean/std, the audio front end and
    the motion clip). Projections, cells, gates, head and T are not included: training
    changes the former and T is stored separately.
    """
    import torch

    h = hashlib.sha256()
    pre = {
        m: {k: v for k, v in asdict(config.backbone(m)).items() if k != "proj_dim"}
        for m in MODALITIES
    }
    pre["front_end"] = asdict(config.front_end)
    pre["clip"] = asdict(config.clip)
    h.update(json.dumps(pre, sort_keys=True).encode())
    prefixes = tuple(f"{m}_backbone.encoder." for m in MODALITIES)
    for name in sorted(k for k in state_dict if k.startswith(prefixes)):
        t = state_dict[name]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class StoreMeta:
    """The contents of ``store.json``."""

    steps: int
    dtype: str
    dims: dict[str, int]
    labels: list[str]
    backbone_hash: str
    variant: str = ""
    shard_size: int = DEFAULT_SHARD_SIZE
    created: str = ""
    producer: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, d: dict[str, Any], where: Path) -> StoreMeta:
        if d.get("format") != FORMAT:
            raise DatasetError(f"{where}: not a feature store (no '{FORMAT}' header)")
        if int(d.get("format_version", 0)) > FORMAT_VERSION:
            raise DatasetError(
                f"{where}: store format {d['format_version']} is newer than this hms-deploy "
                f"reads ({FORMAT_VERSION})"
            )
        try:
            return cls(
                steps=int(d["steps"]), dtype=str(d["dtype"]),
                dims={k: int(v) for k, v in d["dims"].items()}, labels=list(d["labels"]),
                backbone_hash=str(d["backbone_hash"]), variant=str(d.get("variant", "")),
                shard_size=int(d.get("shard_size", DEFAULT_SHARD_SIZE)),
                created=str(d.get("created", "")), producer=str(d.get("producer", "")),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise DatasetError(f"{where}: malformed store.json ({e})") from None

    def compatible_with(self, other: StoreMeta) -> list[str]:
        """Differences that forbid appending ``other``'s videos to this store."""
        diffs = []
        for name in ("steps", "dtype", "dims", "backbone_hash", "shard_size"):
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                if name == "backbone_hash":
                    a, b = a[:12], b[:12]
                diffs.append(f"{name} {a} (store) vs {b} (requested)")
        if self.labels != other.labels:
            diffs.append(f"labels differ ({len(self.labels)} in the store, {len(other.labels)} requested)")
        return diffs


@dataclass(frozen=True)
class VideoRecord:
    """One indexed video. ``key`` is its path as written in the dataset list."""

    key: str
    path: str
    label: str
    label_index: int
    duration_s: float
    has_audio: bool
    shard: int
    slot: int

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> VideoRecord:
        return cls(
            key=str(d["key"]), path=str(d["path"]), label=str(d["label"]),
            label_index=int(d["label_index"]), duration_s=float(d["duration_s"]),
            has_audio=bool(d["has_audio"]), shard=int(d["shard"]), slot=int(d["slot"]),
        )


def _fsync_dir(path: Path) -> None:
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

    def __init__(self, root: str | os.PathLike, *, _writer: bool = False) -> None:
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
        self.records: list[VideoRecord] = [r for r in records if self._complete(r)]
        self._by_key = {r.key: i for i, r in enumerate(self.records)}
        self._slots: dict[int, int] = {}  # shard -> indexed slots
        for r in self.records:
            self._slots[r.shard] = max(self._slots.get(r.shard, 0), r.slot + 1)
        self._maps: dict[tuple[str, int], np.memmap] = {}
        self._writer = _writer
        self._lock_fd: int | None = None

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

    def label_indices(self) -> np.ndarray:
        """``(N,)`` int64 class index of every record, in index order."""
        return np.array([r.label_index for r in self.records], dtype=np.int64)

    def _map(self, modality: str, shard: int) -> np.memmap:
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
        indices: Sequence[int] | np.ndarray | None = None,
        modalities: Iterable[str] | None = None,
        dtype: str | np.dtype = np.float32,
    ) -> dict[str, np.ndarray]:
        """Features of records ``indices`` (all if None): ``{modality: (n, T, D)}`` in ``dtype``."""
        idx = np.arange(len(self.records)) if indices is None else np.asarray(indices, np.int64)
        mods = tuple(modalities) if modalities is not None else self.modalities
        out: dict[str, np.ndarray] = {}
        for m in mods:
            if m not in self.meta.dims:
                raise DatasetError(f"{self.root}: store has no {m!r} features")
            arr = np.empty((idx.size, self.meta.steps, self.meta.dims[m]), dtype=dtype)
            for j, i in enumerate(idx.tolist()):
                r = self.records[i]
                arr[j] = self._map(m, r.shard)[r.slot]
            out[m] = arr
        return out

    def read_key(self, key: str, dtype: str | np.dtype = np.float32) -> dict[str, np.ndarray]:
        """Features of one video: ``{modality: (T, D)}``."""
        if key not in self._by_key:
            raise DatasetError(f"{self.root}: no video {key!r} in the store")
        return {m: a[0] for m, a in self.read([self._by_key[key]], dtype=dtype).items()}

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
    def open_for_writing(cls, root: str | os.PathLike, meta: StoreMeta) -> FeatureStore:
        """Create the store or reopen it to resume; refuses a store with other metadata.

        Takes an exclusive lock (``.lock``; a second writer fails), drops a torn index
        tail and truncates shard files to the last indexed slot, and clears
        ``errors.jsonl`` (failures are retried and re-recorded by the new run).
        """
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise DatasetError(f"{root}: exists and is not a directory")
        root.mkdir(parents=True, exist_ok=True)
        lock_fd = _lock(root)
        try:
            meta_path = root / "store.json"
            if meta_path.is_file():
                store = cls(root, _writer=True)
                diffs = store.meta.compatible_with(meta)
                if diffs:
                    raise DatasetError(
                        f"{root}: existing store does not match this extraction: "
                        + "; ".join(diffs) + " (use another --out)"
                    )
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
        if len(rows) != len(self.records):
            tmp = index.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(asdict(r)) + "\n" for r in self.records))
            os.replace(tmp, index)
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

    def write_features(self, feats: dict[str, np.ndarray]) -> tuple[int, int]:
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
        has_audio: bool, shard: int, slot: int,
    ) -> VideoRecord:
        """Append the index line of a video whose features :meth:`write_features` wrote."""
        rec = VideoRecord(key, path, label, int(label_index), float(duration_s), bool(has_audio),
                          int(shard), int(slot))
        with (self.root / "index.jsonl").open("ab") as f:
            f.write((json.dumps(asdict(rec)) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
        self._by_key[key] = len(self.records)
        self.records.append(rec)
        self._slots[rec.shard] = max(self._slots.get(rec.shard, 0), rec.slot + 1)
        return rec

    def add(self, *, feats: dict[str, np.ndarray], **fields: Any) -> VideoRecord:
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
        if self._lock_fd is not None:
            _unlock(self._lock_fd)
            self._lock_fd = None



def _lock(root: Path) -> int:
    import fcntl

    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise DatasetError(f"{root}: another hms-extract is writing this store") from None
    return fd


def _unlock(fd: int) -> None:
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def open_store(root: str | os.PathLike) -> FeatureStore:
    """Open a store for reading (:class:`DatasetError` if it is not one)."""
    return FeatureStore(root)


# ------------------------------------------------------------------------ extraction


@dataclass
class VideoInputs:
    """What a decoding worker sends back for one video (all steps).

    ``mel`` (T, 1, 96, 64) float32; ``frames`` (T, 3, S_I, S_I) uint8; motion clips are
    sent as their distinct frames ``motion_frames`` (U, 3, S_M, S_M) uint8 plus
    ``motion_index`` (T, 32) int64 into them (clip t = ``motion_frames[motion_index[t]]``
    with time moved to axis 1), 32x less data than the clips themselves.
    """

    duration_s: float
    has_audio: bool
    mel: np.ndarray
    frames: np.ndarray
    motion_frames: np.ndarray
    motion_index: np.ndarray

    def clips(self, steps: slice | np.ndarray) -> np.ndarray:
        """Motion clips of ``steps``: (S, 3, 32, S_M, S_M) uint8, as ``StepSampler.motion_inputs``."""
        c = self.motion_frames[self.motion_index[steps]]  # (S, 32, 3, H, W)
        return np.ascontiguousarray(c.transpose(0, 2, 1, 3, 4))


@dataclass
class VideoFeatures:
    """One video's raw features ``feats`` {modality: (T, D) float32}, ready for the store."""

    duration_s: float
    has_audio: bool
    feats: dict[str, np.ndarray]


def prepare_video(path: str | os.PathLike, config: HMSConfig, steps: int) -> VideoInputs:
    """Decode one video into the inputs of all ``steps`` steps (HMS_SPEC.md 1).

    Uses :mod:`hms_deploy.data.video` (probe, aligned audio, decode-on-demand, resize and
    crop) and the front end of :mod:`hms_deploy.data.audio`. Raises
    :class:`~hms_deploy.errors.VideoError` for a file that cannot be decoded.
    """
    from hms_deploy.data.video import (
        FrameSource,
        StepSampler,
        decode_audio,
        probe,
        resize_center_crop_batch,
    )

    info = probe(path)
    sampler = StepSampler.from_config(info, config, steps=steps)
    wave, has_audio = decode_audio(path, config.front_end.sample_rate, info=info)
    mel = sampler.audio_patches(wave)
    with FrameSource(info) as src:
        frames = sampler.appearance_inputs(src)
        idx = sampler.motion_indices
        decoded = src.read(idx)
        uniq = sorted(decoded)
        motion_frames = resize_center_crop_batch(
            [decoded[i] for i in uniq], sampler.motion_resize, sampler.motion_crop
        )
        motion_index = np.searchsorted(uniq, idx)
    return VideoInputs(
        duration_s=float(info.duration_s), has_audio=bool(has_audio), mel=mel, frames=frames,
        motion_frames=motion_frames, motion_index=motion_index,
    )


def build_encoders(config: HMSConfig, state_dict: dict[str, Any]) -> dict[str, Any]:
    """The three encoders of a checkpoint (any policy), eval mode: {modality: nn.Module}."""
    from hms_deploy.model.hms import HMS

    model = HMS(config)
    enc = {k: v for k, v in state_dict.items() if ".encoder." in k}
    missing = [k for k in model.state_dict() if ".encoder." in k and k not in enc]
    if missing:
        raise DatasetError(f"checkpoint lacks backbone weights (e.g. {missing[:2]})")
    model.load_state_dict(enc, strict=False)
    return {m: getattr(model, f"{m}_backbone").encoder.eval() for m in MODALITIES}


def encode_video(
    encoders: dict[str, Any], inputs: VideoInputs, batch_size: int = 16
) -> dict[str, np.ndarray]:
    """Raw features of one video: ``{modality: (T, D) float32}``, in chunks of ``batch_size`` steps.

    Chunks depend only on T and ``batch_size``, so a video's features do not depend on
    which other videos are extracted with it.
    """
    import torch

    steps = inputs.mel.shape[0]
    out: dict[str, list[np.ndarray]] = {m: [] for m in MODALITIES}
    with torch.inference_mode():
        for a in range(0, steps, batch_size):
            s = slice(a, min(a + batch_size, steps))
            out["audio"].append(encoders["audio"](torch.from_numpy(inputs.mel[s])).numpy())
            out["appearance"].append(
                encoders["appearance"](torch.from_numpy(inputs.frames[s])).numpy())
            out["motion"].append(encoders["motion"](torch.from_numpy(inputs.clips(s))).numpy())
    return {m: np.concatenate(v).astype(np.float32, copy=False) for m, v in out.items()}


# -- worker side ----------------------------------------------------------------------

_WORKER_CONFIG: dict[str, HMSConfig] = {}


def _worker_init() -> None:
    import warnings

    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def decode_job(key: str, path: str, config: HMSConfig, steps: int) -> tuple[Any, str | None]:
    """Decode one video in this process: ``(VideoInputs, None)`` or ``(None, one-line error)``."""
    _, inputs, error = _prepare_job(key, path, json.dumps(config.to_dict()), steps)
    return inputs, error


def encode_job(
    key: str, encoders: dict[str, Any], inputs: VideoInputs, batch_size: int
) -> tuple[VideoFeatures | None, str | None]:
    """Run the encoders on one decoded video: ``(VideoFeatures, None)`` or ``(None, error)``."""
    try:
        feats = encode_video(encoders, inputs, batch_size)
    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
        return None, f"{key}: backbone failed ({type(e).__name__}: {_one_line(e)})"
    return VideoFeatures(inputs.duration_s, inputs.has_audio, feats), None


def _prepare_job(key: str, path: str, config_json: str, steps: int) -> tuple[str, Any, str | None]:
    """Worker entry: (key, VideoInputs or None, error or None); never raises."""
    from hms_deploy.errors import HMSError

    try:
        cfg = _WORKER_CONFIG.get(config_json)
        if cfg is None:
            cfg = _WORKER_CONFIG[config_json] = HMSConfig.from_dict(json.loads(config_json))
        return key, prepare_video(path, cfg, steps), None
    except HMSError as e:
        return key, None, _one_line(e)
    except MemoryError:
        return key, None, f"{path}: out of memory while decoding"
    except Exception as e:  # noqa: BLE001 - a bad video must not stop the run
        return key, None, f"{path}: {type(e).__name__}: {_one_line(e)}"


# -- main side ------------------------------------------------------------------------


def iter_inputs(
    entries: Sequence[Any], config: HMSConfig, steps: int, workers: int = 1
) -> Iterator[tuple[Any, VideoInputs | None, str | None]]:
    """Decode ``entries`` (objects with ``key`` and ``path``) in ``workers`` processes.

    Yields ``(entry, inputs, None)`` or ``(entry, None, one-line error)`` in the order of
    ``entries`` (at most ``2 * workers`` videos in flight). ``workers=0`` decodes here.
    """
    import concurrent.futures as cf
    import multiprocessing as mp

    config_json = json.dumps(config.to_dict())
    if workers == 0:
        for e in entries:
            _, inputs, error = _prepare_job(e.key, str(e.path), config_json, steps)
            yield e, inputs, error
        return
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init) as pool:
        window: list[tuple[Any, cf.Future]] = []
        it = iter(entries)
        try:
            while True:
                while len(window) < 2 * workers:
                    e = next(it, None)
                    if e is None:
                        break
                    window.append(
                        (e, pool.submit(_prepare_job, e.key, str(e.path), config_json, steps)))
                if not window:
                    break
                e, fut = window.pop(0)  # in list order: a reproducible store
                try:
                    _, inputs, error = fut.result()
                except cf.process.BrokenProcessPool:
                    raise DatasetError(
                        "a decoding worker died (out of memory?); rerun to resume, with fewer "
                        "--workers"
                    ) from None
                yield e, inputs, error
        finally:
            for _, f in window:
                f.cancel()


def local_features(
    entries: Sequence[Any], config: HMSConfig, steps: int, *, workers: int,
    encoders: dict[str, Any], batch_size: int,
) -> Iterator[tuple[Any, VideoFeatures | None, str | None]]:
    """The single-machine source of :func:`extract`: decode in ``workers`` processes
    (:func:`iter_inputs`), encode here. Yields ``(entry, features or None, error)``."""
    for e, inputs, error in iter_inputs(entries, config, steps, workers):
        feats = None
        if error is None and inputs is not None:
            feats, error = encode_job(e.key, encoders, inputs, batch_size)
        yield e, feats, error


@dataclass
class ExtractReport:
    """Outcome of :func:`extract`: counts, failures (key, one-line error) and timing."""

    store: Path
    total: int
    extracted: int
    skipped: int
    failed: list[tuple[str, str]]
    seconds: float
    warnings: list[str] = field(default_factory=list)

    @property
    def videos_per_min(self) -> float:
        return 60.0 * self.extracted / self.seconds if self.seconds > 0 else float("nan")

    def summary(self) -> str:
        s = (f"{self.extracted} extracted, {self.skipped} already in the store, "
             f"{len(self.failed)} failed, of {self.total} rows; {self.seconds:.1f} s "
             f"({self.videos_per_min:.1f} videos/min)")
        return s


FeatureSource = Callable[
    [Sequence[Any], HMSConfig, int], Iterable[tuple[Any, VideoFeatures | None, str | None]]
]
"""``source(entries, config, steps)``: see :func:`extract`."""

CRASH_ENV = "HMS_EXTRACT_CRASH_AFTER"
"""Test hook: with ``HMS_EXTRACT_CRASH_AFTER=N`` the process dies (``os._exit(137)``,
like a SIGKILL) after committing N videos in this run, with the next video's features
already written but not indexed: the worst place to be killed."""


def extract(
    ckpt: Any,
    dataset: Any,
    out: str | os.PathLike,
    *,
    steps: int | None = None,
    workers: int = 1,
    dtype: str = "float16",
    batch_size: int = 16,
    shard_size: int = DEFAULT_SHARD_SIZE,
    progress: bool = True,
    source: FeatureSource | None = None,
) -> ExtractReport:
    """Extract raw features of every video of ``dataset`` into the store ``out``.

    Args:
        ckpt: a :class:`~hms_deploy.checkpoint.Checkpoint` (its encoders and labels).
        dataset: a :class:`~hms_deploy.data.datasets.DatasetList`.
        steps: T (default: the checkpoint's).
        workers: decoding processes (decode + log-mel + resize/crop run there; the
            backbones run in this process). 0 decodes in this process.
        dtype: ``float16`` (default, half the disk) or ``float32``.
        batch_size: steps per backbone call.
        source: what computes the features of the videos to extract: ``source(entries,
            config, steps)`` yields ``(entry, VideoFeatures or None, one-line error or
            None)`` per entry, in any order (default :func:`local_features`; the Ray
            Data source is :func:`hms_deploy.runtime.ray_batch.ray_feature_source`).

    Videos already in the store are skipped; per-video failures (row problems, unknown
    labels, missing or undecodable files) are recorded in ``errors.jsonl`` and returned,
    and the other videos still run.
    """
    if dtype not in DTYPES:
        raise DatasetError(f"dtype {dtype!r}, expected one of {DTYPES}")
    if workers < 0 or batch_size < 1:
        raise DatasetError(f"need workers >= 0 and batch_size >= 1, got {workers}, {batch_size}")
    cfg = ckpt.config
    steps = int(steps or cfg.steps)
    if steps < 1:
        raise DatasetError(f"steps must be >= 1, got {steps}")
    meta = StoreMeta(
        steps=steps, dtype=dtype, dims={m: cfg.backbone(m).feat_dim for m in MODALITIES},
        labels=list(ckpt.labels), backbone_hash=backbone_hash(cfg, ckpt.state_dict),
        variant=cfg.variant, shard_size=shard_size,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), producer=f"hms_deploy {__version__}",
    )
    t0 = time.perf_counter()
    crash_after = int(os.environ.get(CRASH_ENV, "-1"))
    label_index = {name: i for i, name in enumerate(ckpt.labels)}
    store = FeatureStore.open_for_writing(out, meta)
    failed: list[tuple[str, str]] = []
    warnings: list[str] = []
    skipped = extracted = 0
    try:
        for prob in dataset.problems:
            failed.append((prob.key, prob.error))
            store.record_error(prob.key, "", prob.error)
        todo = []
        for e in dataset.entries:
            if e.key in store:
                skipped += 1
            elif e.label not in label_index:
                err = (f"{e.key}: line {e.line}: unknown label {e.label!r} "
                       f"(not one of the checkpoint's {len(label_index)} labels)")
                failed.append((e.key, err))
                store.record_error(e.key, str(e.path), err)
            else:
                todo.append(e)
        total = len(dataset.entries) + len(dataset.problems)
        if source is None:
            encoders = build_encoders(cfg, ckpt.state_dict)

            def local(entries: Sequence[Any], config: HMSConfig, steps: int) -> Iterator[Any]:
                return local_features(entries, config, steps, workers=workers,
                                      encoders=encoders, batch_size=batch_size)
            source = local
        bar = _progress(total, skipped + len(failed), progress)

        def finish(entry: Any, video: VideoFeatures | None, error: str | None) -> None:
            nonlocal extracted
            if error is not None or video is None:
                error = error or f"{entry.key}: no features"
                failed.append((entry.key, error))
                store.record_error(entry.key, str(entry.path), error)
            else:
                if extracted == 0 and dtype == "float16":
                    warnings.extend(_float16_warnings(video.feats))
                shard, slot = store.write_features(video.feats)
                if extracted == crash_after:
                    os._exit(137)
                store.commit(
                    key=entry.key, path=str(entry.path), label=entry.label,
                    label_index=label_index[entry.label], duration_s=video.duration_s,
                    has_audio=video.has_audio, shard=shard, slot=slot,
                )
                extracted += 1
            bar.update(1)
            bar.set_postfix(failed=len(failed), refresh=False)

        for e, video, error in source(todo, cfg, steps):
            finish(e, video, error)
        bar.close()
    finally:
        store.close()
    return ExtractReport(Path(out), total, extracted, skipped, failed, time.perf_counter() - t0,
                         warnings)


def _float16_warnings(feats: dict[str, np.ndarray]) -> list[str]:
    """Modalities whose typical |feature| is below float16's smallest normal number
    (6.1e-5), where float16 storage keeps only a few significant bits (e.g. random-init
    EfficientNet-B3 features, ~1e-5)."""
    out = []
    for m, a in feats.items():
        typical = float(np.median(np.abs(a)))
        if 0.0 < typical < float(np.finfo(np.float16).tiny):
            out.append(f"{m} features are ~{typical:.1e}, below float16's normal range: "
                       "stored with few significant bits; use --dtype float32")
    return out


def _progress(total: int, initial: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="video", desc="extract", disable=not enabled,
                dynamic_ncols=True)
