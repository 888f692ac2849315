"""The forward walk through a video stream that :class:`~hms_deploy.data.frame_source.FrameSource`
consumes: demux, skip what nothing wants, decode.

Skipping (``skip_frame``): H.264/HEVC frames that no other frame references (x264's
non-reference B-frames: about half of the frames with its default ``bframes=3
b-pyramid=normal``) can be dropped by the decoder without changing any other frame.
Before each packet the walk sets ``codec_context.skip_frame`` (PyAV's wrapper of
``AVCodecContext.skip_frame``) to ``"NONREF"`` when the packet's frame is not in the
``wanted`` set, else to ``"DEFAULT"``; FFmpeg then discards the packet's picture only if
it is a non-reference one. Frames in ``wanted`` are always decoded, and reference frames
are decoded whatever ``wanted`` says, so every decoded frame is bit-identical to a full
decode's. ``wanted=None`` decodes everything. A packet without a timestamp, or whose
timestamp :func:`~hms_deploy.data.video.probe` did not see, is decoded.

Counters (in :class:`DecodeStats`): ``frames_walked`` = packets
handed to the decoder, ``frames_decoded`` = frames it returned. The walk runs in the
caller's thread or in a :class:`~hms_deploy.data.decode_thread.ReadAhead` thread; it
holds references to the container and the counters only, never to the FrameSource.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray


@dataclass
class DecodeStats:
    """Counters of a :class:`~hms_deploy.data.frame_source.FrameSource` (and its walks)
    since it was created.

    ``frames_walked``: packets handed to the decoder; ``frames_decoded``: frames the
    decoder produced (with read-ahead, also frames decoded ahead that a seek or ``close``
    then dropped); ``frames_skipped``: walked minus decoded (non-reference frames skipped
    because no read can want them, see ``FrameSource.expect``, plus frames still inside
    the decoder when a seek or ``close`` flushed it); ``frames_converted``: frames
    converted to RGB by the reader, ``frames_converted_ahead`` by the read-ahead thread
    (the frames a plan surely reads), ``frames_derived_ahead`` those the thread also
    cropped (the plan's ``Crop`` s, :mod:`hms_deploy.data.plan_ahead`); ``seeks``: container seeks (the reader's, and the
    thread's where the reader took them); ``cache_hits``: requested frames served from
    the RGB cache; ``window_hits``: requested frames converted from the window of
    retained decoded frames; ``substituted``: requested frames the decoder never produced
    (a damaged stream) and that got the next decodable frame instead (the last one at the
    end of the stream).
    """

    frames_decoded: int = 0
    frames_converted: int = 0
    seeks: int = 0
    cache_hits: int = 0
    substituted: int = 0
    frames_walked: int = 0
    window_hits: int = 0
    frames_converted_ahead: int = 0
    frames_derived_ahead: int = 0

    @property
    def frames_skipped(self) -> int:
        return max(0, self.frames_walked - self.frames_decoded)


def walk_frames(
    container: Any,
    stream: Any,
    counters: DecodeStats,
    *,
    wanted: frozenset[int] | None = None,
    index: dict[int, int] | None = None,
) -> Generator[Any, None, None]:
    """Yield the decoded frames of ``stream`` from the container's current position.

    Args:
        wanted: frame indices that must be decoded; other non-reference frames are
            skipped. None: decode every frame.
        index: pts -> frame index (required with ``wanted``).
    """
    ctx = stream.codec_context
    skipping = False
    ctx.skip_frame = "DEFAULT"  # a previous walk (before a seek) may have left NONREF on
    for packet in container.demux(stream):
        if wanted is not None and index is not None:
            i = index.get(int(packet.pts)) if packet.pts is not None else None
            skip = i is not None and i not in wanted and packet.size > 0
            if skip != skipping:
                ctx.skip_frame = "NONREF" if skip else "DEFAULT"
                skipping = skip
        if packet.size:
            counters.frames_walked += 1
        for frame in packet.decode():
            counters.frames_decoded += 1
            yield frame


def keyframe_at_or_before(keyframes: NDArray[np.int64], index: int) -> int:
    """The index of the last keyframe at or before frame ``index`` (``keyframes``: sorted
    keyframe indices, starting at 0)."""
    return int(keyframes[np.searchsorted(keyframes, index, side="right") - 1])


def seek_key(pos: int, target: int, keyframes: NDArray[np.int64], threshold: int) -> int | None:
    """The forward seek rule: the keyframe to seek to for ``target`` (> ``pos``, the last
    frame taken) when it lies more than ``threshold`` frames past ``pos + 1``; None: walk."""
    key = keyframe_at_or_before(keyframes, target)
    return key if key - (pos + 1) > threshold else None


def seek_to(container: Any, stream: Any, frame_pts: NDArray[np.int64], key: int) -> None:
    """Seek the container to keyframe ``key`` (by its pts; PyAV flushes the decoder)."""
    container.seek(int(frame_pts[key]), stream=stream, backward=True, any_frame=False)
