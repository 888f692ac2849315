"""Decode on demand: the inputs of only the steps that run, in one forward pass per video.

The gated loop cannot know future decisions, so frames are requested step by step, in
time order: the appearance frame of step t (nearest tau_t), then, if motion runs, the
32-frame clip around tau_t, which reaches ~1 s *behind* the decode position. A plain
forward reader would have to seek backward for every motion clip (and for the appearance
frames of the next steps, which lie inside the clip just decoded). So the per-video
inputs read through a :class:`~hms_deploy.data.frame_source.FrameSource` that retains a window
of the most recently *decoded* (not converted) frames (its ``retain_frames`` option;
:class:`RetainingFrameSource` gives the default): a request behind the decode position is
converted from that window instead of seeking. Holding a decoded frame costs memory
(~1.5 bytes per pixel, YUV 4:2:0), no compute; the window spans one motion clip plus a
margin, capped at :data:`RETAIN_BYTES`. Seeks forward still follow FrameSource's
keyframe-distance rule.

Decoding overlaps the engines (:class:`DecodeOptions`): the bitstream has to be walked up
to every wanted frame whatever the gates decide, so a decode thread walks ahead (at most
two steps' worth of decoded frames, bounded in bytes) while the step loop computes;
conversion and resizing stay in the step loop and only for the frames a running step
asks for. When a video's plan says in advance which steps may run each backbone
(:meth:`~hms_deploy.data.inputs.VideoInputs.plan`: a forced policy, or the no-audio
fallback), the walk skips the non-reference frames outside them, and the thread hands
over only the frames those steps can use, already converted, resized and cropped
(``plan_ahead``): bounded by the bytes it holds (:data:`READ_AHEAD_BYTES`), it runs as
many steps ahead as that allows. None of this changes which frames are used: records
are identical with all of it off.

Only frames that a running step needs are converted to RGB and resized; a modality that
never runs decodes nothing (``audio-only`` does not even open the video stream).
:func:`open_video` gives the scheduler its per-video inputs: the one per-video input
type, :class:`~hms_deploy.data.inputs.VideoInputs`, over a :class:`RetainingFrameSource`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hms_deploy.config import HMSConfig
from hms_deploy.data.frame_source import FrameSource
from hms_deploy.data.inputs import VideoInputs
from hms_deploy.data.video import ProbedVideo, VideoInfo

__all__ = ["RETAIN_BYTES", "DecodeOptions", "RetainingFrameSource", "VideoInputs", "open_video"]

RETAIN_BYTES = 256 * 2**20  # cap of the decoded-frame window per video
READ_AHEAD_BYTES = 64 * 2**20  # cap of the decoded-but-unconsumed frames per video


class RetainingFrameSource(FrameSource):
    """A :class:`FrameSource` that keeps the last ``retain_frames`` decoded frames.

    Retention is :class:`FrameSource`'s own ``retain_frames`` option; this class only
    gives it a default (and keeps the name). ``read`` serves requested frames from the
    RGB cache and from the decoded window (converting them now), and asks the forward
    reader only for the rest, so a sequence of requests that moves forward in time,
    with look-backs no longer than the window, is one forward pass.
    ``stats.window_hits`` counts frames served from the window.
    """

    def __init__(self, path: str | Path | VideoInfo | ProbedVideo, *, retain_frames: int = 96,
                 **kwargs: Any):
        super().__init__(path, retain_frames=retain_frames, **kwargs)

    @property
    def window_hits(self) -> int:
        return self.stats.window_hits


@dataclass(frozen=True)
class DecodeOptions:
    """How the per-video inputs decode (the frames used never depend on these).

    ``read_ahead``: decode in a background thread, up to this many frames ahead of the
    step loop (0: decode in the step loop's thread); ``None`` picks two
    steps' worth of frames (at least 16; twice the steps of a chunk when appearance
    frames are computed several steps ahead, :mod:`hms_deploy.runtime.appearance_ahead`),
    capped at :data:`READ_AHEAD_BYTES`.
    ``skip_nonref``: when the frames every step may ask for are known in advance (a
    video's plan), skip the non-reference frames outside them.
    ``plan_ahead`` (with the default ``read_ahead`` and a plan): the thread hands over
    only the frames the plan's steps can use, converted to RGB, resized and cropped
    (the rest as bare indices), so it runs ahead as far as :data:`READ_AHEAD_BYTES` of
    those frames allow (many steps of a sparse plan) instead of a count of decoded
    frames; it seeks where the step loop would, instead of pausing there; and for a
    forced policy (whose plan does not depend on the audio) it starts before the audio
    path runs.
    """

    read_ahead: int | None = None
    skip_nonref: bool = True
    plan_ahead: bool = True


def _retain_frames(info: VideoInfo, config: HMSConfig) -> int:
    """Frames spanning one motion clip plus a margin, capped at :data:`RETAIN_BYTES`."""
    span_s = (config.clip.frames - 1) * config.clip.stride_s
    want = math.ceil((span_s + 0.5) * max(info.fps, 1.0)) + 8
    frame_bytes = max(1, info.width * info.height * 3 // 2)
    return max(8, min(want, RETAIN_BYTES // frame_bytes))


def _read_ahead_frames(info: VideoInfo, steps: int, read_ahead: int | None,
                       steps_ahead: int = 2) -> int:
    """Frames the decode thread may run ahead: ``steps_ahead`` steps' worth (>= 16),
    capped in bytes."""
    if read_ahead is not None:
        return max(0, int(read_ahead))
    per_step = info.num_frames / max(1, steps)
    frame_bytes = max(1, info.width * info.height * 3 // 2)
    want = max(16, math.ceil(steps_ahead * per_step))
    return max(2, min(want, READ_AHEAD_BYTES // frame_bytes))


def open_video(path: str | Path, config: HMSConfig, steps: int, *,
               info: VideoInfo | ProbedVideo | None = None,
               decode: DecodeOptions | None = None, steps_ahead: int = 2) -> VideoInputs:
    """The runtime's per-video inputs: :class:`~hms_deploy.data.inputs.VideoInputs` decoding
    on demand through a :class:`RetainingFrameSource` sized by :func:`_retain_frames`,
    reading ahead as ``decode`` says (by default ``steps_ahead`` steps' worth). ``info``:
    the video's probe (its open container is read: :func:`~hms_deploy.runtime.checks.probe_checked`)
    or its info; probed here when None."""
    decode = decode or DecodeOptions()

    def reader(probed: VideoInfo | ProbedVideo) -> FrameSource:
        vi = probed if isinstance(probed, VideoInfo) else probed.info
        return RetainingFrameSource(
            probed, retain_frames=_retain_frames(vi, config),
            read_ahead=_read_ahead_frames(vi, steps, decode.read_ahead, steps_ahead),
            read_ahead_bytes=(READ_AHEAD_BYTES if decode.read_ahead is None and decode.plan_ahead
                              else 0))

    return VideoInputs(path, config, steps, info=info, skip_nonref=decode.skip_nonref,
                       frame_source=reader)
