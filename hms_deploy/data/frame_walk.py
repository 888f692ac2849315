"""The forward walk through a video stream that :class:`~hms_deploy.data.video.FrameSource`
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

Counters (in :class:`~hms_deploy.data.video.DecodeStats`): ``frames_walked`` = packets
handed to the decoder, ``frames_decoded`` = frames it returned. The walk runs in the
caller's thread or in a :class:`~hms_deploy.data.decode_thread.ReadAhead` thread; it
holds references to the container and the counters only, never to the FrameSource.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol


class WalkCounters(Protocol):
    frames_walked: int
    frames_decoded: int


def walk_frames(
    container: Any,
    stream: Any,
    counters: WalkCounters,
    *,
    wanted: frozenset[int] | None = None,
    index: dict[int, int] | None = None,
) -> Iterator[Any]:
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
