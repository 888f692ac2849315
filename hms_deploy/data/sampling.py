"""Steps -> timestamps -> frame indices (HMS_SPEC.md 1). Pure functions, no decoding.

All times are seconds relative to the first video frame (the first frame's presentation
time is 0).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from hms_deploy.config import MotionClip
from hms_deploy.errors import ConfigError


def step_centers(duration_s: float, steps: int) -> np.ndarray:
    """Centre time of each step: ``tau_t = (t + 0.5) * duration_s / steps``.

    Returns ``(steps,)`` float64 seconds. Raises :class:`ConfigError` for ``steps < 1``
    and ``ValueError`` for a negative or non-finite duration.
    """
    if int(steps) != steps or steps < 1:
        raise ConfigError(f"steps must be an integer >= 1, got {steps!r}")
    if not np.isfinite(duration_s) or duration_s < 0:
        raise ValueError(f"duration_s must be finite and >= 0, got {duration_s!r}")
    return (np.arange(int(steps), dtype=np.float64) + 0.5) * (float(duration_s) / int(steps))


def clip_offsets(clip: MotionClip | None = None) -> np.ndarray:
    """Offsets of the clip's timestamps from its centre: ``(k - (frames - 1) / 2) * stride_s``.

    For the default clip: ``(k - 15.5) * 2/30`` s, k = 0..31; ``(frames,)`` float64.
    """
    clip = clip or MotionClip()
    if clip.frames < 1 or not clip.stride_s > 0:
        raise ConfigError(
            f"motion clip needs frames >= 1 and stride_s > 0, got {clip.frames}, {clip.stride_s}"
        )
    return (np.arange(clip.frames, dtype=np.float64) - (clip.frames - 1) / 2.0) * clip.stride_s


def clip_times(tau: ArrayLike, clip: MotionClip | None = None) -> np.ndarray:
    """Timestamps of the motion clip(s) centred at ``tau``.

    Args:
        tau: a scalar or an array of shape ``S`` of centre times in seconds.
    Returns:
        ``S + (clip.frames,)`` float64 seconds (``(32,)`` for a scalar ``tau``); not
        clamped to the video (:func:`nearest_frames` clamps).
    """
    tau = np.asarray(tau, dtype=np.float64)
    return tau[..., None] + clip_offsets(clip)


def nearest_frames(frame_times: ArrayLike, query_times: ArrayLike) -> np.ndarray:
    """Index of the decoded frame whose presentation time is nearest each query time.

    Args:
        frame_times: ``(F,)`` sorted presentation times in seconds, ``F >= 1``.
        query_times: scalar or array of any shape, seconds.
    Returns:
        int64 array of the shape of ``query_times``, values in ``[0, F)``. Times before the
        first frame map to 0, after the last to ``F - 1``; an exact tie between two
        frames goes to the earlier one.
    """
    ft = np.asarray(frame_times, dtype=np.float64)
    if ft.ndim != 1 or ft.size == 0:
        raise ValueError(f"frame_times has shape {ft.shape}, expected (F,) with F >= 1")
    q = np.asarray(query_times, dtype=np.float64)
    if ft.size == 1:
        return np.zeros(q.shape, dtype=np.int64)
    right = np.clip(np.searchsorted(ft, q, side="left"), 1, ft.size - 1)
    left = right - 1
    take_right = (ft[right] - q) < (q - ft[left])
    return np.where(take_right, right, left).astype(np.int64)


def slow_indices(frames: int = 32, slow: int = 8) -> list[int]:
    """pytorchvideo ``PackPathway``'s slow-pathway choice: ``torch.linspace(0, frames-1, slow).long()``.

    For 32 / 8: ``[0, 4, 8, 13, 17, 22, 26, 31]``.
    """
    if frames < 1 or slow < 1:
        raise ConfigError(f"frames and slow must be >= 1, got {frames}, {slow}")
    import torch

    return torch.linspace(0, frames - 1, slow).long().tolist()
