"""Hostile inputs made in the test (docs/method.md §9): an image renamed .mp4, a cut faststart
MP4, an MP4 cut before its index, a 0.3 s clip, a 60-frame video, no audio track, an
audio track of digital silence."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hms_deploy.data.synthetic import write_video


def _frame(i: int, t: float) -> np.ndarray:
    x = np.full((120, 160, 3), 40, np.uint8)
    x[..., 0] = (i * 7) % 255
    x[:, (i * 3) % 160] = 255  # a moving bar: every frame differs
    return x


def _tone(t: np.ndarray) -> np.ndarray:
    return 0.2 * np.sin(2 * np.pi * 440.0 * t)


def video(path: Path, *, duration_s: float = 2.0, fps: float = 30.0, audio: str = "tone") -> Path:
    """``audio``: ``tone``, ``silence`` (a track of zeros) or ``none`` (no audio stream)."""
    fn = {"tone": _tone, "silence": lambda t: np.zeros_like(t), "none": None}[audio]
    return write_video(path, duration_s=duration_s, fps=fps, frame_fn=_frame, audio_fn=fn)


def image_as_mp4(path: Path) -> Path:
    """A PNG renamed .mp4 (FFmpeg opens it as a one-frame video stream)."""
    from PIL import Image

    Image.fromarray(_frame(3, 0.0)).save(path, format="PNG")
    return path


def faststart_cut(path: Path, *, duration_s: float = 10.0, keep: float = 0.6) -> Path:
    """A faststart MP4 (index first) of ``duration_s`` cut after ``keep`` of its bytes."""
    import av

    src = video(path.with_name(path.stem + "_full_src.mp4"), duration_s=duration_s, fps=15.0)
    full = path.with_name(path.stem + "_full.mp4")
    with av.open(str(src)) as i, av.open(str(full), "w", options={"movflags": "faststart"}) as o:
        streams = {s.index: o.add_stream_from_template(s) for s in i.streams}
        for packet in i.demux():
            if packet.dts is None:
                continue
            packet.stream = streams[packet.stream.index]
            o.mux(packet)
    data = full.read_bytes()
    assert data[4:8] == b"ftyp" and data.find(b"moov") < data.find(b"mdat")  # faststart
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def index_last_cut(path: Path, *, duration_s: float = 3.0, keep: float = 0.6) -> Path:
    """An MP4 whose index (moov box) comes after its media data, cut after ``keep`` of
    its bytes: the index is gone, so no frame can be located."""
    full = video(path.with_name(path.stem + "_full.mp4"), duration_s=duration_s)
    data = full.read_bytes()
    assert data[4:8] == b"ftyp" and data.find(b"mdat") < data.rfind(b"moov")  # index last
    path.write_bytes(data[: int(len(data) * keep)])
    return path
