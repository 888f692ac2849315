"""The read-ahead thread's side of :class:`~hms_deploy.data.frame_source.FrameSource`
when reads follow a plan (:meth:`~hms_deploy.data.frame_source.FrameSource.expect`):
converting (and deriving) expected frames ahead, handing over only usable frames
(:class:`Passed` for the rest), seeking where the reader would (:class:`Seeked`), the
bytes an item holds, and where the thread pauses. Everything here runs in the
read-ahead thread and holds no reference to the FrameSource.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from hms_deploy.data.frame_walk import DecodeStats, seek_key, seek_to, walk_frames

if TYPE_CHECKING:
    from hms_deploy.data.video import VideoInfo


class Passed:
    """A frame the read-ahead thread decoded and did not hand over (no read of the plan
    can use its pixels): its index and pts only."""

    __slots__ = ("index", "pts")

    def __init__(self, index: int, pts: int | None):
        self.index = index
        self.pts = pts


class Seeked:
    """The read-ahead thread seeked to keyframe ``key`` where the reader would (see
    :func:`walk_seeking`); the frames after this item are decoded from there."""

    __slots__ = ("key",)
    pts = None

    def __init__(self, key: int):
        self.key = key


def held_bytes(
    info: VideoInfo, index: dict[int, int], store: dict[int, np.ndarray],
    derived: dict[int, dict[str, np.ndarray]],
) -> Callable[[Any], int]:
    """The weight of an item of the planned read-ahead: the bytes it holds. Nothing for
    a :class:`Passed`; a decoded frame (~1.5 bytes per pixel, YUV 4:2:0) plus, for an
    expected one, its RGB and what was derived from it (the thread put them in
    ``store`` / ``derived`` before handing the frame over)."""
    yuv = max(1, info.width * info.height * 3 // 2)

    def weight(item: Any) -> int:
        if isinstance(item, (Passed, Seeked)):
            return 0
        i = index.get(int(item.pts)) if item.pts is not None else None
        if i is None:
            return yuv
        rgb = store.get(i)
        extra = sum(x.nbytes for x in derived.get(i, {}).values())
        return yuv + (0 if rgb is None else rgb.nbytes) + extra

    return weight


def walk_seeking(
    container: Any, stream: Any, stats: DecodeStats, expected: frozenset[int],
    index: dict[int, int], frame_pts: np.ndarray, keyframes: np.ndarray, threshold: int,
) -> Iterator[Any]:
    """:func:`~hms_deploy.data.frame_walk.walk_frames`, seeking where the reader would
    (run in the read-ahead thread, which owns the container while it runs).

    After handing over an expected frame ``e``, the next read's target is the next
    expected frame, and the reader seeks by :func:`~hms_deploy.data.frame_walk.seek_key`. The thread then seeks
    there itself (the same container call), yields :class:`Seeked` and walks on, instead
    of waiting for the reader to catch up and seek. The reader checks that the seek is
    the one it would make, and makes its own otherwise (:meth:`FrameSource._read_forward`).
    """
    wanted = np.asarray(sorted(expected), dtype=np.int64)
    while True:
        walk = walk_frames(container, stream, stats, wanted=expected, index=index)
        key = None
        try:
            for frame in walk:
                yield frame
                i = index.get(int(frame.pts)) if frame.pts is not None else None
                if i is not None and i in expected:
                    nxt = next_expected(wanted, i)
                    key = None if nxt is None else seek_key(i, nxt, keyframes, threshold)
                    if key is not None:
                        break
        finally:
            walk.close()
        if key is None:
            return  # end of stream
        seek_to(container, stream, frame_pts, key)
        yield Seeked(key)


def next_expected(wanted: np.ndarray, i: int) -> int | None:
    """The first of the sorted ``wanted`` frames after ``i`` (None: none is)."""
    k = int(np.searchsorted(wanted, i, side="right"))
    return None if k == wanted.size else int(wanted[k])


def pause_at_end(index: dict[int, int], expected: frozenset[int]) -> Callable[[Any], bool]:
    """Pause after the last expected frame: no read can want what follows."""
    last = max(expected) if expected else -1

    def pause_after(frame: Any) -> bool:
        i = index.get(int(frame.pts)) if frame.pts is not None else None
        return i is not None and i >= last

    return pause_after


def pause_before_seeks(
    index: dict[int, int], expected: frozenset[int], keyframes: np.ndarray, threshold: int
) -> Callable[[Any], bool]:
    """When reads can only ask for ``expected`` frames: whether the reader will seek (or
    stop) after this decoded frame, so that decoding further ahead would be wasted.

    After serving an expected frame ``e``, the next read's target is an expected frame
    ``>= n`` (the next one after ``e``), and the reader seeks by
    :func:`~hms_deploy.data.frame_walk.seek_key`. A
    wrong guess costs only time: the read-ahead thread resumes when the reader asks.
    Holds no reference to the FrameSource (its thread must not keep it alive).
    """
    wanted = np.asarray(sorted(expected), dtype=np.int64)

    def pause_after(frame: Any) -> bool:
        i = index.get(int(frame.pts)) if frame.pts is not None else None
        if i is None or i not in expected:
            return False
        nxt = next_expected(wanted, i)
        return nxt is None or seek_key(i, nxt, keyframes, threshold) is not None

    return pause_after


def to_rgb(frame: Any, rotation: int) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB of a decoded frame, display rotation applied."""
    rgb = frame.to_ndarray(format="rgb24")
    if rotation:
        rgb = np.ascontiguousarray(np.rot90(rgb, k=rotation // 90))
    return rgb


def convert_ahead(
    frames: Iterator[Any],
    index: dict[int, int],
    expected: frozenset[int],
    rotation: int,
    store: dict[int, np.ndarray],
    stats: DecodeStats,
    derive: Callable[[int, np.ndarray], dict[str, np.ndarray]] | None = None,
    derived: dict[int, dict[str, np.ndarray]] | None = None,
    usable_only: bool = False,
    sure: frozenset[int] | None = None,
) -> Iterator[Any]:
    """Pass ``frames`` on, converting the ``sure`` ones (default: the expected ones) to
    RGB into ``store`` first (and, with ``derive``, what it makes of them into
    ``derived``); runs in the read-ahead thread, the reader pops what it consumes.

    ``usable_only``: hand over only the frames a read of ``expected`` can use, a
    :class:`Passed` for the others. The reader serves a target with the first decoded
    frame at or after it, so a frame is usable when an expected frame lies after the
    previous decoded frame and at or before it (the expected frame itself, or its
    substitute when the stream lacks it), when it is the first of the walk or has no
    known index, and when it is the last frame of the stream (the substitute of every
    target past the end): each other frame is held back until the next one arrives,
    then passed on as a :class:`Passed`.
    """
    wanted = np.asarray(sorted(expected), dtype=np.int64)
    convert = expected if sure is None else sure
    prev: int | None = None  # index of the previous decoded frame of this walk
    held: Any = None  # the last frame so far, not usable unless the stream ends here
    for frame in frames:
        if held is not None:
            yield Passed(index[int(held.pts)], int(held.pts))
            held = None
        if isinstance(frame, Seeked):
            prev = None  # the walk starts again at a keyframe
            yield frame
            continue
        i = index.get(int(frame.pts)) if frame.pts is not None else None
        if i is None:
            prev = None
            yield frame
            continue
        if i in convert:
            rgb = to_rgb(frame, rotation)
            if derive is not None and derived is not None:
                d = derive(i, rgb)
                if d:
                    derived[i] = d
                    stats.frames_derived_ahead += 1  # only this thread writes this counter
            store[i] = rgb
            stats.frames_converted_ahead += 1  # only this thread writes this counter
        usable = not usable_only or prev is None or i <= prev
        if not usable:
            k = int(np.searchsorted(wanted, prev, side="right"))
            usable = k < wanted.size and int(wanted[k]) <= i
        prev = i
        if usable:
            yield frame
        else:
            held = frame
    if held is not None:
        yield held
