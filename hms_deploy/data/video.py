"""Video probing, timestamp-aligned audio, and decode-on-demand of the frames steps need.

Conventions (HMS_SPEC.md 1): every time is in seconds relative to the presentation time
of the first video frame; frames are identified by their index in presentation (pts)
order, ``0 .. len(info.frame_times) - 1``. Frames are returned as uint8 RGB ``(H, W, 3)``
with the container's display rotation already applied.

PyAV is imported lazily, so importing this module costs nothing until a video is opened.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from hms_deploy.config import AudioFrontEnd, HMSConfig, MotionClip
from hms_deploy.data import sampling
from hms_deploy.data.audio import audio_patches as _audio_patches
from hms_deploy.data.audio import log_mel_spectrogram
from hms_deploy.errors import ConfigError, VideoError


def _one_line(e: BaseException) -> str:
    text = str(getattr(e, "strerror", None) or e) or type(e).__name__
    return " ".join(text.split())


def _open(path: str | Path) -> Any:
    """Open a media file for reading; a typed one-line error names the file otherwise."""
    import av

    p = Path(path)
    if not p.exists():
        raise VideoError(f"{p}: no such file")
    if not p.is_file():
        raise VideoError(f"{p}: not a regular file")
    try:
        return av.open(str(p), mode="r")
    except av.FFmpegError as e:
        raise VideoError(f"{p}: not a readable media file ({_one_line(e)})") from e


@dataclass(frozen=True, eq=False)
class VideoInfo:
    """What a demux-only scan of a video says (no frame is decoded except the first).

    Attributes:
        path: the file.
        duration_s: the video stream's duration in seconds: last pts + that frame's
            duration - first pts (the container's duration if timestamps are unusable).
        frame_times: ``(F,)`` float64 presentation time of every frame, seconds, sorted,
            relative to the first frame (``frame_times[0] == 0``).
        keyframe_times: ``(K,)`` float64 presentation times of the keyframes, seconds.
        fps: average frame rate, ``F / duration_s``.
        width, height: pixels of the frames :class:`FrameSource` returns (after rotation).
        rotation: display rotation in degrees counter-clockwise, one of 0, 90, 180, 270
            (from the stream's display matrix, rounded to a multiple of 90).
        has_audio: whether the file has an audio stream with at least one packet.
        audio_start_s: first audio packet time minus first video frame time, seconds
            (0.0 without audio). From the packet scan, so it can include the codec's
            priming samples (AAC: 1024); :func:`decode_audio` aligns with the decoded
            frames' timestamps instead.
        frame_pts: ``(F,)`` int64 sorted pts of the frames in ``time_base`` units.
        keyframe_indices: ``(K,)`` int64 indices of the keyframes into ``frame_times``.
        time_base: the video stream's time base (seconds per pts unit).
    """

    path: str
    duration_s: float
    frame_times: np.ndarray
    keyframe_times: np.ndarray
    fps: float
    width: int
    height: int
    rotation: int
    has_audio: bool
    audio_start_s: float
    frame_pts: np.ndarray = field(repr=False)
    keyframe_indices: np.ndarray = field(repr=False)
    time_base: Fraction = Fraction(1, 1)

    @property
    def num_frames(self) -> int:
        return int(self.frame_times.size)

    @property
    def start_s(self) -> float:
        """Absolute presentation time of the first frame, seconds (stream clock)."""
        return float(self.frame_pts[0] * self.time_base)

    def __repr__(self) -> str:
        return (
            f"VideoInfo(path={self.path!r}, duration_s={self.duration_s:.3f}, "
            f"frames={self.num_frames}, keyframes={self.keyframe_times.size}, "
            f"fps={self.fps:.3f}, size={self.width}x{self.height}, rotation={self.rotation}, "
            f"has_audio={self.has_audio}, audio_start_s={self.audio_start_s:.4f})"
        )


def _normalise_rotation(degrees: float | None) -> int:
    if degrees is None or not math.isfinite(degrees):
        return 0
    return round(degrees / 90.0) * 90 % 360


def probe(path: str | Path) -> VideoInfo:
    """Scan a video's packets (no decoding beyond the first frame) and describe it.

    The first frame is decoded only to read the display rotation, which FFmpeg exposes
    on frames. Raises :class:`VideoError` naming the file for a missing file, a file
    that is not media, one without a video stream or without any video frame.
    """
    import av

    container = _open(path)
    try:
        return _probe_open(container, str(path))
    except av.FFmpegError as e:
        raise VideoError(f"{path}: cannot read ({_one_line(e)})") from e
    finally:
        container.close()


def _probe_open(container: Any, path: str) -> VideoInfo:
    import av

    if not container.streams.video:
        raise VideoError(f"{path}: no video stream")
    vs = container.streams.video[0]
    streams = [vs]
    if container.streams.audio:
        streams.append(container.streams.audio[0])
    pts_list: list[int] = []
    key_list: list[bool] = []
    dur_list: list[int] = []
    first_audio: float | None = None
    first_frame = None
    decode_failed: str | None = None
    for packet in container.demux(*streams):
        if packet.stream.type == "audio":
            if first_audio is None and packet.pts is not None and not packet.is_discard:
                first_audio = float(packet.pts * packet.time_base)
            continue
        ts = packet.pts if packet.pts is not None else packet.dts
        if ts is None or packet.size == 0 or packet.is_discard:
            continue
        pts_list.append(int(ts))
        key_list.append(bool(packet.is_keyframe))
        dur_list.append(int(packet.duration or 0))
        if first_frame is None and decode_failed is None:
            try:
                frames = vs.codec_context.decode(packet)
            except av.FFmpegError as e:
                decode_failed = _one_line(e)
            else:
                if frames:
                    first_frame = frames[0]
    if not pts_list:
        raise VideoError(f"{path}: the video stream has no frames")
    if first_frame is None and decode_failed is None:
        try:
            frames = vs.codec_context.decode(None)
            first_frame = frames[0] if frames else None
        except av.FFmpegError as e:
            decode_failed = _one_line(e)
    if first_frame is None:
        raise VideoError(
            f"{path}: no decodable video frame ({decode_failed or 'decoder gave none'})"
        )

    raw = np.asarray(pts_list, dtype=np.int64)
    order = np.argsort(raw, kind="stable")
    pts = raw[order]
    keys = np.asarray(key_list, dtype=bool)[order]
    durs = np.asarray(dur_list, dtype=np.int64)[order]
    pts, first = np.unique(pts, return_index=True)  # duplicate pts cannot be told apart
    keys, durs = keys[first], durs[first]
    if not keys[0]:
        keys[0] = True  # decoding always starts at the beginning; treat it as a seek point
    tb = vs.time_base or Fraction(1, 1)
    tb_f = float(tb)

    if durs[-1] > 0:
        last = int(durs[-1])
    elif pts.size > 1:
        last = int(np.median(np.diff(pts)))
    elif vs.average_rate:
        last = round(1.0 / (float(vs.average_rate) * tb_f))
    else:
        last = 0
    duration_s = (int(pts[-1]) + last - int(pts[0])) * tb_f
    if duration_s <= 0 and container.duration:
        duration_s = container.duration / 1e6  # av.time_base is microseconds
    if duration_s <= 0:
        raise VideoError(f"{path}: cannot determine the video duration")

    rotation = _normalise_rotation(getattr(first_frame, "rotation", 0))
    w, h = int(first_frame.width), int(first_frame.height)
    if rotation in (90, 270):
        w, h = h, w
    frame_times = (pts - pts[0]).astype(np.float64) * tb_f
    key_idx = np.flatnonzero(keys).astype(np.int64)
    start_s = float(pts[0]) * tb_f
    return VideoInfo(
        path=path,
        duration_s=float(duration_s),
        frame_times=frame_times,
        keyframe_times=frame_times[key_idx],
        fps=float(pts.size / duration_s),
        width=w,
        height=h,
        rotation=rotation,
        has_audio=first_audio is not None,
        audio_start_s=0.0 if first_audio is None else first_audio - start_s,
        frame_pts=pts,
        keyframe_indices=key_idx,
        time_base=Fraction(tb),
    )


def decode_audio(
    path: str | Path, sample_rate: int = 16000, *, info: VideoInfo | None = None
) -> tuple[np.ndarray, bool]:
    """Decode the first audio stream to mono float32, aligned to the video.

    Sample 0 is at the first video frame's presentation time: audio that starts later is
    preceded by zeros, audio that starts earlier is trimmed (the offset comes from the
    first decoded audio frame's pts). The result has exactly
    ``round(info.duration_s * sample_rate)`` samples: audio past the video's end is cut,
    missing audio is zero (which the front end turns into log(0.01), the silence value).
    Resampling: ``av.AudioResampler(format='flt', layout='mono', rate=sample_rate)``,
    flushed with ``resample(None)``.

    Returns:
        ``(waveform (samples,) float32 in [-1, 1], has_audio)``; ``has_audio`` is False
        (and the waveform all zeros) when the file has no audio stream or it decodes to
        nothing.
    """
    import av

    info = info or probe(path)
    n = round(info.duration_s * sample_rate)
    silent = np.zeros(n, dtype=np.float32)
    container = _open(path)
    try:
        if not container.streams.audio:
            return silent, False
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        chunks: list[np.ndarray] = []
        first_time: float | None = None
        for frame in container.decode(stream):
            if first_time is None and frame.pts is not None and frame.time_base is not None:
                first_time = float(frame.pts * frame.time_base)
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1))
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray().reshape(-1))
    except av.FFmpegError as e:
        raise VideoError(f"{path}: cannot decode audio ({_one_line(e)})") from e
    finally:
        container.close()
    if not chunks:
        return silent, False
    wave = np.concatenate(chunks).astype(np.float32, copy=False)
    if first_time is None:
        first_time = info.start_s + info.audio_start_s
    shift = round((first_time - info.start_s) * sample_rate)
    if shift > 0:
        wave = np.concatenate([np.zeros(shift, dtype=np.float32), wave])
    elif shift < 0:
        wave = wave[-shift:]
    if wave.size >= n:
        return np.ascontiguousarray(wave[:n]), True
    return np.concatenate([wave, np.zeros(n - wave.size, dtype=np.float32)]), True


# -- resizing ----------------------------------------------------------------------------
def resized_size(height: int, width: int, resize_short: int) -> tuple[int, int]:
    """(height, width) after a short-side resize, torchvision's rule: long = int(s * long / short)."""
    if height <= width:
        return resize_short, int(resize_short * width / height)
    return int(resize_short * height / width), resize_short


def _resize_crop_nhwc(frames: np.ndarray, resize_short: int, crop: int) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    if resize_short < 1 or crop < 1 or crop > resize_short:
        raise ConfigError(
            f"resize/crop must satisfy 1 <= crop <= resize, got resize={resize_short}, crop={crop}"
        )
    _, h, w, _ = frames.shape
    nh, nw = resized_size(h, w, resize_short)
    # (N, H, W, 3) memory viewed as channels-last NCHW: torch's native uint8 kernel
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = round((nh - crop) / 2.0), round((nw - crop) / 2.0)
    return x[:, :, top : top + crop, left : left + crop].contiguous().numpy()


def _check_hwc(frame: np.ndarray, what: str = "frame") -> None:
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"{what} has shape {frame.shape} {frame.dtype}, expected (H, W, 3) uint8")


def resize_center_crop(frame: np.ndarray, resize_short: int, crop: int) -> np.ndarray:
    """Short-side resize then centre crop of one RGB frame.

    Bilinear ``torch.nn.functional.interpolate(antialias=True, align_corners=False)``
    run directly on uint8 (torch's native uint8 kernel, the one torchvision's
    ``Resize(resize_short, antialias=True)`` uses on uint8 tensors; it is ~15x faster than
    the float path and differs from float-then-round by at most 1), then
    ``CenterCrop(crop)``. The long side becomes ``int(resize_short * long / short)``.

    Args:
        frame: ``(H, W, 3)`` uint8 RGB.
    Returns:
        ``(3, crop, crop)`` uint8 RGB, channels first.
    """
    _check_hwc(frame)
    return _resize_crop_nhwc(frame[None], resize_short, crop)[0]


def resize_center_crop_batch(
    frames: Sequence[np.ndarray], resize_short: int, crop: int
) -> np.ndarray:
    """:func:`resize_center_crop` over frames of one size: ``(N, 3, crop, crop)`` uint8."""
    if len(frames) == 0:
        return np.zeros((0, 3, crop, crop), dtype=np.uint8)
    for f in frames:
        _check_hwc(f)
    if len({f.shape for f in frames}) != 1:
        raise ValueError(f"frames differ in size: {sorted({f.shape for f in frames})}")
    return _resize_crop_nhwc(np.stack(frames), resize_short, crop)


def clip_tensor(frames: Sequence[np.ndarray], resize_short: int, crop: int) -> np.ndarray:
    """A motion clip of frames (time order) -> ``(3, len(frames), crop, crop)`` uint8 (C, T, H, W)."""
    return np.ascontiguousarray(
        resize_center_crop_batch(frames, resize_short, crop).transpose(1, 0, 2, 3)
    )


# -- steps -> frames ---------------------------------------------------------------------
class StepSampler:
    """Which frames and audio each step of a video needs (HMS_SPEC.md 1).

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
        self.centers = sampling.step_centers(info.duration_s, self.steps)
        self.appearance_indices = sampling.nearest_frames(info.frame_times, self.centers)
        self.motion_indices = sampling.nearest_frames(
            info.frame_times, sampling.clip_times(self.centers, self.clip)
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

    def _steps(self, steps: Sequence[int] | np.ndarray | None) -> np.ndarray:
        if steps is None:
            return np.arange(self.steps)
        s = np.asarray(steps, dtype=np.int64).reshape(-1)
        if s.size and (s.min() < 0 or s.max() >= self.steps):
            raise IndexError(f"steps {s.tolist()} are not all inside [0, {self.steps})")
        return s

    def appearance_frame_index(self, t: int) -> int:
        """Index of the frame nearest the centre of step ``t``."""
        return int(self.appearance_indices[self._step(t)])

    def motion_frame_indices(self, t: int) -> np.ndarray:
        """``(clip.frames,)`` int64 frame indices of step ``t``'s motion clip (time order)."""
        return self.motion_indices[self._step(t)].copy()

    def audio_patches(self, waveform: np.ndarray, sample_rate: int | None = None) -> np.ndarray:
        """``(T, 1, 96, 64)`` float32 log-mel patches of all steps from an aligned waveform.

        ``waveform`` is :func:`decode_audio`'s output (sample 0 at the first frame).
        """
        sr = self.front_end.sample_rate if sample_rate is None else sample_rate
        logmel = log_mel_spectrogram(waveform, sr, self.front_end)
        return _audio_patches(logmel, self.centers, self.front_end)

    def appearance_inputs(
        self, source: FrameSource, steps: Sequence[int] | np.ndarray | None = None
    ) -> np.ndarray:
        """``(len(steps), 3, crop, crop)`` uint8 RGB appearance inputs (all steps if None)."""
        idx = self.appearance_indices[self._steps(steps)]
        frames = source.read(idx)
        uniq = sorted(frames)
        batch = resize_center_crop_batch(
            [frames[i] for i in uniq], self.appearance_resize, self.appearance_crop
        )
        return batch[np.searchsorted(uniq, idx)]

    def motion_inputs(
        self, source: FrameSource, steps: Sequence[int] | np.ndarray | None = None
    ) -> np.ndarray:
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


# FrameSource lives in its own module (it needs probe() and _open() from this one);
# re-exported here, where callers have always imported it from.
from hms_deploy.data.frame_source import DecodeStats, FrameSource  # noqa: F401
