"""Decode on demand: the inputs of only the steps that run, in one forward pass per video.

The gated loop cannot know future decisions, so frames are requested step by step, in
time order: the appearance frame of step t (nearest tau_t), then, if motion runs, the
32-frame clip around tau_t, which reaches ~1 s *behind* the decode position. A plain
forward reader would have to seek backward for every motion clip (and for the appearance
frames of the next steps, which lie inside the clip just decoded). So
:class:`RetainingFrameSource` extends the data module's
:class:`~hms_deploy.data.video.FrameSource` with a window of the most recently *decoded*
(not converted) frames: a request behind the decode position is converted from that
window instead of seeking. Holding a decoded frame costs memory (~1.5 bytes per pixel,
YUV 4:2:0), no compute; the window spans one motion clip plus a margin, capped at
:data:`RETAIN_BYTES`. Seeks forward still follow FrameSource's keyframe-distance rule.

Only frames that a running step needs are converted to RGB and resized; a modality that
never runs decodes nothing (``audio-only`` does not even open the video stream).
:func:`open_video` gives the scheduler its per-video inputs: the one per-video input
type, :class:`~hms_deploy.data.inputs.VideoInputs`, over a :class:`RetainingFrameSource`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hms_deploy.config import HMSConfig
from hms_deploy.data.inputs import VideoInputs
from hms_deploy.data.video import FrameSource, VideoInfo

__all__ = ["RETAIN_BYTES", "RetainingFrameSource", "VideoInputs", "open_video"]

RETAIN_BYTES = 256 * 2**20  # cap of the decoded-frame window per video


class RetainingFrameSource(FrameSource):
    """A :class:`FrameSource` that keeps the last ``retain_frames`` decoded frames.

    ``read`` first serves requested frames from the RGB cache and from the decoded
    window (converting them now), and asks the forward reader only for the rest, so a
    sequence of requests that moves forward in time, with look-backs no longer than the
    window, is one forward pass. ``stats.window_hits`` counts frames served from the window.
    """

    def __init__(self, path: str | Path | VideoInfo, *, retain_frames: int = 96, **kwargs: Any):
        super().__init__(path, **kwargs)
        self.retain_frames = int(retain_frames)
        self._window: OrderedDict[int, Any] = OrderedDict()
        self.window_hits = 0

    def _decode_iter(self) -> Iterator[Any]:
        for frame in super()._decode_iter():
            if self.retain_frames > 0 and frame.pts is not None:
                i = self._index.get(int(frame.pts))
                if i is not None:
                    self._window[i] = frame
                    self._window.move_to_end(i)
                    while len(self._window) > self.retain_frames:
                        self._window.popitem(last=False)
            yield frame

    def close(self) -> None:
        super().close()
        self._window = OrderedDict()

    def read(self, frame_indices: Sequence[int] | np.ndarray) -> dict[int, np.ndarray]:
        wanted = np.unique(np.asarray(frame_indices, dtype=np.int64).reshape(-1)).tolist()
        out: dict[int, np.ndarray] = {}
        for i in wanted:
            if i in self._cache or i not in self._window:
                continue  # the parent serves cache hits (and counts them)
            rgb = self._convert(self._window[i])
            self._remember(i, rgb)
            out[i] = rgb
            self.window_hits += 1
        rest = [i for i in wanted if i not in out]
        if rest:
            out.update(super().read(rest))
        return out


def _retain_frames(info: VideoInfo, config: HMSConfig) -> int:
    """Frames spanning one motion clip plus a margin, capped at :data:`RETAIN_BYTES`."""
    span_s = (config.clip.frames - 1) * config.clip.stride_s
    want = math.ceil((span_s + 0.5) * max(info.fps, 1.0)) + 8
    frame_bytes = max(1, info.width * info.height * 3 // 2)
    return max(8, min(want, RETAIN_BYTES // frame_bytes))


def open_video(path: str | Path, config: HMSConfig, steps: int, *, info: VideoInfo | None = None
               ) -> VideoInputs:
    """The runtime's per-video inputs: :class:`~hms_deploy.data.inputs.VideoInputs` decoding
    on demand through a :class:`RetainingFrameSource` sized by :func:`_retain_frames`."""
    return VideoInputs(
        path, config, steps, info=info,
        frame_source=lambda info: RetainingFrameSource(info, retain_frames=_retain_frames(info, config)),
    )
