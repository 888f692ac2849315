"""What a feature store records about itself and each video: ``store.json``
(:class:`StoreMeta`), the index lines (:class:`VideoRecord`) and the hash of the
backbones the features came from (:func:`backbone_hash`). The store is
:mod:`hms_deploy.data.features`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hms_deploy.config import MODALITIES, HMSConfig
from hms_deploy.errors import DatasetError

FORMAT = "hms-feature-store"
FORMAT_VERSION = 1
DTYPES = ("float16", "float32")
DEFAULT_DTYPE = "float16"  # half the disk of float32
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
    size: int | None = None  # the video file's size and mtime when extracted (None: unknown)
    mtime_ns: int | None = None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> VideoRecord:
        size, mtime = d.get("size"), d.get("mtime_ns")
        return cls(
            key=str(d["key"]), path=str(d["path"]), label=str(d["label"]),
            label_index=int(d["label_index"]), duration_s=float(d["duration_s"]),
            has_audio=bool(d["has_audio"]), shard=int(d["shard"]), slot=int(d["slot"]),
            size=None if size is None else int(size),
            mtime_ns=None if mtime is None else int(mtime),
        )

    def matches(self, identity: dict[str, int] | None) -> bool:
        """Whether the video file still has this identity (a record without one: trusted)."""
        if self.size is None or self.mtime_ns is None:
            return True
        return identity == {"size": self.size, "mtime_ns": self.mtime_ns}
