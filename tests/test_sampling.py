"""Steps -> timestamps -> frame indices."""

from __future__ import annotations

import numpy as np
import pytest

from hms_deploy.config import MotionClip
from hms_deploy.data.sampling import (
    clip_times,
    nearest_frames,
    step_centers,
)
from hms_deploy.errors import ConfigError
from hms_deploy.model.backbones import slow_indices


def test_step_centers() -> None:
    np.testing.assert_allclose(step_centers(10.0, 4), [1.25, 3.75, 6.25, 8.75], rtol=0, atol=1e-12)
    c = step_centers(60.0, 128)
    assert c.shape == (128,)
    np.testing.assert_allclose(np.diff(c), 60.0 / 128, atol=1e-12)
    assert c[0] == pytest.approx(0.5 * 60 / 128) and c[-1] == pytest.approx(60 - 0.5 * 60 / 128)


@pytest.mark.parametrize("steps", [0, -3, 2.5])
def test_step_centers_rejects_bad_steps(steps: float) -> None:
    with pytest.raises(ConfigError, match="steps must be an integer >= 1"):
        step_centers(10.0, steps)  # type: ignore[arg-type]


def test_step_centers_rejects_bad_duration() -> None:
    with pytest.raises(ValueError, match="duration_s must be finite and >= 0"):
        step_centers(float("nan"), 4)


def test_clip_times_default_geometry() -> None:
    t = clip_times(5.0, MotionClip())
    assert t.shape == (32,)
    np.testing.assert_allclose(t[0], 5.0 - 15.5 * 2 / 30, atol=1e-12)
    np.testing.assert_allclose(t[-1], 5.0 + 15.5 * 2 / 30, atol=1e-12)
    np.testing.assert_allclose(np.diff(t), 2 / 30, atol=1e-12)
    np.testing.assert_allclose(t.mean(), 5.0, atol=1e-12)  # centred on tau


def test_clip_times_broadcasts_over_steps() -> None:
    taus = step_centers(8.0, 5)
    t = clip_times(taus, MotionClip(frames=16, stride_s=0.1))
    assert t.shape == (5, 16)
    offsets = np.broadcast_to((np.arange(16) - 7.5) * 0.1, (5, 16))
    np.testing.assert_allclose(t - taus[:, None], offsets, atol=1e-12)


def test_clip_times_rejects_bad_clip() -> None:
    with pytest.raises(ConfigError, match="stride_s > 0"):
        clip_times(1.0, MotionClip(stride_s=0.0))


def test_nearest_frames_matches_brute_force_on_irregular_times() -> None:
    rng = np.random.default_rng(0)
    ft = np.cumsum(rng.uniform(0.01, 0.1, 200))
    ft -= ft[0]
    q = rng.uniform(-1.0, ft[-1] + 1.0, (7, 50))
    got = nearest_frames(ft, q)
    brute = np.abs(q[..., None] - ft).argmin(axis=-1)  # argmin takes the first on ties
    assert got.shape == q.shape and got.dtype == np.int64
    np.testing.assert_array_equal(got, brute)


def test_nearest_frames_clamps_and_breaks_ties_to_the_earlier_frame() -> None:
    ft = np.array([0.0, 0.1, 0.2, 0.3])
    np.testing.assert_array_equal(nearest_frames(ft, [-5.0, -0.01, 0.3, 7.0]), [0, 0, 3, 3])
    np.testing.assert_array_equal(nearest_frames(ft, [0.05, 0.25]), [0, 2])  # exact ties
    np.testing.assert_array_equal(nearest_frames(ft, [0.0500001, 0.2499999]), [1, 2])
    assert nearest_frames(ft, 0.16).shape == ()
    assert int(nearest_frames(ft, 0.16)) == 2


def test_nearest_frames_single_frame_and_empty() -> None:
    np.testing.assert_array_equal(nearest_frames(np.array([0.0]), [-1.0, 0.0, 9.0]), [0, 0, 0])
    with pytest.raises(ValueError, match="expected \\(F,\\) with F >= 1"):
        nearest_frames(np.array([]), [0.0])


def test_short_video_clip_repeats_edge_frames() -> None:
    ft = np.arange(15) / 15.0  # 1 s at 15 fps, shorter than a 2.13 s clip
    idx = nearest_frames(ft, clip_times(0.5, MotionClip()))
    assert idx[0] == 0 and idx[-1] == 14
    assert np.all(np.diff(idx) >= 0)
    assert (idx == 0).sum() > 1 and (idx == 14).sum() > 1


def test_slow_indices_are_packpathways() -> None:
    assert slow_indices() == [0, 4, 8, 13, 17, 22, 26, 31]
    assert slow_indices(16, 4) == [0, 5, 10, 15]
    with pytest.raises(ConfigError, match="must be >= 1"):
        slow_indices(32, 0)
