"""The per-step part inputs of one video (docs/method.md §1): the one per-video input type.

:class:`VideoInputs` hands out, step by step, what the parts take: the log-mel patches
of every step (``audio_patches``), the appearance frame of step t (``appearance``) and the
32-frame motion clip of step t (``motion``), decoded on demand through a
:class:`~hms_deploy.data.frame_source.FrameSource` (the runtime gives it one that retains a
window of decoded frames, :mod:`hms_deploy.runtime.frames`). The frames are read from the
probe's container (:class:`~hms_deploy.data.video.ProbedVideo`) and the audio from a
second one: a video's file is opened twice. It counts what it hands to each backbone.

:meth:`VideoInputs.decode_all` decodes every step at once instead (feature extraction,
fine-tuning and the export's parity check): it keeps ``mel``, ``frames`` and the
distinct motion frames (``clips`` rebuilds any step's clip from them, 32x less memory
than the clips), closes the decoder, and the object can then be pickled (a decoding
worker sends it to the main process).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from hms_deploy.config import HMSConfig
from hms_deploy.data.frame_source import FrameSource
from hms_deploy.data.plan_ahead import Crop
from hms_deploy.data.resize import resize_center_crop_batch
from hms_deploy.data.sampling import StepSampler
from hms_deploy.data.video import ProbedVideo, VideoInfo, decode_audio, probe_open

# builds the reader of a video's frames from its probe (open container) or its info
FrameSourceFactory = Callable[[VideoInfo | ProbedVideo], FrameSource]


class VideoInputs:
    """The per-step part inputs of one video, on demand (see the module docstring).

    ``steps`` = T. Counters: ``appearance_frames`` / ``motion_clips`` = inputs handed to
    the appearance / motion backbone; the decoder's own counters are in :attr:`decode_stats`.
    """

    def __init__(self, path: str | Path, config: HMSConfig, steps: int, *,
                 info: VideoInfo | ProbedVideo | None = None,
                 frame_source: FrameSourceFactory = FrameSource, skip_nonref: bool = True):
        """``info``: the video's probe (with its open container, which the frame reader
        then reads: :func:`~hms_deploy.data.video.probe_open`) or its info; probed here
        when None."""
        self.path = str(path)
        self.skip_nonref = skip_nonref  # may plan() let the decoder skip unwanted frames
        probed = probe_open(path) if info is None else info
        self.info = probed if isinstance(probed, VideoInfo) else probed.info
        self.config = config
        self.sampler = StepSampler.from_config(self.info, config, steps=steps)
        self.source: FrameSource | None = frame_source(probed)
        self.appearance_frames = 0
        self.motion_clips = 0
        self.has_audio: bool | None = None
        # resized motion frames: neighbouring clips overlap, so each frame is resized once
        self._motion_frames: OrderedDict[int, NDArray[np.uint8]] = OrderedDict()
        self._motion_keep = 2 * config.clip.frames
        # filled by decode_all(): every step's inputs
        self.mel: NDArray[np.float32] | None = None  # (T, 1, 96, 64) float32
        self.frames: NDArray[np.uint8] | None = None  # (T, 3, S_I, S_I) uint8
        self.motion_frames: NDArray[np.uint8] | None = None  # (U, 3, S_M, S_M) uint8, distinct
        self.motion_index: NDArray[np.int64] | None = None  # (T, 32) int64 into motion_frames
        self._stats: dict[str, int] = {}

    @property
    def steps(self) -> int:
        return self.sampler.steps

    @property
    def duration_s(self) -> float:
        return float(self.info.duration_s)

    def plan(self, appearance: NDArray[Any], motion: NDArray[Any]) -> None:
        """Declare, before the first step, which steps may run each backbone (``(T,)``:
        1 the step runs it, another nonzero value (a learned gate's step) it may, 0 it
        does not). With ``skip_nonref`` the decoder then skips the non-reference frames
        that none of those steps' inputs contain, and its read-ahead thread converts,
        resizes and crops ahead the frames of the steps that run a backbone; the frames
        used do not change. Declaring the same plan again is a no-op."""
        if not self.skip_nonref or self.source is None:
            return
        s = self.sampler
        app, mot = np.asarray(appearance).reshape(-1), np.asarray(motion).reshape(-1)
        a, m = app != 0, mot != 0
        frames = np.concatenate([s.appearance_indices[a], s.motion_indices[m].reshape(-1)])
        # the read-ahead thread (if any) also resizes and crops what the steps will want,
        # with the same function, so the step loop only stacks them
        a_frames = frozenset(s.appearance_indices[app == 1].tolist())
        m_frames = frozenset(s.motion_indices[mot == 1].reshape(-1).tolist())
        crops = (Crop("appearance", a_frames, s.appearance_resize, s.appearance_crop),
                 Crop("motion", m_frames, s.motion_resize, s.motion_crop))
        self.source.expect(frames, sure=sorted(a_frames | m_frames), crops=crops)

    def start_decoding(self) -> None:
        """Start decoding now (after :meth:`plan`, when the planned read-ahead is on and
        the plan has frames to decode), so that the thread works while the audio path runs."""
        src = self.source
        if src is None or src.options.read_ahead <= 0 or src.options.read_ahead_bytes <= 0 or not src.expected:
            return
        src.start()

    def _resized(self, frames: dict[int, NDArray[np.uint8]], which: str) -> dict[int, NDArray[np.uint8]]:
        """``frames`` (index -> RGB, from a read) resized and cropped for ``which``
        (appearance / motion): what the read-ahead thread made, the rest resized here."""
        src, s = self._source(), self.sampler
        out: dict[int, NDArray[np.uint8]] = {}
        rest = []
        for i in sorted(frames):
            x = src.take_crop(i, which)
            if x is None:
                rest.append(i)
            else:
                out[i] = x
        if rest:
            size = ((s.appearance_resize, s.appearance_crop) if which == "appearance"
                    else (s.motion_resize, s.motion_crop))
            for i, x in zip(rest, resize_center_crop_batch([frames[i] for i in rest], *size)):
                out[i] = x
        return out

    def decode_audio(self, *, keep_partial: bool = False) -> NDArray[np.float32]:
        """The aligned mono waveform at the front end's rate (sets :attr:`has_audio`),
        decoded as far as the steps' patches read (zero after that);
        ``keep_partial``: audio that stops decoding early is kept up to there."""
        wave, self.has_audio = decode_audio(
            self.path, self.config.front_end.sample_rate, info=self.info,
            keep_partial=keep_partial, needed=self.sampler.audio_samples_needed(),
        )
        return wave

    def audio_patches(self, wave: NDArray[np.float32]) -> NDArray[np.float32]:
        """``(T, 1, 96, 64)`` float32 log-mel patches of every step (the front end)."""
        return self.sampler.audio_patches(wave)

    def _source(self) -> FrameSource:
        if self.source is None:
            raise RuntimeError(f"{self.path}: inputs already decoded and the decoder closed")
        return self.source

    def appearance(self, t: int) -> NDArray[np.uint8]:
        """``(3, S, S)`` uint8: the frame nearest tau_t, resized and centre-cropped."""
        x: NDArray[np.uint8] = self.appearance_steps([t])[0]
        return x

    def appearance_steps(self, steps: list[int]) -> NDArray[np.uint8]:
        """``(len(steps), 3, S, S)`` uint8: :meth:`appearance` of several steps (in time
        order), their frames read in one forward pass."""
        if self.frames is not None:
            x = self.frames[np.asarray(steps, dtype=np.int64)]
        else:
            idx = self.sampler.appearance_indices[np.asarray(steps, dtype=np.int64)]
            resized = self._resized(self._source().read(idx), "appearance")
            x = np.stack([resized[i] for i in idx.tolist()])
        self.appearance_frames += len(steps)
        return x

    def motion(self, t: int) -> NDArray[np.uint8]:
        """``(3, 32, S, S)`` uint8: the motion clip of step t, resized and centre-cropped."""
        if self.motion_frames is not None:
            self.motion_clips += 1
            one: NDArray[np.uint8] = self.clips(np.array([t]))[0]
            return one
        idx = self.sampler.motion_frame_indices(t)
        cache = self._motion_frames
        need = [i for i in np.unique(idx).tolist() if i not in cache]
        if need:
            cache.update(self._resized(self._source().read(need), "motion"))
        for i in idx.tolist():
            cache.move_to_end(i)
        clip: NDArray[np.uint8] = np.stack([cache[i] for i in idx.tolist()], axis=1)  # (3, 32, S, S)
        while len(cache) > self._motion_keep:
            cache.popitem(last=False)
        self.motion_clips += 1
        return clip

    def decode_all(self) -> VideoInputs:
        """Decode every step's inputs now (one pass over the video) and close the decoder;
        returns ``self``. Raises :class:`~hms_deploy.errors.VideoError` for a file that
        cannot be decoded."""
        src = self._source()
        try:
            self.mel = self.audio_patches(self.decode_audio())
            self.frames = self.sampler.appearance_inputs(src)
            idx = self.sampler.motion_indices
            decoded = src.read(idx)
            uniq = sorted(decoded)
            self.motion_frames = resize_center_crop_batch(
                [decoded[i] for i in uniq], self.sampler.motion_resize, self.sampler.motion_crop
            )
            self.motion_index = np.searchsorted(uniq, idx)
        finally:
            self.close()
        return self

    def clips(self, steps: slice | NDArray[np.integer[Any]]) -> NDArray[np.uint8]:
        """Motion clips of ``steps`` after :meth:`decode_all`: (S, 3, 32, S_M, S_M) uint8,
        as ``StepSampler.motion_inputs``."""
        if self.motion_frames is None or self.motion_index is None:
            raise RuntimeError(f"{self.path}: clips() needs decode_all() first")
        c = self.motion_frames[self.motion_index[steps]]  # (S, 32, 3, H, W)
        out: NDArray[np.uint8] = np.ascontiguousarray(c.transpose(0, 2, 1, 3, 4))
        return out

    @property
    def decode_stats(self) -> dict[str, int]:
        """The decoder's counters: frames decoded / converted to RGB (in the step loop or
        ahead of it), seeks, window hits, frames walked and skipped undecoded."""
        if self.source is None:
            return dict(self._stats)
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
        """Close the decoder (its counters stay readable); the decoded arrays are kept."""
        if self.source is not None:
            self._stats = self.decode_stats
            self.source.close()
            self.source = None
