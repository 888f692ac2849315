"""Video probing and timestamp-aligned audio.

Conventions (docs/method.md §1): every time is in seconds relative to the presentation time
of the first video frame; frames are identified by their index in presentation (pts)
order, ``0 .. len(info.frame_times) - 1``.

A file is opened through :func:`open_media` (one typed error naming the file, and saying
when an MP4 lacks its index: a file cut before its end). :func:`probe_open` scans a video
and keeps its container open (:class:`ProbedVideo`) for the frame reader
(:class:`~hms_deploy.data.frame_source.FrameSource`), so probing and reading the frames
of a video open its file once; :func:`decode_audio` opens it once more for the audio.

PyAV is imported lazily, so importing this module costs nothing until a video is opened.
Which frames each step needs is :mod:`hms_deploy.data.sampling` (``StepSampler``); resizing
is :mod:`hms_deploy.data.resize`; the per-video inputs are :mod:`hms_deploy.data.inputs`.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from hms_deploy.data.audio_frames import MonoAt
from hms_deploy.errors import VideoError, first_line


def _mp4_index_missing(path: Path) -> bool:
    """Whether ``path`` is an ISO-BMFF (MP4/MOV) file whose top-level boxes hold no
    complete ``moov`` (the index): a file cut before the index that ends it."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(12)
            if len(head) < 8 or head[4:8] != b"ftyp":
                return False
            pos = 0
            while pos + 8 <= size:
                f.seek(pos)
                box = f.read(16)
                n: int
                kind: bytes
                n, kind = struct.unpack(">I4s", box[:8])
                if n == 1 and len(box) == 16:
                    n = struct.unpack(">Q", box[8:16])[0]
                elif n == 0:
                    n = size - pos
                if n < 8:
                    return False  # not a box structure we can walk: say nothing
                if kind == b"moov":
                    return pos + n > size  # the index itself is cut
                pos += n
            return True
    except OSError:
        return False


def _unreadable(path: Path, e: Exception) -> str:
    """The one-line message for a file FFmpeg cannot open (FFmpeg's words, no errno)."""
    import av

    reason = getattr(e, "strerror", None) or first_line(e, typed=False)
    if _mp4_index_missing(path):
        return (f"{path}: truncated or damaged MP4 file: its index (the 'moov' box) is "
                f"missing or cut, so no frame can be located ({reason})")
    if isinstance(e, av.InvalidDataError):
        return f"{path}: not a readable media file: truncated, damaged or not media ({reason})"
    return f"{path}: not a readable media file ({reason})"


