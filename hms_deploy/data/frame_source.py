"""Decode-on-demand of the frames steps need: :class:`FrameSource`, a reader of frames by index.

Frames are identified by their index in presentation (pts) order (see
:func:`~hms_deploy.data.video.probe`) and returned as uint8 RGB ``(H, W, 3)`` with the
container's display rotation applied. The reader decides where to seek, serves frames
from its caches and takes frames from a decode walk; the walk itself, with or without a
read-ahead thread, is built by the plan of its reads
(:class:`~hms_deploy.data.plan_ahead.ReadPlan`, which owns the thread's state) or, without
a plan, by :func:`~hms_deploy.data.frame_walk.walk_frames` (non-reference frames no read
can want are skipped there) and :class:`~hms_deploy.data.decode_thread.ReadAhead`.

Given a path or a :class:`~hms_deploy.data.video.ProbedVideo`, the reader reads from the
probe's container (seeking back to the first frame), so probing and reading a video open
its file once; it opens the file again only when a seek cannot be trusted (a demuxer
that lands after the target, or the rewind to the first frame landing late).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from typing_extensions import Self

from hms_deploy.data.decode_thread import ReadAhead
from hms_deploy.data.frame_walk import (
    DecodeStats,
    keyframe_at_or_before,
    seek_key,
    seek_to,
    walk_frames,
)
from hms_deploy.data.plan_ahead import Crop, Passed, ReadPlan, Seeked, to_rgb
from hms_deploy.data.video import ProbedVideo, VideoInfo, open_media, probe_open
from hms_deploy.errors import VideoError, first_line


@dataclass(frozen=True)
class ReaderOptions:
    """A :class:`FrameSource`'s options: its keyword arguments (defaults and meaning: its
    docstring)."""

    seek_threshold: int
    cache_frames: int
    threads: int
    retain_frames: int
    read_ahead: int
    read_ahead_bytes: int


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

    Options (only ``cache_frames`` is on by default, 64 frames; 0 turns it off):

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
      With ``read_ahead`` too, the thread converts the frames reads surely ask for to RGB
      (``sure``, default: the expected ones), and with
      ``read_ahead_bytes`` it hands over only the frames a read can use (the expected
      ones, the substitute of an expected frame the stream lacks, the stream's last
      frame); of every other frame only its index (:class:`Passed`), so it may run
      ahead as far as ``read_ahead_bytes`` of those frames (decoded + RGB) allow, many
      steps of a sparse plan. A read of a frame outside the plan still gets that
      frame: the reader then re-walks from the keyframe before it, handing over every
      frame from there on. ``crops`` (:class:`~hms_deploy.data.plan_ahead.Crop`): the
      resized crops the planned read-ahead also makes of the sure frames it converts
      (:class:`~hms_deploy.data.inputs.VideoInputs` asks for its steps' inputs), taken
      once by the reader with :meth:`take_crop`.

    ``path``: a file (probed here), a :class:`~hms_deploy.data.video.VideoInfo` (the file
    is opened on first use) or a :class:`~hms_deploy.data.video.ProbedVideo` (its open
    container is read). Use as a context manager (closed on exit)::

        with FrameSource(path) as src:
            frames = src.read([0, 15, 30])   # {index: (H, W, 3) uint8 RGB}
    """

    def __init__(
        self,
        path: str | Path | VideoInfo | ProbedVideo,
        *,
        seek_threshold: int = 16,
        cache_frames: int = 64,
        threads: int = 0,
        retain_frames: int = 0,
        read_ahead: int = 0,
        read_ahead_bytes: int = 0,
    ) -> None:
        if not isinstance(path, (VideoInfo, ProbedVideo)):
            path = probe_open(path)
        self.info = path if isinstance(path, VideoInfo) else path.info
        # the probe's open container, read after a seek back to the first frame
        self._probed = path if isinstance(path, ProbedVideo) else None
        self.options = ReaderOptions(
            seek_threshold=int(seek_threshold), cache_frames=int(cache_frames),
            threads=int(threads), retain_frames=int(retain_frames), read_ahead=int(read_ahead),
            read_ahead_bytes=int(read_ahead_bytes))
        self.stats = DecodeStats()
        self._index = {int(p): i for i, p in enumerate(self.info.frame_pts.tolist())}
        self._plan: ReadPlan | None = None  # expect(): the frames reads may ask for
        self._container: Any = None
        self._stream: Any = None
        self._frames: Iterator[Any] | None = None  # the decode walk (maybe a thread's)
        self._thread_seeks = False  # the current walk seeks where the reader would
        self._pass_all = False  # a read left the plan: the walk hands over every frame
        self._pos = -1  # index of the last frame the reader took from the decoder
        self._started = False  # a frame has been decoded (expect() is too late)
        self._seek_ok = True  # seeks land where asked (else: reopen, decode from the start)
        self._rewound = False  # the probe's container was seeked back: check where it landed
        self._last_frame: Any = None
        self._cache: OrderedDict[int, NDArray[np.uint8]] = OrderedDict()
        self._window: OrderedDict[int, Any] = OrderedDict()

    @property
    def path(self) -> str:
        return self.info.path

    # -- resources -------------------------------------------------------------------
    def open(self) -> Self:
        if self._container is None:
            probed, self._probed = self._probed, None
            adopted = probed.take() if probed is not None else None
            if adopted is not None and self.options.threads:
                adopted.close()  # its decoder is open: the thread count can no longer change
                adopted = None
            self._container = adopted if adopted is not None else open_media(self.path)
            if not self._container.streams.video:
                self.close()
                raise VideoError(f"{self.path}: no video stream")
            self._stream = self._container.streams.video[0]
            if self.options.threads:
                self._stream.codec_context.thread_count = self.options.threads
            if adopted is not None:
                seek_to(self._container, self._stream, self.info.frame_pts, 0)
                self._rewound = True
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
        if self._plan is not None:
            self._plan.clear()  # the thread is gone: nothing writes there any more

    def close(self) -> None:
        try:
            self._stop_frames()
        finally:
            if self._container is not None:
                self._container.close()
            if self._probed is not None:
                self._probed.close()
                self._probed = None
            self._container = self._stream = None
            self._pos = -1
            self._rewound = False
            self._window = OrderedDict()

    def __enter__(self) -> Self:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def expected(self) -> frozenset[int] | None:
        """The frames declared by :meth:`expect` (None: any frame)."""
        return None if self._plan is None else self._plan.expected

    def expect(self, frame_indices: Sequence[int] | NDArray[np.integer[Any]] | None, *,
               sure: Sequence[int] | NDArray[np.integer[Any]] | None = None,
               crops: Iterable[Crop] = ()) -> None:
        """Declare every frame that reads of this source may ask for (None: any frame).

        The forward walk then skips the non-reference frames outside this set (they are
        never converted, and no other frame needs them). Call before the first read; a
        later read of a frame outside the set is still served, but may get a
        substitute (the next decoded frame) if that frame was skipped. ``sure``: the
        frames among them that reads *will* ask for (default: all); only these are
        converted (and cropped by ``crops``) ahead by the read-ahead thread, so frames
        that a learned gate may never want cost no conversion. Declaring the same frames
        again is a no-op.
        """
        new = (None if frame_indices is None else
               frozenset(np.asarray(frame_indices, dtype=np.int64).reshape(-1).tolist()))
        sure_set = (new if sure is None or new is None else
                    frozenset(np.asarray(sure, dtype=np.int64).reshape(-1).tolist()) & new)
        plan = self._plan
        if new is not None and plan is not None and (new, sure_set) == (plan.expected, plan.sure):
            return  # the same plan again (e.g. declared before decoding started, and after)
        if self._started:
            raise RuntimeError(f"{self.path}: expect() must come before the first read")
        self._plan = None if new is None or sure_set is None else ReadPlan(
            self.info, self._index, new, sure_set, crops,
            seek_threshold=self.options.seek_threshold, stats=self.stats,
        )
        if self._container is not None:
            self._stop_frames()
            self._frames = self._decode_iter()

    # -- decoding ----------------------------------------------------------------------
    def _decode_iter(self) -> Iterator[Any]:
        """The decode walk from the container's position (see the module docstring)."""
        if self._plan is not None:
            frames, self._thread_seeks = self._plan.walk(
                self._container, self._stream, read_ahead=self.options.read_ahead,
                read_ahead_bytes=self.options.read_ahead_bytes, seek_ok=self._seek_ok,
                pass_all=self._pass_all,
            )
            return frames
        self._thread_seeks = False
        frames = walk_frames(self._container, self._stream, self.stats, index=self._index)
        if self.options.read_ahead > 0:
            return ReadAhead(frames, self.options.read_ahead,
                             name=f"hms-decode:{Path(self.path).name}")
        return frames

    def _keyframe_at_or_before(self, index: int) -> int:
        return keyframe_at_or_before(self.info.keyframe_indices, index)

    def _should_seek(self, target: int) -> bool:
        if target <= self._pos:
            return True  # backward: only a seek (or a reopen) gets there
        if not self._seek_ok:
            return False
        return seek_key(self._pos, target, self.info.keyframe_indices,
                        self.options.seek_threshold) is not None

    def _seek(self, target: int) -> None:
        if not self._seek_ok:
            self.close()
            self.open()
            return
        self._stop_frames()
        self._rewound = False  # a seek decides where the walk is now
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
            self._rewound = False
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

    def _convert(self, frame: Any) -> NDArray[np.uint8]:
        self.stats.frames_converted += 1
        return to_rgb(frame, self.info.rotation)

    def take_crop(self, index: int, key: str) -> NDArray[np.uint8] | None:
        """The crop ``key`` (a :class:`~hms_deploy.data.plan_ahead.Crop` of the plan) the
        read-ahead thread made of frame ``index``, once (None: not made, e.g. no thread,
        or the frame came from a seek)."""
        return None if self._plan is None else self._plan.take_crop(index, key)

    def _remember(self, index: int, rgb: NDArray[np.uint8]) -> None:
        if self.options.cache_frames <= 0:
            return
        self._cache[index] = rgb
        self._cache.move_to_end(index)
        while len(self._cache) > self.options.cache_frames:
            self._cache.popitem(last=False)

    def _retain(self, frame: Any) -> None:
        if self.options.retain_frames <= 0 or frame.pts is None:
            return
        i = self._index.get(int(frame.pts))
        if i is not None:
            self._window[i] = frame
            self._window.move_to_end(i)
            while len(self._window) > self.options.retain_frames:
                self._window.popitem(last=False)

    def read(self, frame_indices: Sequence[int] | NDArray[np.integer[Any]]
             ) -> dict[int, NDArray[np.uint8]]:
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
        out: dict[int, NDArray[np.uint8]] = {}
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

    def _read_forward(self, wanted: list[int], out: dict[int, NDArray[np.uint8]]) -> None:
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
            if self._rewound:
                self._rewound = False
                if i > 0:
                    # the seek back to the first frame landed late: read a fresh container
                    self.close()
                    self.open()
                    continue
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
            pre = self._plan.take_rgb(i) if self._plan is not None else None
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
