"""Input checks for inputs the paper never sees (docs/method.md §9), from a probe alone.

- **Not a video**: an input whose video stream has fewer than two frames (an image, a
  PNG renamed ``.mp4``) is refused: :func:`require_video`.
- **Truncated file**: when the demuxed streams end before the duration the container
  declares by more than :data:`TRUNCATION_MIN_S` seconds *and* more than
  :data:`TRUNCATION_MIN_FRACTION` of it, the file is an error naming both times, whatever
  the policy (a policy that never decodes a frame must not hide it);
  ``allow_truncated=True`` classifies the decodable part (the frames that decode, and
  the audio up to where it stops decoding) and returns a warning instead:
  :func:`check_truncation`.
- **Too few distinct inputs**: when the T steps outnumber the distinct frames (or audio
  patches) they sample, the run proceeds with a warning: :func:`distinct_input_warnings`.

Every check is cheap (no decoding, except :func:`decodable_part`'s one GOP): they read :class:`~hms_deploy.data.video.VideoInfo`
and the step sampler's precomputed indices.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from hms_deploy.data.audio import center_frames
from hms_deploy.errors import VideoError

TRUNCATION_MIN_S = 1.0  # a stream may end this much early (encoder padding, edit lists)
TRUNCATION_MIN_FRACTION = 0.10  # ... or this fraction of the declared duration


def require_video(info: Any) -> None:
    """:class:`VideoError` unless the input has a video stream with more than one frame."""
    if info.num_frames < 2:
        raise VideoError(
            f"{info.path}: not a video (its video stream has {info.num_frames} frame; "
            "an image?)"
        )


def truncation(info: Any) -> tuple[float, float] | None:
    """``(streams_end_s, declared_s)`` when the file is truncated (see the module doc), else None."""
    declared = info.declared_duration_s
    if declared is None or not declared > 0:
        return None
    missing = declared - info.streams_end_s
    if missing > TRUNCATION_MIN_S and missing > TRUNCATION_MIN_FRACTION * declared:
        return float(info.streams_end_s), float(declared)
    return None


def check_truncation(info: Any, *, allow_truncated: bool = False, container: Any = None
                     ) -> tuple[Any, list[str]]:
    """Raise :class:`VideoError` for a truncated file; when allowed, return the info of
    its decodable part (:func:`decodable_part`, reading ``container`` when given: the
    probe's) and a warning. ``(info, [])`` otherwise."""
    cut = truncation(info)
    if cut is None:
        return info, []
    end, declared = cut
    if not allow_truncated:
        raise VideoError(
            f"{info.path}: truncated file: its streams end at {end:.2f} s but the container "
            f"declares {declared:.2f} s (allow_truncated classifies the decodable part)",
            setting="allow_truncated", value=False,
        )
    info = decodable_part(info, container=container)
    end = info.duration_s
    return info, [
        f"truncated file: classified the decodable {end:.2f} s of the declared {declared:.2f} s"
    ]


def decodable_part(info: Any, *, container: Any = None) -> Any:
    """``info`` cut to the frames that decode: the last GOP is decoded once (the data of a
    truncated file ends inside it), and frames after the last one the decoder produced
    before an error (or the end) are dropped. The duration follows the kept frames.
    ``container``: an open container of the file to read (left open; its position moves),
    else the file is opened here.
    """
    import dataclasses

    import av

    from hms_deploy.data.video import open_media

    last_key = int(info.keyframe_indices[-1])
    decoded: set[int] = set()
    own = container is None
    if own:
        container = open_media(info.path)
    try:
        stream = container.streams.video[0]
        container.seek(int(info.frame_pts[last_key]), stream=stream, backward=True)
        for packet in container.demux(stream):
            for frame in packet.decode():
                if frame.pts is not None:
                    decoded.add(int(frame.pts))
    except av.FFmpegError:
        pass  # the cut: what decoded before it is the decodable part
    finally:
        if own:
            container.close()
    pts = info.frame_pts
    keep = int(np.searchsorted(pts, max(decoded), side="right")) if decoded else last_key
    if keep < 2:
        raise VideoError(f"{info.path}: truncated file: fewer than two frames decode")
    if keep == pts.size:
        return info
    step = float(np.median(np.diff(info.frame_times[:keep])))
    duration = float(info.frame_times[keep - 1]) + step
    keys = info.keyframe_indices[info.keyframe_indices < keep]
    return dataclasses.replace(
        info, duration_s=duration, frame_times=info.frame_times[:keep],
        frame_pts=pts[:keep], keyframe_indices=keys, keyframe_times=info.frame_times[keys],
        fps=keep / duration,
    )


def distinct_input_warnings(
    steps: int, appearance_indices: NDArray[np.int64], centers_s: NDArray[np.float64], front_end: Any,
    duration_s: float, *, has_audio: bool,
) -> list[str]:
    """Warnings when T exceeds the distinct frames, or the distinct audio patches, it samples.

    ``appearance_indices`` (T,) are the frames the steps sample; audio patches are
    distinct when their centre spectrogram frames differ and lie inside the audio
    (``duration_s``); without audio there is no patch to count.
    """
    out = []
    frames = int(np.unique(appearance_indices).size)
    if steps > frames:
        out.append(f"T={steps} steps but only {frames} distinct frames: steps repeat frames")
    if has_audio:
        c = center_frames(centers_s, front_end)
        last = int(np.floor(duration_s * front_end.sample_rate / front_end.hop_length))
        patches = int(np.unique(np.clip(c, 0, max(last, 0))).size)
        if steps > patches:
            out.append(
                f"T={steps} steps but only {patches} distinct audio patches: steps repeat audio"
            )
    return out
