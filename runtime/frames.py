"""Decode on demand: the inputs of only the steps that run, in one forward pass per video.

The gated loop cannot know future decisions, so frames are requested step by step, in
time order: the appearance frame of step t (nearest tau_t), then, if motion runs, the
32-frame clip around tau_t, which reaches ~1 s *behind* the decode position. A plain
forward reader would have to seek backward for every motion clip (and for the appearance
frames of the next steps, which lie inside the clip just decoded). So
:class:`VideoInputs` reads through a :class:`~hms_deploy.data.video.FrameSource` that
retains a window of the most recently *decoded* (not converted) frames (its
``retain_frames`` option; :class:`RetainingFrameSource` gives the default): a request
behind the decode position is converted from that window instead of seeking. Holding a
decoded frame costs memory (~1.5 bytes per pixel, YUV 4:2:0), no compute; the window
spans one motion clip plus a margin, capped at :data:`RETAIN_BYTES`. Seeks forward still
follow FrameSource's keyframe-distance rule.

Decoding overlaps the engines (:class:`DecodeOptions`): the bitstream has to be walked up
to every wanted frame whatever the gates decide, so a decode thread walks ahead (at most
two steps' worth of decoded frames, bounded in bytes) while the step loop computes;
conversion and resizing stay in the step loop and only for the frames a running step
asks for. When a forced policy's plan says in advance which frames any step may want
(:meth:`VideoInputs.plan`), the walk skips the non-reference frames outside them. Neither
changes which frames are used: records are identical with both off.

Only frames that a running step needs are converted to RGB and resized; a modality that
never runs decodes nothing (``audio-only`` does not even open the video stream).
:class:`VideoInputs` counts what it hands to each backbone.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
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

    Retention is :class:`FrameSource`'s own ``retain_frames`` option; this class only
    gives it a default (and keeps the name). ``read`` serves requested frames from the
    RGB cache and from the decoded window (converting them now), and asks the forward
    reader only for the rest, so a sequence of requests that moves forward in time,
    with look-backs no longer than the window, is one forward pass.
    ``stats.window_hits`` counts frames served from the window.
    """

    def __init__(self, path: str | Path | VideoInfo, *, retain_frames: int = 96, **kwargs: Any):
        super().__init__(path, retain_frames=retain_frames, **kwargs)

    @property
    def window_hits(self) -> int:
        return self.stats.window_hits


@dataclass(frozen=True)
class DecodeOptions:
    """How :class:`VideoInputs` decodes (the frames used never depend on these).

    ``read_ahead``: decode in a background thread, up to this many frames ahead of the
    step loop (0: decode in the step loop's thread, as before); ``None`` picks two
    steps' worth of frames (at least 16), capped at :data:`READ_AHEAD_BYTES`.
    ``skip_nonref``: when the frames every step may ask for are known in advance (a
    forced policy's plan), skip the non-reference frames outside them.
    """

    read_ahead: int | None = None
    skip_nonref: bool = True


READ_AHEAD_BYTES = 64 * 2**20  # cap of the decoded-but-unconsumed frames per video


def _retain_frames(info: VideoInfo, config: HMSConfig) -> int:
    """Frames spanning one motion clip plus a margin, capped at :data:`RETAIN_BYTES`."""
    span_s = (config.clip.frames - 1) * config.clip.stride_s
    want = math.ceil((span_s + 0.5) * max(info.fps, 1.0)) + 8
    frame_bytes = max(1, info.width * info.height * 3 // 2)
    return max(8, min(want, RETAIN_BYTES // frame_bytes))


def _read_ahead_frames(info: VideoInfo, steps: int, read_ahead: int | None) -> int:
    """Frames the decode thread may run ahead: two steps' worth (>= 16), capped in bytes."""
    if read_ahead is not None:
        return max(0, int(read_ahead))
    per_step = info.num_frames / max(1, steps)
    frame_bytes = max(1, info.width * info.height * 3 // 2)
    return max(2, min(max(16, math.ceil(2 * per_step)), READ_AHEAD_BYTES // frame_bytes))


class VideoInputs:
    """The per-step part inputs of one video, produced on demand.

    ``steps`` = T. Counters: ``appearance_frames`` / ``motion_clips`` = inputs handed to
    the appearance / motion backbone; the decoder's own counters are in :attr:`decode_stats`.
    """

    def __init__(
        self,
        path: str | Path,
        config: HMSConfig,
        steps: int,
        *,
        info: VideoInfo | None = None,
        decode: DecodeOptions | None = None,
    ):
        self.path = str(path)
        self.info = info or probe(path)
        self.config = config
        self.decode = decode or DecodeOptions()
        self.sampler = StepSampler.from_config(self.info, config, steps=steps)
        self.source = RetainingFrameSource(
            self.info,
            retain_frames=_retain_frames(self.info, config),
            read_ahead=_read_ahead_frames(self.info, steps, self.decode.read_ahead),
        )
        self.appearance_frames = 0
        self.motion_clips = 0
        self.has_audio: bool | None = None
        # resized motion frames: neighbouring clips overlap, so each frame is resized once
        self._motion_frames: OrderedDict[int, np.ndarray] = OrderedDict()
        self._motion_keep = 2 * config.clip.frames

    def plan(self, appearance: np.ndarray | None, motion: np.ndarray | None) -> None:
        """Declare, before the first step, which steps may run each backbone (``(T,)`` 0/1,
        None: any step): a forced policy's plan. With ``skip_nonref`` the decoder then
        skips the non-reference frames that none of those steps' inputs contain."""
        if not self.decode.skip_nonref or appearance is None or motion is None:
            return
        s = self.sampler
        a = np.asarray(appearance).reshape(-1).astype(bool)
        m = np.asarray(motion).reshape(-1).astype(bool)
        frames = np.concatenate([s.appearance_indices[a], s.motion_indices[m].reshape(-1)])
        self.source.expect(frames)

    def decode_audio(self) -> np.ndarray:
        """The aligned mono waveform at the front end's rate (sets :attr:`has_audio`)."""
        wave, self.has_audio = decode_audio(
            self.path, self.config.front_end.sample_rate, info=self.info
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
            "frames_converted": s.frames_converted + s.frames_converted_ahead,
            "seeks": s.seeks,
            "window_hits": s.window_hits,
            "frames_walked": s.frames_walked,
            "frames_skipped": s.frames_skipped,
        }

    def close(self) -> None:
        self.source.close()
