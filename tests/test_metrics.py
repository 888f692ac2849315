"""Metrics vs an independent brute-force computation and vs scikit-learn, ties included."""

from __future__ import annotations

import numpy as np
import pytest

from hms_deploy.errors import DatasetError
from hms_deploy.metrics import (
    average_precision,
    average_precision_per_class,
    mean_average_precision,
    top1_accuracy,
)


def brute_force_ap(scores: np.ndarray, targets: np.ndarray, interpolated: bool = False) -> float:
    """The definition, one threshold at a time: every distinct score, highest first."""
    positives = targets.sum()
    points = []  # (recall, precision) per threshold
    for th in sorted(set(scores.tolist()), reverse=True):
        kept = scores >= th
        tp = float((targets & kept).sum())
        points.append((tp / positives, tp / kept.sum()))
    ap, prev_r = 0.0, 0.0
    for k, (r, p) in enumerate(points):
        if interpolated:
            p = max(q for _, q in points[k:])
        ap += (r - prev_r) * p
        prev_r = r
    return ap


def _cases():
    rng = np.random.default_rng(0)
    for n, c, levels in [(30, 4, None), (50, 5, 3), (40, 3, 2), (7, 3, None), (60, 6, 5)]:
        scores = rng.random((n, c))
        if levels is not None:  # many ties
            scores = np.round(scores * levels) / levels
        labels = rng.integers(0, c, n)
        yield scores, labels


@pytest.mark.parametrize("interpolated", [False, True])
def test_per_class_ap_matches_brute_force_with_ties(interpolated):
    for scores, labels in _cases():
        res = average_precision_per_class(scores, labels, interpolated=interpolated)
        for k in range(scores.shape[1]):
            y = labels == k
            if not y.any():
                assert np.isnan(res.per_class[k])
                continue
            want = brute_force_ap(scores[:, k], y, interpolated)
            np.testing.assert_allclose(res.per_class[k], want, rtol=1e-12, atol=1e-12)


def test_matches_sklearn_including_ties():
    from sklearn.metrics import average_precision_score

    for scores, labels in _cases():
        present = np.unique(labels)
        want = np.mean([average_precision_score(labels == k, scores[:, k]) for k in present])
        np.testing.assert_allclose(mean_average_precision(scores, labels), want, rtol=1e-12)
        onehot = np.eye(scores.shape[1], dtype=int)[labels]
        np.testing.assert_allclose(mean_average_precision(scores, onehot), want, rtol=1e-12)


def test_all_tied_scores_give_prevalence():
    y = np.array([1, 0, 0, 1, 0])
    assert average_precision(np.zeros(5), y) == pytest.approx(0.4)


def test_interpolated_never_below_plain():
    for scores, labels in _cases():
        plain = average_precision_per_class(scores, labels)
        interp = average_precision_per_class(scores, labels, interpolated=True)
        ok = ~np.isnan(plain.per_class)
        assert np.all(interp.per_class[ok] >= plain.per_class[ok] - 1e-12)


def test_classes_without_positive_are_excluded_and_counted():
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.6, 0.4, 0.0]])
    labels = np.array([0, 1, 0])
    res = average_precision_per_class(scores, labels)
    assert res.n_excluded == 1
    assert np.isnan(res.per_class[2])
    assert res.mean == pytest.approx(1.0)
    assert mean_average_precision(scores, labels) == pytest.approx(1.0)


def test_multilabel_targets():
    scores = np.array([[0.9, 0.8], [0.1, 0.7], [0.5, 0.2]])
    y = np.array([[1, 1], [0, 1], [1, 0]])
    assert mean_average_precision(scores, y) == pytest.approx(1.0)


def test_top1_accuracy():
    scores = np.array([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4], [0.5, 0.5]])
    assert top1_accuracy(scores, np.array([0, 1, 1, 0])) == pytest.approx(0.75)


def test_bad_inputs_raise():
    with pytest.raises(DatasetError, match="expected \\(N, C\\)"):
        mean_average_precision(np.zeros(3), np.zeros(3, dtype=int))
    with pytest.raises(DatasetError, match="class indices"):
        mean_average_precision(np.zeros((2, 2)), np.array([0, 5]))
    with pytest.raises(DatasetError, match="0/1"):
        mean_average_precision(np.zeros((2, 2)), np.array([[0, 2], [1, 0]]))
