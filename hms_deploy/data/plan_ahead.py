"""The plan of a :class:`~hms_deploy.data.frame_source.FrameSource`'s reads and the decode
walk that follows it: :class:`ReadPlan`.

A plan (:meth:`FrameSource.expect <hms_deploy.data.frame_source.FrameSource.expect>`)
names the frames reads may ask for (``expected``), those they surely will (``sure``) and
the resized crops the step loop will make of them (:class:`Crop`). :meth:`ReadPlan.walk`
builds the decode walk for the reader: the forward walk skipping the non-reference
frames outside the plan and, with read-ahead, the thread that runs it
(:class:`~hms_deploy.data.decode_thread.ReadAhead`), converting the sure frames to RGB
and cropping them ahead; with a byte budget (``read_ahead_bytes``) it hands over only
the frames a read can use (:class:`Passed` for the rest), seeks where the reader would
(:class:`Seeked`) and is bounded by the bytes it holds. The :class:`ReadPlan` owns
everything that thread writes (the RGB frames and crops, taken once by the reader with
:meth:`ReadPlan.take_rgb` / :meth:`ReadPlan.take_crop`, and the ``*_ahead`` counters); the
thread holds references to the plan, the container and the counters only, never to the
FrameSource.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from hms_deploy.data.decode_thread import ReadAhead
from hms_deploy.data.frame_walk import DecodeStats, seek_key, seek_to, walk_frames
from hms_deploy.data.resize import resize_center_crop
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


@dataclass(frozen=True)
class Crop:
    """A resized centre crop (:func:`~hms_deploy.data.resize.resize_center_crop` with
    ``resize`` and ``crop``) that the decode thread makes of the planned ``frames`` it
    converts, taken by the reader under ``key``."""

    key: str
    frames: frozenset[int]
    resize: int
    crop: int


class ReadPlan:
    """The frames reads of one FrameSource will ask for, and the decode walk that follows
    them (see the module docstring).

    ``expected``: every frame reads may ask for; ``sure``: those among them that reads
    will ask for (converted, and cropped by ``crops``, ahead by the thread);
    ``index``: pts -> frame index; ``stats``: the FrameSource's counters.
    """

    def __init__(
        self, info: VideoInfo, index: dict[int, int], expected: frozenset[int],
        sure: frozenset[int], crops: Iterable[Crop] = (), *, seek_threshold: int,
        stats: DecodeStats,
    ) -> None:
        self.info = info
        self.index = index
        self.expected = expected
        self.sure = sure
        self.crops = tuple(crops)
        self.seek_threshold = int(seek_threshold)
        self.stats = stats
        self._wanted = np.asarray(sorted(expected), dtype=np.int64)
        # written by the decode thread, popped by the reader
        self._rgb: dict[int, NDArray[np.uint8]] = {}
        self._crops_made: dict[int, dict[str, NDArray[np.uint8]]] = {}

    # -- the reader's side -----------------------------------------------------------------
    def take_rgb(self, i: int) -> NDArray[np.uint8] | None:
        """The RGB of frame ``i`` converted by the thread, once (None: not converted)."""
        return self._rgb.pop(i, None) if self._rgb else None

    def take_crop(self, i: int, key: str) -> NDArray[np.uint8] | None:
        """The crop ``key`` of frame ``i`` made by the thread, once (None: not made)."""
        d = self._crops_made.get(i)
        if d is None:
            return None
        x = d.pop(key, None)
        if not d:
            self._crops_made.pop(i, None)
        return x

    def clear(self) -> None:
        """Drop what the thread made (call after its walk was closed: nothing writes here)."""
        self._rgb.clear()
        self._crops_made.clear()

    def walk(
        self, container: Any, stream: Any, *, read_ahead: int, read_ahead_bytes: int,
        seek_ok: bool, pass_all: bool,
    ) -> tuple[Iterator[Any], bool]:
        """The decode walk from the container's position, and whether it seeks where the
        reader would (its :class:`Seeked` items then stand for the reader's seeks).

        ``read_ahead``: frames the thread may run ahead (0: no thread, the walk runs in
        the reader's thread); ``read_ahead_bytes`` (> 0, with ``read_ahead``): the
        planned read-ahead, bounded in bytes; ``seek_ok``: seeks land where asked (the
        thread may seek, or pause before the reader seeks); ``pass_all``: a read left the
        plan, hand over every decoded frame.
        """
        planned = read_ahead > 0 and read_ahead_bytes > 0 and not pass_all
        thread_seeks = planned and seek_ok
        frames = (self._walk_seeking(container, stream) if thread_seeks else
                  walk_frames(container, stream, self.stats, wanted=self.expected,
                              index=self.index))
        if read_ahead <= 0:
            return frames, False
        frames = self._convert_ahead(frames, crop=planned, usable_only=planned)
        pause = (self._pause_at_end if thread_seeks else
                 self._pause_before_seeks if seek_ok else None)
        ahead = ReadAhead(
            frames, read_ahead_bytes if planned else read_ahead,
            name=f"hms-decode:{Path(self.info.path).name}", pause_after=pause,
            weight=self._held_bytes if planned else None,
        )
        return ahead, thread_seeks

    # -- the decode thread's side ----------------------------------------------------------
    def _frame_index(self, frame: Any) -> int | None:
        return self.index.get(int(frame.pts)) if frame.pts is not None else None

    def _held_bytes(self, item: Any) -> int:
        """The weight of an item of the planned read-ahead: the bytes it holds. Nothing
        for a :class:`Passed` or :class:`Seeked`; a decoded frame (~1.5 bytes per pixel,
        YUV 4:2:0) plus, for a sure one, its RGB and its crops (made before the frame
        was handed over)."""
        if isinstance(item, (Passed, Seeked)):
            return 0
        yuv = max(1, self.info.width * self.info.height * 3 // 2)
        i = self._frame_index(item)
        if i is None:
            return yuv
        rgb = self._rgb.get(i)
        extra = sum(x.nbytes for x in self._crops_made.get(i, {}).values())
        return yuv + (0 if rgb is None else rgb.nbytes) + extra

    def _walk_seeking(self, container: Any, stream: Any) -> Iterator[Any]:
        """:func:`~hms_deploy.data.frame_walk.walk_frames`, seeking where the reader would.

        After handing over an expected frame ``e``, the next read's target is the next
        expected frame, and the reader seeks by :func:`~hms_deploy.data.frame_walk.seek_key`.
        The thread then seeks there itself (the same container call), yields
        :class:`Seeked` and walks on, instead of waiting for the reader to catch up and
        seek. The reader checks that the seek is the one it would make, and makes its
        own otherwise.
        """
        keyframes, threshold = self.info.keyframe_indices, self.seek_threshold
        while True:
            walk = walk_frames(container, stream, self.stats, wanted=self.expected,
                               index=self.index)
            key = None
            try:
                for frame in walk:
                    yield frame
                    i = self._frame_index(frame)
                    if i is not None and i in self.expected:
                        nxt = next_expected(self._wanted, i)
                        key = None if nxt is None else seek_key(i, nxt, keyframes, threshold)
                        if key is not None:
                            break
            finally:
                walk.close()
            if key is None:
                return  # end of stream
            seek_to(container, stream, self.info.frame_pts, key)
            yield Seeked(key)

    def _pause_at_end(self, frame: Any) -> bool:
        """Pause after the last expected frame: no read can want what follows."""
        i = self._frame_index(frame)
        last = int(self._wanted[-1]) if self._wanted.size else -1
        return i is not None and i >= last

    def _pause_before_seeks(self, frame: Any) -> bool:
        """Whether the reader will seek (or stop) after this decoded frame, so that
        decoding further ahead would be wasted: after serving an expected frame ``e``, the
        next read's target is the next expected frame, and the reader seeks by
        :func:`~hms_deploy.data.frame_walk.seek_key`. A wrong guess costs only time: the
        thread resumes when the reader asks."""
        i = self._frame_index(frame)
        if i is None or i not in self.expected:
            return False
        nxt = next_expected(self._wanted, i)
        return nxt is None or seek_key(i, nxt, self.info.keyframe_indices,
                                       self.seek_threshold) is not None

    def _convert_ahead(self, frames: Iterator[Any], *, crop: bool, usable_only: bool
                       ) -> Iterator[Any]:
        """Pass ``frames`` on, converting the sure ones to RGB first (and, with ``crop``,
        making their :class:`Crop` s); the reader takes what it consumes.

        ``usable_only``: hand over only the frames a read of ``expected`` can use, a
        :class:`Passed` for the others. The reader serves a target with the first
        decoded frame at or after it, so a frame is usable when an expected frame lies
        after the previous decoded frame and at or before it (the expected frame itself,
        or its substitute when the stream lacks it), when it is the first of the walk or
        has no known index, and when it is the last frame of the stream (the substitute
        of every target past the end): each other frame is held back until the next one
        arrives, then passed on as a :class:`Passed`.
        """
        wanted, stats, index = self._wanted, self.stats, self.index
        crops = self.crops if crop else ()
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
            i = self._frame_index(frame)
            if i is None:
                prev = None
                yield frame
                continue
            if i in self.sure:
                rgb = to_rgb(frame, self.info.rotation)
                made = {c.key: resize_center_crop(rgb, c.resize, c.crop)
                        for c in crops if i in c.frames}
                if made:
                    self._crops_made[i] = made
                    stats.frames_derived_ahead += 1  # only this thread writes this counter
                self._rgb[i] = rgb
                stats.frames_converted_ahead += 1  # only this thread writes this counter
            usable = not usable_only or prev is None or i <= prev
            if not usable and prev is not None:
                k = int(np.searchsorted(wanted, prev, side="right"))
                usable = k < wanted.size and int(wanted[k]) <= i
            prev = i
            if usable:
                yield frame
            else:
                held = frame
        if held is not None:
            yield held


def next_expected(wanted: NDArray[np.int64], i: int) -> int | None:
    """The first of the sorted ``wanted`` frames after ``i`` (None: none is)."""
    k = int(np.searchsorted(wanted, i, side="right"))
    return None if k == wanted.size else int(wanted[k])


def to_rgb(frame: Any, rotation: int) -> NDArray[np.uint8]:
    """``(H, W, 3)`` uint8 RGB of a decoded frame, display rotation applied."""
    rgb: NDArray[np.uint8] = frame.to_ndarray(format="rgb24")
    if rotation:
        rgb = np.ascontiguousarray(np.rot90(rgb, k=rotation // 90))
    return rgb
