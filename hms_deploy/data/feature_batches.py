"""Feature batches for training and evaluation, and the train/validation split."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from hms_deploy.data.features import FeatureStore
from hms_deploy.errors import DatasetError

IN_MEMORY_BYTES = 2 * 2**30  # float32 features below this are loaded once


class FeatureSource:
    """Raw features of some videos of a store, as float32 torch tensors (N, T, D).

    Small selections (< 2 GiB as float32) are read once into memory; larger ones are read
    from the memory-mapped shards batch by batch.
    """

    def __init__(self, store: FeatureStore, indices: Sequence[int] | NDArray[np.int64] | None = None,
                 modalities: Sequence[str] | None = None,
                 normalizer: dict[str, tuple[NDArray[np.float64], NDArray[np.float64]]] | None = None):
        self.store = store
        self.normalizer = normalizer
        self.indices = (np.arange(len(store)) if indices is None
                        else np.asarray(indices, dtype=np.int64))
        self.modalities = tuple(modalities or store.modalities)
        self.labels = torch.from_numpy(store.label_indices()[self.indices])
        per_video = sum(store.meta.dims[m] for m in self.modalities) * store.steps * 4
        self._cache: dict[str, torch.Tensor] | None = None
        if per_video * len(self.indices) <= IN_MEMORY_BYTES:
            arrays = store.read(self.indices, self.modalities)
            self._cache = {m: torch.from_numpy(a) for m, a in self._normalize(arrays).items()}

    def __len__(self) -> int:
        return int(self.indices.size)

    def get(self, rows: NDArray[np.int64] | Sequence[int]) -> dict[str, torch.Tensor]:
        """Features of positions ``rows`` (into this source, not the store)."""
        rows = np.asarray(rows, dtype=np.int64)
        if self._cache is not None:
            t = torch.from_numpy(rows)
            return {m: a.index_select(0, t) for m, a in self._cache.items()}
        arrays = self.store.read(self.indices[rows], self.modalities)
        return {m: torch.from_numpy(a) for m, a in self._normalize(arrays).items()}

    def set_normalizer(self, normalizer: dict[str, tuple[NDArray[np.float64], NDArray[np.float64]]]) -> None:
        """From now on return ``(x - mean) / std`` per dimension (see :meth:`statistics`)."""
        if self.normalizer is not None:
            raise RuntimeError("source is already normalised")
        self.normalizer = normalizer
        if self._cache is not None:
            self._cache = {m: torch.from_numpy(a) for m, a in self._normalize(
                {m: t.numpy() for m, t in self._cache.items()}).items()}

    def _normalize(
        self, arrays: dict[str, NDArray[np.floating[Any]]]
    ) -> dict[str, NDArray[np.floating[Any]]]:
        if self.normalizer is None:
            return arrays
        out = {}
        for m, a in arrays.items():
            mu, sd = self.normalizer[m]
            out[m] = ((a - mu.astype(np.float32)) / sd.astype(np.float32)).astype(np.float32)
        return out

    def statistics(self, batch_size: int = 256) -> dict[str, tuple[NDArray[np.float64], NDArray[np.float64]]]:
        """Per-dimension mean and std of the raw features over all videos and steps:
        ``{modality: (mean (D,), std (D,))}`` float64; a constant dimension gets std 1."""
        if self.normalizer is not None:
            raise RuntimeError("statistics() of a normalised source")
        sums: dict[str, list[Any]] = {}
        for a in range(0, len(self), batch_size):
            for m, x in self.get(np.arange(a, min(a + batch_size, len(self)))).items():
                x = x.double().reshape(-1, x.shape[-1])
                s = sums.setdefault(m, [0, 0.0, 0.0])
                s[0] += x.shape[0]
                s[1] = s[1] + x.sum(0)
                s[2] = s[2] + (x * x).sum(0)
        out = {}
        for m, (n, s1, s2) in sums.items():
            mu = (s1 / n).numpy()
            var = np.maximum((s2 / n).numpy() - mu * mu, 0.0)
            sd = np.sqrt(var)
            sd[sd <= 1e-12 * np.maximum(1.0, np.abs(mu))] = 1.0
            out[m] = (mu, sd)
        return out

    def batches(self, batch_size: int, *, shuffle: bool = False,
                generator: np.random.Generator | None = None
                ) -> Iterator[tuple[NDArray[np.int64], dict[str, torch.Tensor], torch.Tensor]]:
        """(rows, features, labels) per batch; ``shuffle`` draws the order from ``generator``."""
        order = (generator or np.random.default_rng()).permutation(len(self)) if shuffle \
            else np.arange(len(self))
        for a in range(0, len(order), batch_size):
            rows = order[a:a + batch_size]
            yield rows, self.get(rows), self.labels[torch.from_numpy(rows)]


def stratified_split(
    labels: NDArray[np.int64], fraction: float, seed: int, *, setting: str = "val_store",
    expected: str = "a validation store",
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Indices (train, val): ``round(fraction * n_c)`` videos of every class c go to validation
    (at least 1 where the class has >= 2 videos), drawn with ``seed``; ``fraction`` in (0, 1)
    (the callers' settings check it: :func:`hms_deploy.train.config.check_val_fraction`).
    An empty validation split is refused naming ``setting``, the caller's way to give a
    validation set (``expected``: what that setting takes)."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(idx.size)]
        k = round(fraction * idx.size)
        if idx.size >= 2:
            k = min(max(k, 1), idx.size - 1)
        else:
            k = 0
        val.extend(idx[:k].tolist())
        train.extend(idx[k:].tolist())
    if not val:
        raise DatasetError(f"validation split is empty: the store is too small; use {setting}",
                           setting=setting, expected=expected)
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(val, dtype=np.int64))
