"""Write H.264 (or MPEG-4) + AAC test media with PyAV from per-frame and audio functions
(the synthetic dataset, the benchmark reference and the demo sample use it).
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from hms_deploy.errors import ConfigError, VideoError, first_line

FrameFn = Callable[[int, float], NDArray[np.uint8]]
AudioFn = Callable[[NDArray[np.float64]], NDArray[np.float64]]


def _video_codec() -> str:
    import av

    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def write_video(
    path: str | Path,
    *,
    duration_s: float,
    fps: float,
    size: tuple[int, int] = (160, 120),
    frame_fn: FrameFn,
    audio_fn: AudioFn | None = None,
    gop: int | None = None,
    sample_rate: int = 16000,
    frame_times_s: NDArray[np.float64] | None = None,
    rotation: int = 0,
    preset: str = "veryfast",
    crf: int = 20,
) -> Path:
    """Encode an MP4: H.264 (yuv420p; MPEG-4 Part 2 if PyAV lacks libx264) + mono AAC.

    Args:
        path: output file (parent folders are created).
        duration_s: length in seconds; ``round(duration_s * fps)`` frames at constant rate
            unless ``frame_times_s`` is given.
        fps: frame rate (frames per second) for constant-rate output.
        size: ``(width, height)`` in pixels, both even.
        frame_fn: ``frame_fn(index, time_s) -> (height, width, 3)`` uint8 RGB.
        audio_fn: ``audio_fn(times_s (n,)) -> (n,)`` float samples in [-1, 1], called once
            with every sample time; ``None`` writes no audio stream.
        gop: keyframe interval in frames (scene-cut keyframes disabled); ``None`` keeps
            the encoder default (x264: 250).
        sample_rate: audio rate in Hz.
        frame_times_s: ``(F,)`` increasing presentation times in seconds for variable
            frame rate output (millisecond resolution); overrides ``duration_s * fps``.
        rotation: display rotation to store, degrees counter-clockwise (0, 90, 180, 270).
        preset, crf: x264 speed preset and quality (macroblock-tree rate control is off so
            that the same input gives the same bytes).

    Returns:
        ``Path(path)``. Raises :class:`VideoError` if the encoder fails.
    """
    import av

    path = Path(path)
    width, height = int(size[0]), int(size[1])
    if width <= 0 or height <= 0 or width % 2 or height % 2:
        raise ConfigError(f"video size must be positive and even for yuv420p, got {size}")
    if not fps > 0:
        raise ConfigError(f"fps must be > 0, got {fps}")
    if frame_times_s is None:
        n_frames = round(duration_s * fps)
        times = np.arange(n_frames) / fps
        vfr = False
    else:
        times = np.asarray(frame_times_s, dtype=np.float64)
        if times.ndim != 1 or times.size == 0 or np.any(np.diff(times) < 0.001):
            raise ConfigError("frame_times_s must be (F,) increasing by >= 1 ms")
        n_frames, vfr = times.size, True
    if n_frames < 1:
        raise ConfigError(f"duration {duration_s} s at {fps} fps gives no frame")
    path.parent.mkdir(parents=True, exist_ok=True)
    codec = _video_codec()
    rate = Fraction(fps).limit_denominator(1001)
    try:
        with av.open(str(path), mode="w") as container:
            vs: Any = container.add_stream(codec, rate=rate)  # a VideoStream
            vs.width, vs.height, vs.pix_fmt = width, height, "yuv420p"
            options: dict[str, str] = {}
            if codec == "libx264":
                # x264's macroblock-tree rate control made identical input encode to
                # different bytes from run to run here (160x120, PyAV 18's x264); without
                # it the output is reproducible.
                options.update({"preset": preset, "crf": str(crf), "x264-params": "mbtree=0"})
            if gop is not None:
                vs.codec_context.gop_size = int(gop)
                options.update(sc_threshold="0", keyint_min=str(int(gop)))
            vs.codec_context.options = options
            tb = Fraction(1, 1000) if vfr else 1 / rate
            vs.codec_context.time_base = tb
            if rotation:
                vs.set_display_rotation(rotation)
            aus: Any = None
            wave, done = np.zeros(0, np.float32), 0
            if audio_fn is not None:
                aus = container.add_stream("aac", rate=sample_rate)
                aus.layout = "mono"
                last = (1.0 / fps) if not vfr or n_frames < 2 else float(times[-1] - times[-2])
                n = round((float(times[-1]) + last) * sample_rate)
                wave = np.asarray(audio_fn(np.arange(n) / sample_rate), dtype=np.float32)
                wave = np.clip(wave.reshape(-1), -1.0, 1.0)

            def mux_audio(until: int) -> int:
                k = done
                while aus is not None and k < min(until, wave.size):
                    chunk = np.ascontiguousarray(wave[None, k : k + 1024])
                    af = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
                    af.sample_rate, af.pts, af.time_base = sample_rate, k, Fraction(1, sample_rate)
                    container.mux(aus.encode(af))
                    k += 1024
                return k

            for i in range(n_frames):
                rgb = frame_fn(i, float(times[i]))
                if rgb.shape != (height, width, 3) or rgb.dtype != np.uint8:
                    raise ConfigError(
                        f"frame_fn returned {rgb.shape} {rgb.dtype}, "
                        f"expected ({height}, {width}, 3) uint8"
                    )
                frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
                frame.pts = round(times[i] * 1000) if vfr else i
                frame.time_base = tb
                container.mux(vs.encode(frame))
                done = mux_audio(round(float(times[i]) * sample_rate))  # interleave
            container.mux(vs.encode(None))
            if aus is not None:
                mux_audio(wave.size)
                container.mux(aus.encode(None))
    except av.FFmpegError as e:
        raise VideoError(f"{path}: cannot encode ({first_line(e, typed=False)})") from e
    return path
