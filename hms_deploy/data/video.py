"""Video probing, timestamp-aligned audio, and decode-on-demand of the frames steps need.

Conventions (HMS_SPEC.md 1): every time is in seconds relative to the presentation time
of the first video frame; frames are identified by their index in presentation (pts)
order, ``0 .. len(info.frame_times) - 1``. Frames are returned as uint8 RGB ``(H, W, 3)``
with the container's display rotation already applied.

PyAV is imported lazily, so importing this module costs nothing until a video is opened.
Which frames each step needs is :mod:`hms_deploy.data.sampling` (``StepSampler``); resizing
is :mod:`hms_deploy.data.resize`; the per-video inputs are :mod:`hms_deploy.data.inputs`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from typing_extensions import Self

from hms_deploy.errors import VideoError, first_line


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
        raise VideoError(f"{p}: not a readable media file ({first_line(e, typed=False)})") from e


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
        declared_duration_s: the duration the container declares (its header or index),
            seconds; None when it declares none. See :mod:`hms_deploy.data.checks`.
        streams_end_s: where the demuxed streams end (the later of the last video
            frame's end and the last audio packet's end), seconds from the container's
            start time; compared with ``declared_duration_s`` to find truncated files.
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
    import av

    container = _open(path)
    try:
        return _probe_open(container, str(path))
    except av.FFmpegError as e:
        raise VideoError(f"{path}: cannot read ({first_line(e, typed=False)})") from e
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
    audio_end = 0.0
    first_frame = None
    decode_failed: str | None = None
    for packet in container.demux(*streams):
        if packet.stream.type == "audio":
            if first_audio is None and packet.pts is not None and not packet.is_discard:
                first_audio = float(packet.pts * packet.time_base)
            if packet.pts is not None and packet.time_base is not None:
                end = float((packet.pts + (packet.duration or 0)) * packet.time_base)
                audio_end = max(audio_end, end)
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
        streams_end_s=max(start_s + float(duration_s), audio_end) - container_start,
    )


def decode_audio(
    path: str | Path, sample_rate: int = 16000, *, info: VideoInfo | None = None,
    keep_partial: bool = False,
) -> tuple[np.ndarray, bool]:
    """Decode the first audio stream to mono float32, aligned to the video.

    Sample 0 is at the first video frame's presentation time: audio that starts later is
    preceded by zeros, audio that starts earlier is trimmed (the offset comes from the
    first decoded audio frame's pts). The result has exactly
    ``round(info.duration_s * sample_rate)`` samples: audio past the video's end is cut,
    missing audio is zero (which the front end turns into log(0.01), the silence value).
    Resampling: ``av.AudioResampler(format='flt', layout='mono', rate=sample_rate)``,
    flushed with ``resample(None)``.

    ``keep_partial``: a decoding error after some audio was decoded ends the stream
    there instead of raising (a truncated file whose decodable part is classified).

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
        if not (keep_partial and chunks):
            raise VideoError(f"{path}: cannot decode audio ({first_line(e, typed=False)})") from e
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


@dataclass
class DecodeStats:
    """Counters of a :class:`FrameSource` since it was created.

    ``frames_decoded``: frames the decoder produced; ``frames_converted``: frames
    converted to RGB; ``seeks``: container seeks; ``cache_hits``: requested frames served
    from the RGB cache; ``substituted``: requested frames the decoder never produced
    (a damaged stream) and that got the next decodable frame instead (the last one at the
    end of the stream).
    """

    frames_decoded: int = 0
    frames_converted: int = 0
    seeks: int = 0
    cache_hits: int = 0
    substituted: int = 0


class FrameSource:
    """Decode-on-demand of frames by index, in one forward pass per request.

    ``read`` sorts the requested indices and walks forward. Before each wanted frame it
    decides whether to seek: it seeks (to the keyframe at or before the target) only
    when that keyframe lies after the current decode position, i.e. the target is beyond
    the next keyframe, and a seek would skip more than ``seek_threshold`` frames;
    otherwise it decodes forward. Frames that are not wanted are decoded but not
    converted to RGB. Requests that go backward seek. Decoded frames are identified by
    their pts (mapped to indices through :func:`probe`'s scan), so B-frame reordering and
    seeks that land early cannot shift indices.

    Converted frames are kept in an LRU cache of ``cache_frames`` frames (overlapping
    motion clips of neighbouring steps reuse them); memory is
    ``cache_frames * width * height * 3`` bytes.

    Use as a context manager (the container is opened on first use and closed on exit)::

        with FrameSource(path) as src:
            frames = src.read([0, 15, 30])   # {index: (H, W, 3) uint8 RGB}
    """

    def __init__(
        self,
        path: str | Path | VideoInfo,
        *,
        seek_threshold: int = 16,
        cache_frames: int = 64,
        threads: int = 0,
    ) -> None:
        self.info = path if isinstance(path, VideoInfo) else probe(path)
        self.path = self.info.path
        self.seek_threshold = int(seek_threshold)
        self.cache_frames = int(cache_frames)
        self.threads = int(threads)
        self.stats = DecodeStats()
        self._index = {int(p): i for i, p in enumerate(self.info.frame_pts.tolist())}
        self._container: Any = None
        self._stream: Any = None
        self._frames: Iterator[Any] | None = None
        self._pos = -1  # index of the last frame the decoder produced
        self._seek_ok = True
        self._last_frame: Any = None
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    # -- resources -------------------------------------------------------------------
    def open(self) -> Self:
        if self._container is None:
            self._container = _open(self.path)
            if not self._container.streams.video:
                self.close()
                raise VideoError(f"{self.path}: no video stream")
            self._stream = self._container.streams.video[0]
            if self.threads:
                self._stream.codec_context.thread_count = self.threads
            self._frames = self._decode_iter()
            self._pos = -1
        return self

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
        self._container = self._stream = self._frames = None
        self._pos = -1

    def __enter__(self) -> Self:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- decoding ----------------------------------------------------------------------
    def _decode_iter(self) -> Iterator[Any]:
        for packet in self._container.demux(self._stream):
            yield from packet.decode()

    def _keyframe_at_or_before(self, index: int) -> int:
        k = self.info.keyframe_indices
        return int(k[np.searchsorted(k, index, side="right") - 1])

    def _should_seek(self, target: int) -> bool:
        if target <= self._pos:
            return True  # backward: only a seek (or a reopen) gets there
        if not self._seek_ok:
            return False
        key = self._keyframe_at_or_before(target)
        return key - (self._pos + 1) > self.seek_threshold

    def _seek(self, target: int) -> None:
        if not self._seek_ok:
            self.close()
            self.open()
            return
        key = self._keyframe_at_or_before(target)
        self._container.seek(
            int(self.info.frame_pts[key]), stream=self._stream, backward=True, any_frame=False
        )
        self._frames = self._decode_iter()
        self._pos = key - 1
        self.stats.seeks += 1

    def _frame_index(self, frame: Any) -> int:
        ts = frame.pts if frame.pts is not None else getattr(frame, "dts", None)
        if ts is not None:
            i = self._index.get(int(ts))
            if i is not None:
                return i
        return self._pos + 1  # no usable timestamp: assume decode order is pts order

    def _convert(self, frame: Any) -> np.ndarray:
        rgb = frame.to_ndarray(format="rgb24")
        if self.info.rotation:
            rgb = np.ascontiguousarray(np.rot90(rgb, k=self.info.rotation // 90))
        self.stats.frames_converted += 1
        return rgb

    def _remember(self, index: int, rgb: np.ndarray) -> None:
        if self.cache_frames <= 0:
            return
        self._cache[index] = rgb
        self._cache.move_to_end(index)
        while len(self._cache) > self.cache_frames:
            self._cache.popitem(last=False)

    def read(self, frame_indices: Sequence[int] | np.ndarray) -> dict[int, np.ndarray]:
        """Decode exactly the requested frames.

        Args:
            frame_indices: indices into ``info.frame_times`` (any order, repeats allowed).
        Returns:
            ``{index: (H, W, 3) uint8 RGB}`` for each distinct index, rotation applied.
        Raises:
            IndexError for an index outside ``[0, F)``; :class:`VideoError` when the
            stream cannot be decoded.
        """
        import av

        wanted_all = np.unique(np.asarray(frame_indices, dtype=np.int64).reshape(-1))
        if wanted_all.size == 0:
            return {}
        n = self.info.num_frames
        if wanted_all[0] < 0 or wanted_all[-1] >= n:
            bad = wanted_all[(wanted_all < 0) | (wanted_all >= n)][0]
            raise IndexError(f"{self.path}: frame index {bad} is outside [0, {n})")
        out: dict[int, np.ndarray] = {}
        for i in wanted_all.tolist():
            if i in self._cache:
                self._cache.move_to_end(i)
                out[i] = self._cache[i]
                self.stats.cache_hits += 1
        wanted = [i for i in wanted_all.tolist() if i not in out]
        if not wanted:
            return out
        self.open()
        try:
            self._read_forward(wanted, out)
        except av.FFmpegError as e:
            self.close()
            raise VideoError(f"{self.path}: cannot decode ({first_line(e, typed=False)})") from e
        return out

    def _read_forward(self, wanted: list[int], out: dict[int, np.ndarray]) -> None:
        """Decode forward (seeking where it pays) until every index in ``wanted`` is in ``out``."""
        j = 0
        check_landing: int | None = None  # target of the last seek, until its first frame
        while j < len(wanted):
            target = wanted[j]
            if self._should_seek(target):
                self._seek(target)
                check_landing = target if self._seek_ok else None
            frame = next(self._frames, None) if self._frames is not None else None
            if frame is None:
                break  # end of stream
            i = self._frame_index(frame)
            self.stats.frames_decoded += 1
            if check_landing is not None:
                landed_after = i > check_landing
                check_landing = None
                if landed_after:
                    # The demuxer landed after the target (broken index): stop seeking,
                    # reopen and decode from the start instead.
                    self._seek_ok = False
                    self._seek(target)
                    continue
            self._pos = i
            self._last_frame = frame
            if i < target:
                continue
            rgb = self._convert(frame)
            self._remember(i, rgb)
            while j < len(wanted) and wanted[j] <= i:
                out[wanted[j]] = rgb
                if wanted[j] != i:
                    self.stats.substituted += 1
                j += 1
        if j < len(wanted):
            if self._last_frame is None:
                raise VideoError(f"{self.path}: frame {wanted[j]} could not be decoded")
            rgb = self._convert(self._last_frame)
            for i in wanted[j:]:
                out[i] = rgb
                self.stats.substituted += 1
