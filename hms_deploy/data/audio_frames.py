"""Decoded audio frames to the mono float32 waveform of the front end (docs/method.md §1).

The waveform is what ``av.AudioResampler(format='flt', layout='mono', rate=rate)`` gives
when every decoded frame is passed to it in order and it is flushed with ``None``.
:class:`MonoAt` gives the same samples for less per-frame work:

- frames that already are one channel of float at the rate are read as they are (the
  resampler would only copy them);
- other frames are passed to the resampler in batches of :attr:`MonoAt.batch` frames
  joined into one frame: the resampler's output is a stream whose samples do not depend
  on how its input is cut into frames, and one call per batch saves a filter-graph call
  per frame. Formats PyAV cannot build a frame from go one frame at a time.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import NDArray

from hms_deploy.errors import VideoError

# samples the resampler may hold back for its filter (more than its half-length at any rate)
_FILTER_DELAY = 64
# the sample formats av.AudioFrame.from_ndarray builds a frame from
_JOINABLE = frozenset({"dbl", "dblp", "flt", "fltp", "s16", "s16p", "s32", "s32p", "u8", "u8p"})


class MonoAt:
    """Mono float32 samples at ``rate`` from a stream's decoded frames, in order.

    :meth:`add` each frame and collect what it returns; :meth:`drain` gives what the frames
    held back for the next batch make now; :meth:`flush` ends the stream; :attr:`given`
    counts the samples returned so far. The first frame
    decides the route; a later frame of another format, layout or rate is a
    :class:`VideoError` naming ``path`` (the resampler refuses such a frame too)."""

    batch = 64

    def __init__(self, rate: int, path: str):
        self.rate, self.path = rate, path
        self.first: tuple[str, str, int] | None = None
        self.resampler: Any = None
        self.joined = False  # batches of frames (else one frame at a time)
        self._held: list[NDArray[Any]] = []
        self._held_samples = 0
        self.given = 0

    def add(self, frame: Any) -> list[NDArray[np.float32]]:
        import av

        kind = (frame.format.name, frame.layout.name, int(frame.sample_rate))
        if self.first is None:
            self.first = kind
            direct = (kind[0] in ("flt", "fltp") and frame.layout.nb_channels == 1
                      and kind[2] == self.rate)
            if not direct:
                self.resampler = av.AudioResampler(format="flt", layout="mono", rate=self.rate)
                self.joined = kind[0] in _JOINABLE
        elif kind != self.first:
            raise VideoError(f"{self.path}: the audio changes format mid-stream ({self.first} -> {kind})")
        if self.resampler is None:
            return self._give([np.frombuffer(frame.planes[0], dtype=np.float32, count=frame.samples).copy()])
        if not self.joined:
            return self._resample(frame)
        self._held.append(frame.to_ndarray())
        self._held_samples += frame.samples
        return self.drain() if len(self._held) >= self.batch else []

    def held_output(self) -> int:
        """About how many samples the held frames will give (at least as many, plus the
        resampler's filter delay in hand)."""
        if self.first is None or not self._held_samples:
            return 0
        return math.ceil(self._held_samples * self.rate / self.first[2]) + _FILTER_DELAY

    def drain(self) -> list[NDArray[np.float32]]:
        """The samples of the held frames (what the resampler gives for them now)."""
        if not self._held or self.first is None:
            return []
        import av

        fmt, layout, in_rate = self.first
        x = np.concatenate(self._held, axis=1) if len(self._held) > 1 else self._held[0]
        self._held, self._held_samples = [], 0
        joined = av.AudioFrame.from_ndarray(x, format=fmt, layout=layout)
        joined.sample_rate = in_rate
        return self._resample(joined)

    def flush(self) -> list[NDArray[np.float32]]:
        """The rest of the stream: the held frames' samples and the resampler's tail."""
        if self.resampler is None:
            return []
        return self.drain() + self._resample(None)

    def _resample(self, frame: Any) -> list[NDArray[np.float32]]:
        # the resampler gives "flt" frames: float32
        return self._give([o.to_ndarray().reshape(-1) for o in self.resampler.resample(frame)])

    def _give(self, chunks: list[NDArray[np.float32]]) -> list[NDArray[np.float32]]:
        self.given += sum(c.size for c in chunks)
        return chunks
