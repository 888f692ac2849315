"""Steps -> timestamps -> frame indices (docs/method.md §1), and the :class:`StepSampler`
that turns them into the part inputs of the steps a runtime asks for.

All times are seconds relative to the first video frame (the first frame's presentation
time is 0). The functions are pure; :class:`StepSampler` reads frames through a
:class:`~hms_deploy.data.frame_source.FrameSource` (decoding lives in :mod:`hms_deploy.data.frame_source`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from hms_deploy.config import AudioFrontEnd, HMSConfig, MotionClip
from hms_deploy.data.audio import audio_patches as _audio_patches
from hms_deploy.data.audio import log_mel_spectrogram, samples_needed, step_patches
from hms_deploy.data.resize import resize_center_crop_batch
from hms_deploy.errors import ConfigError

if TYPE_CHECKING:
    from hms_deploy.data.frame_source import FrameSource
    from hms_deploy.data.video import VideoInfo


def step_centers(duration_s: float, steps: int) -> NDArray[np.float64]:
    """Centre time of each step: ``tau_t = (t + 0.5) * duration_s / steps``.

    Returns ``(steps,)`` float64 seconds. Raises :class:`ConfigError` for ``steps < 1``
    and ``ValueError`` for a negative or non-finite duration.
    """
    if int(steps) != steps or steps < 1:
        raise ConfigError(f"steps must be an integer >= 1, got {steps!r}")
    if not np.isfinite(duration_s) or duration_s < 0:
        raise ValueError(f"duration_s must be finite and >= 0, got {duration_s!r}")
    return (np.arange(int(steps), dtype=np.float64) + 0.5) * (float(duration_s) / int(steps))


def window_coverage(centers_s: ArrayLike, window_s: float, duration_s: float) -> float:
    """Seconds of ``[0, duration_s]`` inside at least one window ``[c - w/2, c + w/2]``
    centred at ``centers_s`` (the union: overlapping windows count once)."""
    c = np.sort(np.asarray(centers_s, dtype=np.float64).reshape(-1))
    lo = np.clip(c - window_s / 2, 0.0, duration_s)
    hi = np.clip(c + window_s / 2, 0.0, duration_s)
    seen, end = 0.0, 0.0
    for a, b in zip(lo, hi):
        a = max(a, end)
        if b > a:
            seen += b - a
            end = b
    return float(seen)


def clip_offsets(clip: MotionClip | None = None) -> NDArray[np.float64]:
    """Offsets of the clip's timestamps from its centre: ``(k - (frames - 1) / 2) * stride_s``.

    For the default clip: ``(k - 15.5) * 2/30`` s, k = 0..31; ``(frames,)`` float64.
    """
    clip = clip or MotionClip()
    if clip.frames < 1 or not clip.stride_s > 0:
        raise ConfigError(
            f"motion clip needs frames >= 1 and stride_s > 0, got {clip.frames}, {clip.stride_s}"
        )
    return (np.arange(clip.frames, dtype=np.float64) - (clip.frames - 1) / 2.0) * clip.stride_s


def clip_times(tau: ArrayLike, clip: MotionClip | None = None) -> NDArray[np.float64]:
    """Timestamps of the motion clip(s) centred at ``tau``.

    Args:
        tau: a scalar or an array of shape ``S`` of centre times in seconds.
    Returns:
        ``S + (clip.frames,)`` float64 seconds (``(32,)`` for a scalar ``tau``); not
        clamped to the video (:func:`nearest_frames` clamps).
    """
    tau = np.asarray(tau, dtype=np.float64)
    times: NDArray[np.float64] = tau[..., None] + clip_offsets(clip)
    return times


def nearest_frames(frame_times: ArrayLike, query_times: ArrayLike) -> NDArray[np.int64]:
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


class StepSampler:
    """Which frames and audio each step of a video needs (docs/method.md §1).

    Everything is precomputed from a :class:`VideoInfo` at construction (no decoding),
    so a runtime can ask for the inputs of only the steps it runs.

    Attributes:
        centers: ``(T,)`` step centre times, seconds.
        appearance_indices: ``(T,)`` int64 frame nearest each centre.
        motion_indices: ``(T, clip.frames)`` int64 frames of each motion clip (clamped).
    """

    def __init__(
        self,
        info: VideoInfo,
        *,
        steps: int,
        front_end: AudioFrontEnd | None = None,
        clip: MotionClip | None = None,
        appearance_resize: int = 256,
        appearance_crop: int = 224,
        motion_resize: int = 256,
        motion_crop: int = 224,
    ) -> None:
        self.info = info
        self.steps = int(steps)
        self.front_end = front_end or AudioFrontEnd()
        self.clip = clip or MotionClip()
        self.appearance_resize, self.appearance_crop = appearance_resize, appearance_crop
        self.motion_resize, self.motion_crop = motion_resize, motion_crop
        self.centers = step_centers(info.duration_s, self.steps)
        self._coverage: dict[str, float] | None = None
        self.appearance_indices = nearest_frames(info.frame_times, self.centers)
        self.motion_indices = nearest_frames(
            info.frame_times, clip_times(self.centers, self.clip)
        )

    @classmethod
    def from_config(
        cls, info: VideoInfo, config: HMSConfig, *, steps: int | None = None
    ) -> StepSampler:
        """Sizes, clip, front end and T from a model config (``steps`` overrides T)."""
        return cls(
            info,
            steps=config.steps if steps is None else steps,
            front_end=config.front_end,
            clip=config.clip,
            appearance_resize=config.appearance.resize,
            appearance_crop=config.appearance.crop,
            motion_resize=config.motion.resize,
            motion_crop=config.motion.crop,
        )

    def _step(self, t: int) -> int:
        if not 0 <= int(t) < self.steps:
            raise IndexError(f"step {t} is outside [0, {self.steps})")
        return int(t)

    def _steps(self, steps: Sequence[int] | NDArray[np.int64] | None) -> NDArray[np.int64]:
        if steps is None:
            return np.arange(self.steps)
        s = np.asarray(steps, dtype=np.int64).reshape(-1)
        if s.size and (s.min() < 0 or s.max() >= self.steps):
            raise IndexError(f"steps {s.tolist()} are not all inside [0, {self.steps})")
        return s

    def motion_frame_indices(self, t: int) -> NDArray[np.int64]:
        """``(clip.frames,)`` int64 frame indices of step ``t``'s motion clip (time order)."""
        idx: NDArray[np.int64] = self.motion_indices[self._step(t)].copy()
        return idx

    def audio_coverage(self) -> dict[str, float]:
        """How much of the video the steps' audio windows see: ``audio_s`` (seconds of the
        video inside some step's window), ``duration_s`` and ``share`` (their ratio, 1.0
        for an empty video). Videos longer than T windows are seen in part (docs/method.md §8).
        Computed once per sampler (every partial record of an online run asks for it)."""
        if self._coverage is None:
            self._coverage = self._compute_coverage()
        return dict(self._coverage)

    def _compute_coverage(self) -> dict[str, float]:
        fe = self.front_end
        window = fe.patch_frames * fe.hop_length / fe.sample_rate
        duration = float(self.info.duration_s)
        seen = window_coverage(self.centers, window, duration)
        share = seen / duration if duration > 0 else 1.0
        return {"audio_s": round(seen, 3), "duration_s": round(duration, 3),
                "share": round(min(share, 1.0), 4)}

    def audio_patches(self, waveform: NDArray[np.floating[Any]], sample_rate: int | None = None) -> NDArray[np.float32]:
        """``(T, 1, 96, 64)`` float32 log-mel patches of all steps from an aligned waveform.

        ``waveform`` is :func:`decode_audio`'s output (sample 0 at the first frame).
        """
        sr = self.front_end.sample_rate if sample_rate is None else sample_rate
        if sr == self.front_end.sample_rate and np.ndim(waveform) == 1:
            return step_patches(waveform, self.centers, self.front_end)  # only their frames
        logmel = log_mel_spectrogram(waveform, sr, self.front_end)
        return _audio_patches(logmel, self.centers, self.front_end)

    def audio_samples_needed(self) -> int:
        """How many samples of :func:`decode_audio`'s waveform (``round(duration_s *
        sample_rate)`` long) the patches of the steps read: the decoder may stop there."""
        fe = self.front_end
        return samples_needed(self.centers, round(self.info.duration_s * fe.sample_rate), fe)

    def appearance_inputs(
        self, source: FrameSource, steps: Sequence[int] | NDArray[np.int64] | None = None
    ) -> NDArray[np.uint8]:
        """``(len(steps), 3, crop, crop)`` uint8 RGB appearance inputs (all steps if None)."""
        idx = self.appearance_indices[self._steps(steps)]
        frames = source.read(idx)
        uniq = sorted(frames)
        batch = resize_center_crop_batch(
            [frames[i] for i in uniq], self.appearance_resize, self.appearance_crop
        )
        out: NDArray[np.uint8] = batch[np.searchsorted(uniq, idx)]
        return out

    def motion_inputs(
        self, source: FrameSource, steps: Sequence[int] | NDArray[np.int64] | None = None
    ) -> NDArray[np.uint8]:
        """``(len(steps), 3, clip.frames, crop, crop)`` uint8 RGB motion clips (all steps if None).

        Each distinct frame is decoded and resized once, even where clips overlap.
        """
        idx = self.motion_indices[self._steps(steps)]  # (S, 32)
        frames = source.read(idx)
        uniq = sorted(frames)
        batch = resize_center_crop_batch(
            [frames[i] for i in uniq], self.motion_resize, self.motion_crop
        )  # (U, 3, S, S)
        clips = batch[np.searchsorted(uniq, idx)]  # (S, 32, 3, crop, crop)
        return np.ascontiguousarray(clips.transpose(0, 2, 1, 3, 4))
