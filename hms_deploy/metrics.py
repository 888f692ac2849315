"""Classification metrics (docs/method.md §6): mAP, per-class AP, top-1 accuracy.

Average precision of one class, from scores ``s`` and 0/1 targets ``y`` with ``P > 0``
positives. Thresholds are the *distinct* scores in decreasing order (tied scores form one
threshold, as in scikit-learn); at threshold ``k`` precision ``p_k = TP_k / (TP_k + FP_k)``
and recall ``r_k = TP_k / P``.

- non-interpolated (default, scikit-learn's ``average_precision_score``):
  ``AP = sum_k (r_k - r_{k-1}) p_k`` with ``r_0 = 0``;
- interpolated (the ActivityNet protocol's ``interpolated_prec_rec``): precision is first
  replaced by its running maximum from the right, ``p'_k = max_{j >= k} p_j``, then
  ``AP = sum_k (r_k - r_{k-1}) p'_k``. (ActivityNet ranks individual predictions; here
  tied scores are one threshold, so the result does not depend on the order of ties.)

A class without a positive has no AP: it is left out of the mean, and the number of
such classes is reported (:class:`APResult.n_excluded`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from hms_deploy.errors import DatasetError


@dataclass(frozen=True)
class APResult:
    """Per-class average precision.

    Attributes:
        per_class: ``(C,)`` float64 AP per class, NaN for a class without a positive.
        n_excluded: number of classes without a positive (left out of :attr:`mean`).
        interpolated: whether the ActivityNet interpolated AP was used.
    """

    per_class: NDArray[np.float64]
    n_excluded: int
    interpolated: bool = False

    @property
    def mean(self) -> float:
        """mAP over classes with a positive (NaN when no class has one)."""
        valid = self.per_class[~np.isnan(self.per_class)]
        return float(valid.mean()) if valid.size else float("nan")


def _as_arrays(scores: object, labels: object) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """Validate and return ``scores`` (N, C) float64 and one-hot targets (N, C) bool."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise DatasetError(f"scores have shape {s.shape}, expected (N, C)")
    n, c = s.shape
    y = np.asarray(labels)
    if y.ndim == 1:
        if y.shape[0] != n:
            raise DatasetError(f"labels have shape {y.shape}, expected ({n},) to match scores")
        if y.size and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= c):
            raise DatasetError(f"labels must be class indices in [0, {c}), got {y.dtype} values")
        onehot = np.zeros((n, c), dtype=bool)
        onehot[np.arange(n), y.astype(np.int64)] = True
        return s, onehot
    if y.ndim == 2:
        if y.shape != s.shape:
            raise DatasetError(f"labels have shape {y.shape}, expected {s.shape} (0/1 per class)")
        if not np.isin(y, (0, 1)).all():
            raise DatasetError("(N, C) labels must be 0/1")
        return s, y.astype(bool)
    raise DatasetError(f"labels have shape {y.shape}, expected (N,) indices or (N, C) 0/1")


def average_precision(scores: object, targets: object, *, interpolated: bool = False) -> float:
    """AP of one class: ``scores`` (N,) and ``targets`` (N,) 0/1; NaN without a positive."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(targets).reshape(-1).astype(bool)
    if s.shape != y.shape:
        raise DatasetError(f"scores {s.shape} and targets {y.shape} differ in length")
    positives = int(y.sum())
    if positives == 0:
        return float("nan")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    # last position of every group of tied scores = one threshold
    ends = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]
    tp = np.cumsum(y)[ends].astype(np.float64)
    fp = (ends + 1) - tp
    precision = tp / (tp + fp)
    recall = tp / positives
    if interpolated:
        precision = np.maximum.accumulate(precision[::-1])[::-1]
    d_recall = np.diff(np.r_[0.0, recall])
    return float(np.sum(d_recall * precision))


def average_precision_per_class(
    scores: object, labels: object, *, interpolated: bool = False
) -> APResult:
    """AP of every class. ``scores`` (N, C); ``labels`` (N,) class indices or (N, C) 0/1."""
    s, y = _as_arrays(scores, labels)
    per_class = np.array(
        [average_precision(s[:, k], y[:, k], interpolated=interpolated) for k in range(s.shape[1])],
        dtype=np.float64,
    )
    return APResult(per_class, int(np.isnan(per_class).sum()), interpolated)


def mean_average_precision(scores: object, labels: object, *, interpolated: bool = False) -> float:
    """mAP: mean over classes with a positive of (non-interpolated by default) AP.

    ``scores`` (N, C) any real scores (probabilities or logits); ``labels`` (N,) class
    indices or (N, C) 0/1. See :func:`average_precision_per_class` for the number of
    classes left out.
    """
    return average_precision_per_class(scores, labels, interpolated=interpolated).mean


def top1_accuracy(scores: object, labels: object) -> float:
    """Fraction of videos whose highest score is a positive class (first maximum on ties)."""
    s, y = _as_arrays(scores, labels)
    if s.shape[0] == 0:
        return float("nan")
    return float(y[np.arange(s.shape[0]), s.argmax(axis=1)].mean())
