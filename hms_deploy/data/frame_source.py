"""Decode-on-demand of the frames steps need: :class:`FrameSource` (re-exported by
:mod:`hms_deploy.data.video`, where it has always been imported from).

Frames are identified by their index in presentation (pts) order (see
:func:`~hms_deploy.data.video.probe`) and returned as uint8 RGB ``(H, W, 3)`` with the
container's display rotation applied. The forward walk, the seek rule and the counters
are :mod:`hms_deploy.data.frame_walk` (non-reference frames no read can want are
skipped); the optional background decoding is :mod:`hms_deploy.data.decode_thread`, and
its side of a planned read-ahead (usable frames only, converted and resized, seeking
where the reader would) :mod:`hms_deploy.data.plan_ahead`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from typing_extensions import Self

from hms_deploy.data.decode_thread import ReadAhead
from hms_deploy.data.frame_walk import (
    DecodeStats,
    keyframe_at_or_before,
    seek_key,
    seek_to,
    walk_frames,
)
from hms_deploy.data.plan_ahead import (
    Passed,
    Seeked,
    convert_ahead,
    held_bytes,
    pause_at_end,
    pause_before_seeks,
    to_rgb,
    walk_seeking,
)
from hms_deploy.data.video import VideoInfo, _open, probe
from hms_deploy.errors import VideoError, first_line


class FrameSource:
    """Decode-on-demand of frames by index, in one forward pass per request.

    ``read`` sorts the requested indices and walks forward. Before each wanted frame it
    decides whether to seek: it seeks (to the keyframe at or before the target) only
    when that keyframe lies after the current decode position, i.e. the target is beyond
    the next keyframe, and a seek would skip more than ``seek_threshold`` frames;
    otherwise it decodes forward. Frames that are not wanted are decoded but not
    converted to RGB. Requests that go backward seek (unless the retained window holds
    them). Decoded frames are identified by their pts (mapped to indices through
    :func:`probe`'s scan), so B-frame reordering and seeks that land early cannot shift
    indices.

    Options (all off by default: the plain reader above):

    - ``cache_frames``: converted frames are kept in an LRU cache of that many frames
      (overlapping motion clips of neighbouring steps reuse them); memory is
      ``cache_frames * width * height * 3`` bytes.
    - ``retain_frames``: keep the last that many *decoded* (not converted) frames; a
      request behind the decode position is converted from this window instead of
      seeking (~1.5 bytes per pixel each, YUV 4:2:0), so requests that move forward
      with look-backs no longer than the window are one forward pass.
    - ``read_ahead``: decode in a background thread (:mod:`hms_deploy.data.decode_thread`)
      up to that many frames ahead of the reader; conversion stays in the reader's
      thread and only for wanted frames. The frames used are exactly those of the
      plain reader (the seek decisions and the window see the same frame sequence); a
      seek, an error or ``close`` stops and joins the thread first.
    - :meth:`expect` (before the first read): the frames later reads may ask for; the
      walk then skips non-reference frames outside that set (:mod:`~hms_deploy.data.frame_walk`).
      With ``read_ahead`` too, the thread converts the expected frames to RGB, and with
      ``read_ahead_bytes`` it hands over only the frames a read can use (the expected
      ones, the substitute of an expected frame the stream lacks, the stream's last
      frame); of every other frame only its index (:class:`Passed`), so it may run
      ahead as far as ``read_ahead_bytes`` of those frames (decoded + RGB) allow, many
      steps of a sparse plan. A read of a frame outside the plan still gets that
      frame: the reader then re-walks from the keyframe before it, handing over every
      frame from there on.
    - :attr:`derive` (with ``read_ahead_bytes`` and :meth:`expect`): a function the read-ahead
      thread also runs on each expected frame it converts (``derive(index, rgb) ->
      {key: array}``; :class:`~hms_deploy.data.inputs.VideoInputs` resizes and crops
      there), taken once by the reader with :meth:`take_derived`.

    Use as a context manager (the container is opened on first use and closed on exit)::

        with FrameSource(path) as src:
            frames = src.read([0, 15, 30])   # {index: (H, W, 3) uint8 RGB}
    """

    def __init__(
        self,
        path: str | Path | VideoInfo,
        *,
        seek_threshold: int = 16,
        cache_frames: int = 64,
        threads: int = 0,
        retain_frames: int = 0,
        read_ahead: int = 0,
        read_ahead_bytes: int = 0,
    ) -> None:
        self.info = path if isinstance(path, VideoInfo) else probe(path)
        self.path = self.info.path
        self.seek_threshold = int(seek_threshold)
        self.cache_frames = int(cache_frames)
        self.threads = int(threads)
        self.retain_frames = int(retain_frames)
        self.read_ahead = int(read_ahead)
        self.read_ahead_bytes = int(read_ahead_bytes)
        self._pass_all = False  # a read left the plan: hand over every decoded frame
        self._thread_seeks = False  # the current walk seeks where the reader would
        self.stats = DecodeStats()
        self._index = {int(p): i for i, p in enumerate(self.info.frame_pts.tolist())}
        self._expected: frozenset[int] | None = None
        self._sure: frozenset[int] | None = None  # expected frames reads will ask for
        self._container: Any = None
        self._stream: Any = None
        self._frames: Iterator[Any] | None = None
        self._pos = -1  # index of the last frame the reader took from the decoder
        self._started = False  # a frame has been decoded (expect() is too late)
        self._seek_ok = True
        self._last_frame: Any = None
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._window: OrderedDict[int, Any] = OrderedDict()
        # RGB of expected frames, converted by the read-ahead thread (popped by the reader)
        self._preconverted: dict[int, np.ndarray] = {}
        # derive(index, rgb) -> {key: array}: run by the read-ahead thread on the expected
        # frames it converts (e.g. the resized crops a step will want); taken by the reader
        self.derive: Callable[[int, np.ndarray], dict[str, np.ndarray]] | None = None
        self._derived: dict[int, dict[str, np.ndarray]] = {}

    # -- resources -------------------------------------------------------------------
    def open(self) -> Self:
        if self._container is None:
            self._container = _open(self.path)
            if not self._container.streams.video:
                self.close()
                raise VideoError(f"{self.path}: no video stream")
            self._stream = self._container.streams.video[0]
            if self.threads:
                self._stream.codec_context.thread_count = self.threads
            self._frames = self._decode_iter()
            self._pos = -1
        return self

    def start(self) -> None:
        """Open the file and, with ``read_ahead``, start the decode thread now, so that it
        decodes while the caller does other work (after :meth:`expect`; reads as usual)."""
        self.open()
        starter = getattr(self._frames, "start", None)
        if starter is not None:
            starter()

    def _stop_frames(self) -> None:
        """Stop the walk (and join its thread) before anyone else touches the container."""
        frames, self._frames = self._frames, None
        close = getattr(frames, "close", None)
        if close is not None:
            close()
        self._preconverted.clear()  # the thread is gone: nothing writes here any more
        self._derived.clear()

    def close(self) -> None:
        try:
            self._stop_frames()
        finally:
            if self._container is not None:
                self._container.close()
            self._container = self._stream = None
            self._pos = -1
            self._window = OrderedDict()

    def __enter__(self) -> Self:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def expected(self) -> frozenset[int] | None:
        """The frames declared by :meth:`expect` (None: any frame)."""
        return self._expected

    def expect(self, frame_indices: Sequence[int] | np.ndarray | None, *,
               sure: Sequence[int] | np.ndarray | None = None) -> None:
        """Declare every frame that reads of this source may ask for (None: any frame).

        The forward walk then skips the non-reference frames outside this set (they are
        never converted, and no other frame needs them). Call before the first read; a
        later read of a frame outside the set is still served, but may get a
        substitute (the next decoded frame) if that frame was skipped. ``sure``: the
        frames among them that reads *will* ask for (default: all); only these are
        converted (and derived) ahead by the read-ahead thread, so frames that a learned
        gate may never want cost no conversion.
        """
        new = (None if frame_indices is None else
               frozenset(np.asarray(frame_indices, dtype=np.int64).reshape(-1).tolist()))
        sure_set = (new if sure is None or new is None else
                    frozenset(np.asarray(sure, dtype=np.int64).reshape(-1).tolist()) & new)
        if new is not None and new == self._expected and sure_set == self._sure:
            return  # the same plan again (e.g. declared before decoding started, and after)
        if self._started:
            raise RuntimeError(f"{self.path}: expect() must come before the first read")
        self._expected, self._sure = new, sure_set
        if self._container is not None:
            self._stop_frames()
            self._frames = self._decode_iter()

    # -- decoding ----------------------------------------------------------------------
    def _decode_iter(self) -> Iterator[Any]:
        planned = (self.read_ahead > 0 and self._expected is not None
                   and self.read_ahead_bytes > 0 and not self._pass_all)
        if planned and self._seek_ok:
            assert self._expected is not None
            frames = walk_seeking(
                self._container, self._stream, self.stats, self._expected, self._index,
                self.info.frame_pts, self.info.keyframe_indices, self.seek_threshold,
            )
        else:
            frames = walk_frames(
                self._container, self._stream, self.stats, wanted=self._expected,
                index=self._index,
            )
        self._thread_seeks = planned and self._seek_ok
        if self.read_ahead > 0:
            pause = None
            capacity, weight = self.read_ahead, None
            if self._expected is not None:
                # the thread also converts the frames reads will want (same function)
                frames = convert_ahead(
                    frames, self._index, self._expected, self.info.rotation,
                    self._preconverted, self.stats, self.derive if planned else None,
                    self._derived, planned, self._sure,
                )
                if planned:
                    capacity = self.read_ahead_bytes
                    weight = held_bytes(self.info, self._index, self._preconverted, self._derived)
                if self._thread_seeks:
                    pause = pause_at_end(self._index, self._expected)
                elif self._seek_ok:
                    pause = pause_before_seeks(
                        self._index, self._expected, self.info.keyframe_indices,
                        self.seek_threshold,
                    )
            return ReadAhead(
                frames, capacity, name=f"hms-decode:{Path(self.path).name}",
                pause_after=pause, weight=weight,
            )
        return frames

    def _keyframe_at_or_before(self, index: int) -> int:
        return keyframe_at_or_before(self.info.keyframe_indices, index)

    def _should_seek(self, target: int) -> bool:
        if target <= self._pos:
            return True  # backward: only a seek (or a reopen) gets there
        if not self._seek_ok:
            return False
        return seek_key(self._pos, target, self.info.keyframe_indices,
                        self.seek_threshold) is not None

    def _seek(self, target: int) -> None:
        if not self._seek_ok:
            self.close()
            self.open()
            return
        self._stop_frames()
        key = self._keyframe_at_or_before(target)
        seek_to(self._container, self._stream, self.info.frame_pts, key)
        self._frames = self._decode_iter()
        self._pos = key - 1
        self.stats.seeks += 1

    def _take_thread_seek(self, target: int) -> bool:
        """Whether the read-ahead thread made the seek to ``target`` this reader is about
        to make (its next item is that :class:`Seeked`); if so, take it."""
        if not self._thread_seeks or self._frames is None or not self._seek_ok:
            return False
        if target <= self._pos:
            return False  # backward: the thread only seeks forward
        item = next(self._frames, None)
        key = self._keyframe_at_or_before(target)
        if isinstance(item, Seeked) and item.key == key:
            self._pos = key - 1
            self.stats.seeks += 1
            return True
        if isinstance(item, Seeked):
            self.stats.seeks += 1  # a container seek all the same
        return False  # the caller seeks (and drops the thread's walk)

    def _frame_index(self, frame: Any) -> int:
        ts = frame.pts if frame.pts is not None else getattr(frame, "dts", None)
        if ts is not None:
            i = self._index.get(int(ts))
            if i is not None:
                return i
        return self._pos + 1  # no usable timestamp: assume decode order is pts order

    def _convert(self, frame: Any) -> np.ndarray:
        self.stats.frames_converted += 1
        return to_rgb(frame, self.info.rotation)

    def take_derived(self, index: int, key: str) -> np.ndarray | None:
        """What :attr:`derive` made under ``key`` from frame ``index`` in the read-ahead
        thread, once (None: not made, e.g. no thread, or the frame came from a seek)."""
        d = self._derived.get(index)
        if d is None:
            return None
        x = d.pop(key, None)
        if not d:
            self._derived.pop(index, None)
        return x

    def _remember(self, index: int, rgb: np.ndarray) -> None:
        if self.cache_frames <= 0:
            return
        self._cache[index] = rgb
        self._cache.move_to_end(index)
        while len(self._cache) > self.cache_frames:
            self._cache.popitem(last=False)

    def _retain(self, frame: Any) -> None:
        if self.retain_frames <= 0 or frame.pts is None:
            return
        i = self._index.get(int(frame.pts))
        if i is not None:
            self._window[i] = frame
            self._window.move_to_end(i)
            while len(self._window) > self.retain_frames:
                self._window.popitem(last=False)

    def read(self, frame_indices: Sequence[int] | np.ndarray) -> dict[int, np.ndarray]:
        """Decode exactly the requested frames.

        Args:
            frame_indices: indices into ``info.frame_times`` (any order, repeats allowed).
        Returns:
            ``{index: (H, W, 3) uint8 RGB}`` for each distinct index, rotation applied.
        Raises:
            IndexError for an index outside ``[0, F)``; :class:`VideoError` when the
            stream cannot be decoded.
        """
        import av

        wanted_all = np.unique(np.asarray(frame_indices, dtype=np.int64).reshape(-1))
        if wanted_all.size == 0:
            return {}
        n = self.info.num_frames
        if wanted_all[0] < 0 or wanted_all[-1] >= n:
            bad = wanted_all[(wanted_all < 0) | (wanted_all >= n)][0]
            raise IndexError(f"{self.path}: frame index {bad} is outside [0, {n})")
        out: dict[int, np.ndarray] = {}
        for i in wanted_all.tolist():
            if i in self._cache:
                self._cache.move_to_end(i)
                out[i] = self._cache[i]
                self.stats.cache_hits += 1
            elif i in self._window:
                rgb = self._convert(self._window[i])
                self._remember(i, rgb)
                out[i] = rgb
                self.stats.window_hits += 1
        wanted = [i for i in wanted_all.tolist() if i not in out]
        if not wanted:
            return out
        self.open()
        try:
            self._read_forward(wanted, out)
        except av.FFmpegError as e:
            self.close()
            raise VideoError(f"{self.path}: cannot decode ({first_line(e, typed=False)})") from e
        except BaseException:
            self.close()  # stop the read-ahead thread: nothing may be left running
            raise
        return out

    def _read_forward(self, wanted: list[int], out: dict[int, np.ndarray]) -> None:
        """Decode forward (seeking where it pays) until every index in ``wanted`` is in ``out``."""
        j = 0
        check_landing: int | None = None  # target of the last seek, until its first frame
        while j < len(wanted):
            target = wanted[j]
            if self._should_seek(target):
                if not self._take_thread_seek(target):
                    self._seek(target)
                check_landing = target if self._seek_ok else None
            frame = next(self._frames, None) if self._frames is not None else None
            if frame is None:
                break  # end of stream
            self._started = True
            if isinstance(frame, Seeked):
                # the thread seeked where this reader would not (a read outside the
                # plan): hand over every frame from now on, from the keyframe before target
                self.stats.seeks += 1
                self._pass_all = True
                self._seek(target)
                check_landing = target if self._seek_ok else None
                continue
            passed = isinstance(frame, Passed)
            i = frame.index if passed else self._frame_index(frame)
            if check_landing is not None:
                landed_after = i > check_landing
                check_landing = None
                if landed_after:
                    # The demuxer landed after the target (broken index): stop seeking,
                    # reopen and decode from the start instead.
                    self._seek_ok = False
                    self._seek(target)
                    continue
            if passed:
                self._pos = i
                if i >= target:
                    # a read outside the plan: this frame's pixels were dropped. Hand
                    # over every frame from now on; the next turn seeks back to it.
                    self._pass_all = True
                continue
            self._pos = i
            self._last_frame = frame
            self._retain(frame)
            pre = self._preconverted.pop(i, None) if self._preconverted else None
            if i < target:
                if pre is not None:
                    self._remember(i, pre)  # expected later (a clip reaching back): keep it
                continue
            rgb = pre if pre is not None else self._convert(frame)
            self._remember(i, rgb)
            while j < len(wanted) and wanted[j] <= i:
                out[wanted[j]] = rgb
                if wanted[j] != i:
                    self.stats.substituted += 1
                j += 1
        if j < len(wanted):
            if self._last_frame is None:
                raise VideoError(f"{self.path}: frame {wanted[j]} could not be decoded")
            rgb = self._convert(self._last_frame)
            for i in wanted[j:]:
                out[i] = rgb
                self.stats.substituted += 1