def open_media(path: str | Path) -> Any:
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
        raise VideoError(_unreadable(p, e)) from e


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
        width, height: pixels of the frames the frame reader returns (after rotation).
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
        declared_duration_s: the duration the container declares (its header or index),
            seconds; None when it declares none. See :mod:`hms_deploy.data.checks`.
        streams_end_s: where the demuxed streams end (the later of the last video
            frame's end and the last audio packet's end), seconds from the container's
            start time; compared with ``declared_duration_s`` to find truncated files.
    """

    path: str
    duration_s: float
    frame_times: NDArray[np.float64]
    keyframe_times: NDArray[np.float64]
    fps: float
    width: int
    height: int
    rotation: int
    has_audio: bool
    audio_start_s: float
    frame_pts: NDArray[np.int64] = field(repr=False)
    keyframe_indices: NDArray[np.int64] = field(repr=False)
    time_base: Fraction = Fraction(1, 1)
    declared_duration_s: float | None = None
    streams_end_s: float = 0.0

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
    probed = probe_open(path)
    probed.close()
    return probed.info


class ProbedVideo:
    """A probed video with the probe's container still open (at the end of its scan).

    The frame reader takes the container (:meth:`take`) and seeks back to the first
    frame instead of opening the file again; :meth:`close` closes it if nobody took it
    (PyAV also closes a container that is garbage-collected).
    """

    def __init__(self, info: VideoInfo, container: Any):
        self.info = info
        self._container = container

    @property
    def path(self) -> str:
        return self.info.path

    def take(self) -> Any:
        """The open container, once (None after the first call or :meth:`close`)."""
        c, self._container = self._container, None
        return c

    def close(self) -> None:
        c = self.take()
        if c is not None:
            c.close()


def probe_open(path: str | Path) -> ProbedVideo:
    """:func:`probe`, keeping the container open for the frame reader (see :class:`ProbedVideo`)."""
    import av

    container = open_media(path)
    try:
        return ProbedVideo(_probe_open(container, str(path)), container)
    except av.FFmpegError as e:
        container.close()
        raise VideoError(f"{path}: cannot read ({first_line(e, typed=False)})") from e
    except BaseException:
        container.close()
        raise


def _probe_open(container: Any, path: str) -> VideoInfo:
    import av

    if not container.streams.video:
        raise VideoError(f"{path}: no video stream")
    vs = container.streams.video[0]
    streams = [vs]
    if container.streams.audio:
        streams.append(container.streams.audio[0])
    audio_index = streams[-1].index if len(streams) > 1 else -1
    audio_tb = streams[-1].time_base if len(streams) > 1 else None
    pts_list: list[int] = []
    key_list: list[bool] = []
    dur_list: list[int] = []
    first_audio_pts: int | None = None  # in the audio stream's time base
    audio_end_pts: int | None = None
    first_frame = None
    decode_failed: str | None = None
    for packet in container.demux(*streams):
        if packet.stream_index == audio_index:
            p = packet.pts
            if p is not None and audio_tb is not None:
                if first_audio_pts is None and not packet.is_discard:
                    first_audio_pts = p
                end = p + (packet.duration or 0)
                if audio_end_pts is None or end > audio_end_pts:
                    audio_end_pts = end
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
                decode_failed = first_line(e, typed=False)
            else:
                if frames:
                    first_frame = frames[0]
    first_audio: float | None = None
    audio_end: float | None = None
    if audio_tb is not None and first_audio_pts is not None:
        first_audio = float(first_audio_pts * audio_tb)
    if audio_tb is not None and audio_end_pts is not None:
        audio_end = float(audio_end_pts * audio_tb)
    if not pts_list:
        raise VideoError(f"{path}: the video stream has no frames")
    if first_frame is None and decode_failed is None:
        try:
            frames = vs.codec_context.decode(None)
            first_frame = frames[0] if frames else None
        except av.FFmpegError as e:
            decode_failed = first_line(e, typed=False)
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
    container_start = (container.start_time or 0) / 1e6  # av.time_base is microseconds
    declared = container.duration / 1e6 if container.duration else None
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
        declared_duration_s=declared,
        streams_end_s=max(start_s + float(duration_s), audio_end or 0.0) - container_start,
    )


def decode_audio(
    path: str | Path, sample_rate: int = 16000, *, info: VideoInfo | None = None,
    keep_partial: bool = False, needed: int | None = None,
) -> tuple[NDArray[np.float32], bool]:
    """Decode the first audio stream to mono float32, aligned to the video.

    Sample 0 is at the first video frame's presentation time: audio that starts later is
    preceded by zeros, audio that starts earlier is trimmed (the offset comes from the
    first decoded audio frame's pts). The result has exactly
    ``round(info.duration_s * sample_rate)`` samples: audio past the video's end is cut,
    missing audio is zero (which the front end turns into log(0.01), the silence value).
    Resampling: ``av.AudioResampler(format='flt', layout='mono', rate=sample_rate)``,
    flushed with ``resample(None)``; :class:`~hms_deploy.data.audio_frames.MonoAt` gives
    its samples for less work.

    ``keep_partial``: a decoding error after some audio was decoded ends the stream
    there instead of raising (a truncated file whose decodable part is classified).

    ``needed``: only the first ``needed`` samples will be read (the step patches':
    :func:`~hms_deploy.data.audio.samples_needed`); decoding stops once they are out of
    the resampler, which never changes a sample it has given, so they equal a whole
    decode's, and the rest of the waveform is zero.

    Returns:
        ``(waveform (samples,) float32 in [-1, 1], has_audio)``; ``has_audio`` is False
        (and the waveform all zeros) when the file has no audio stream or it decodes to
        nothing.
    """
    import av

    info = info or probe(path)
    n = round(info.duration_s * sample_rate)
    silent = np.zeros(n, dtype=np.float32)
    shift = _shift(info, None, sample_rate)  # until a decoded frame has a time
    timed = False
    container = open_media(path)
    chunks: list[NDArray[np.float32]] = []
    mono = MonoAt(sample_rate, str(path))
    try:
        if not container.streams.audio:
            return silent, False
        for frame in container.decode(container.streams.audio[0]):
            if not timed and frame.pts is not None and frame.time_base is not None:
                shift, timed = _shift(info, float(frame.pts * frame.time_base), sample_rate), True
            chunks += mono.add(frame)
            if needed is not None and mono.given + mono.held_output() + shift >= needed:
                chunks += mono.drain()  # the frames held for a batch may reach ``needed``
                if chunks and mono.given + shift >= needed:
                    break  # the samples after these are never read
        else:
            chunks += mono.flush()
    except av.FFmpegError as e:
        if keep_partial:
            chunks += mono.drain()  # what the frames decoded before the error give
        if not (keep_partial and chunks):
            raise VideoError(f"{path}: cannot decode audio ({first_line(e, typed=False)})") from e
    finally:
        container.close()
    if not chunks:
        return silent, False
    wave = np.concatenate(chunks).astype(np.float32, copy=False)
    if shift > 0:
        wave = np.concatenate([np.zeros(shift, dtype=np.float32), wave])
    elif shift < 0:
        wave = wave[-shift:]
    if wave.size >= n:
        return np.ascontiguousarray(wave[:n]), True
    return np.concatenate([wave, np.zeros(n - wave.size, dtype=np.float32)]), True


def _shift(info: VideoInfo, first_time: float | None, sample_rate: int) -> int:
    """Samples of silence before the decoded audio (negative: samples trimmed) that align
    it to the first video frame; ``first_time``: the first decoded audio frame's time."""
    if first_time is None:
        first_time = info.start_s + info.audio_start_s
    return round((first_time - info.start_s) * sample_rate)
