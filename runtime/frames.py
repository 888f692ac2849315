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
:class:`VideoInputs` counts what it hands to each backbone.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hms_deploy.config import HMSConfig
from hms_deploy.data.video import (
    FrameSource,
    StepSampler,
    VideoInfo,
    decode_audio,
    probe,
    resize_center_crop_batch,
)

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


class VideoInputs:
    """The per-step part inputs of one video, produced on demand.

    ``steps`` = T. Counters: ``appearance_frames`` / ``motion_clips`` = inputs handed to
    the appearance / motion backbone; the decoder's own counters are in :attr:`decode_stats`.
    """

    def __init__(self, path: str | Path, config: HMSConfig, steps: int, *, info: VideoInfo | None = None):
        self.path = str(path)
        self.info = info or probe(path)
        self.config = config
        self.sampler = StepSampler.from_config(self.info, config, steps=steps)
        self.source = RetainingFrameSource(self.info, retain_frames=_retain_frames(self.info, config))
        self.appearance_frames = 0
        self.motion_clips = 0
        self.has_audio: bool | None = None
        # resized motion frames: neighbouring clips overlap, so each frame is resized once
        self._motion_frames: OrderedDict[int, np.ndarray] = OrderedDict()
        self._motion_keep = 2 * config.clip.frames

    def decode_audio(self, *, keep_partial: bool = False) -> np.ndarray:
        """The aligned mono waveform at the front end's rate (sets :attr:`has_audio`)."""
        wave, self.has_audio = decode_audio(
            self.path, self.config.front_end.sample_rate, info=self.info,
            keep_partial=keep_partial,
        )
        return wave

    def audio_patches(self, wave: np.ndarray) -> np.ndarray:
        """``(T, 1, 96, 64)`` float32 log-mel patches of every step (the front end)."""
        return self.sampler.audio_patches(wave)

    def appearance(self, t: int) -> np.ndarray:
        """``(3, S, S)`` uint8: the frame nearest tau_t, resized and centre-cropped."""
        x = self.sampler.appearance_inputs(self.source, [t])[0]
        self.appearance_frames += 1
        return x

    def motion(self, t: int) -> np.ndarray:
        """``(3, 32, S, S)`` uint8: the motion clip of step t, resized and centre-cropped."""
        idx = self.sampler.motion_frame_indices(t)
        cache = self._motion_frames
        need = [i for i in np.unique(idx).tolist() if i not in cache]
        if need:
            frames = self.source.read(need)
            resized = resize_center_crop_batch(
                [frames[i] for i in need], self.sampler.motion_resize, self.sampler.motion_crop
            )
            for i, x in zip(need, resized):
                cache[i] = x
        for i in idx.tolist():
            cache.move_to_end(i)
        clip = np.stack([cache[i] for i in idx.tolist()], axis=1)  # (3, 32, S, S)
        while len(cache) > self._motion_keep:
            cache.popitem(last=False)
        self.motion_clips += 1
        return clip

    @property
    def decode_stats(self) -> dict[str, int]:
        s = self.source.stats
        return {
            "frames_decoded": s.frames_decoded,
            "frames_converted": s.frames_converted,
            "seeks": s.seeks,
            "window_hits": self.source.window_hits,
        }

    def close(self) -> None:
        self.source.close()
