"""The VGGish log-mel front end and the per-step 96 x 64 audio patches (docs/method.md §1).

Geometry (defaults of :class:`~hms_deploy.config.AudioFrontEnd`): 16 kHz mono; frame ``i``
covers samples ``[i * 160, i * 160 + 400)`` (25 ms, 10 ms hop, no centring), so a
waveform of ``n`` samples has ``1 + (n - 400) // 160`` frames (0 if ``n < 400``). Each
frame is multiplied by a 400-sample *periodic* Hann window, zero-padded at the end to
512 points, and its magnitude rFFT (257 bins) is mapped to 64 HTK-mel bands between
125 and 7500 Hz by triangular filters that are not area-normalised, exactly as VGGish's
``mel_features.spectrogram_to_mel_matrix`` (the DC bin has weight 0). The result is
``log(mel + 0.01)``.

Patch convention: the centre frame of step time ``tau`` (seconds) is
``c = floor(tau * sample_rate / hop_length + 0.5)`` computed in float64, i.e. the frame
whose *first sample* is nearest to ``tau`` (ties to the later frame). The patch is frames
``[c - 48, c + 48)``; it spans samples ``[tau - 0.48 s, tau + 0.495 s]`` (+-5 ms). Frames
before 0 or past the last frame are ``log(0.01)``, the value a frame of digital silence has.

:func:`step_patches` computes only the spectrogram frames the patches contain (each
frame depends on its own 400 samples only), and :func:`samples_needed` says how much of
the waveform they read, so that the audio decoder can stop there.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import numpy as np
from numpy.typing import NDArray

from hms_deploy.config import AudioFrontEnd

_DEFAULT_FRONT_END = AudioFrontEnd()


def hertz_to_mel(hz: NDArray[np.float64] | float) -> NDArray[np.float64]:
    """HTK mel scale: ``1127 * ln(1 + hz / 700)``; same shape as ``hz``."""
    mel: NDArray[np.float64] = 1127.0 * np.log1p(np.asarray(hz, dtype=np.float64) / 700.0)
    return mel


def periodic_hann(length: int) -> NDArray[np.float64]:
    """Periodic Hann window ``0.5 - 0.5 cos(2 pi n / length)``, n = 0..length-1; (length,) float64."""
    n = np.arange(length, dtype=np.float64)
    window: NDArray[np.float64] = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / length)
    return window


@lru_cache(maxsize=8)
def _mel_matrix_cached(
    n_mels: int, n_bins: int, sample_rate: int, fmin: float, fmax: float
) -> NDArray[np.float64]:
    bins_mel = hertz_to_mel(np.linspace(0.0, sample_rate / 2.0, n_bins))[:, None]
    edges = np.linspace(hertz_to_mel(fmin), hertz_to_mel(fmax), n_mels + 2)
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
    lower_slope = (bins_mel - lower) / (center - lower)
    upper_slope = (upper - bins_mel) / (upper - center)
    weights: NDArray[np.float64] = np.maximum(0.0, np.minimum(lower_slope, upper_slope))
    weights[0, :] = 0.0  # VGGish drops the DC bin
    weights.setflags(write=False)
    return weights


_BLAS_LOCK = threading.RLock()


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """A context in which NumPy's BLAS runs on the calling thread only.

    The mel projection is a small matrix product that OpenBLAS would split over its
    thread pool, whose threads then spin on a core for a while after it returns: CPU time
    taken from the decode thread and the engines, per video. threadpoolctl's limiter sets
    the limit on entry and restores the pool on exit; the lock makes the same thread do
    both, one thread at a time (OpenBLAS does not take a limit set by another thread, and
    called from a thread other than the main one it may ignore the limit, which then
    changes nothing). The result is the same bit for bit (each output element is summed
    in the same order whichever thread computes it)."""
    with _BLAS_LOCK, _blas_controller().limit(limits=1, user_api="blas"):
        yield


@lru_cache(maxsize=1)
def _blas_controller() -> Any:
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()  # finds the loaded BLAS libraries once per process


def mel_matrix(front_end: AudioFrontEnd | None = None) -> NDArray[np.float64]:
    """The (n_fft // 2 + 1, n_mels) = (257, 64) HTK triangular filter bank, float64, read-only."""
    fe = front_end or _DEFAULT_FRONT_END
    return _mel_matrix_cached(fe.n_mels, fe.n_fft // 2 + 1, fe.sample_rate, fe.fmin, fe.fmax)


def to_mono(waveform: Any) -> NDArray[np.float64]:
    """A 1-D ``(samples,)`` or 2-D ``(channels, samples)`` numpy/torch array -> float64 mono.

    Channels are averaged. Raises ``ValueError`` for any other rank, and for a 2-D array
    with more rows than columns (which looks like ``(samples, channels)``).
    """
    if hasattr(waveform, "detach"):  # torch.Tensor, without importing torch here
        waveform = waveform.detach().cpu().numpy()
    x = np.asarray(waveform, dtype=np.float64)
    if x.ndim == 2:
        if x.shape[0] > x.shape[1]:
            raise ValueError(
                f"waveform has shape {x.shape}: more channels than samples, "
                "expected (channels, samples)"
            )
        x = x.mean(axis=0)
    elif x.ndim != 1:
        raise ValueError(
            f"waveform has shape {x.shape}, expected (samples,) or (channels, samples)"
        )
    return x


def resample(waveform: NDArray[np.float64], orig_rate: int, new_rate: int) -> NDArray[np.float64]:
    """Band-limited resampling of a 1-D waveform: ``torchaudio.functional.resample``.

    torchaudio's default windowed-sinc interpolation (Hann window, lowpass_filter_width 6,
    rolloff 0.99), computed in float64. Output has ``ceil(len * new_rate / orig_rate)``
    samples.
    """
    if orig_rate <= 0 or new_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_rate} -> {new_rate}")
    if orig_rate == new_rate or waveform.size == 0:
        if waveform.size == 0:
            return np.zeros(0, dtype=np.float64)
        return waveform
    import torch
    import torchaudio.functional as taf

    t = torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float64))
    out: NDArray[np.float64] = taf.resample(t, int(orig_rate), int(new_rate)).numpy()
    return out


def num_frames(num_samples: int, front_end: AudioFrontEnd | None = None) -> int:
    """Number of spectrogram frames for ``num_samples`` samples: ``1 + (n - win) // hop`` or 0."""
    fe = front_end or _DEFAULT_FRONT_END
    if num_samples < fe.win_length:
        return 0
    return 1 + (num_samples - fe.win_length) // fe.hop_length


def log_mel_spectrogram(
    waveform: Any, sample_rate: int = 16000, front_end: AudioFrontEnd | None = None
) -> NDArray[np.float32]:
    """VGGish log-mel spectrogram of a waveform.

    Args:
        waveform: ``(samples,)`` or ``(channels, samples)`` numpy array or torch tensor,
            amplitude in [-1, 1]; channels are averaged to mono.
        sample_rate: rate of ``waveform`` in Hz; resampled (see :func:`resample`) to
            ``front_end.sample_rate`` if different.
        front_end: the geometry; defaults to :class:`AudioFrontEnd()` (VGGish).

    Returns:
        ``(frames, n_mels)`` float32, ``log(mel + log_offset)``; ``frames`` is
        ``1 + (n - win_length) // hop_length`` for ``n`` samples at the front end's rate,
        0 when ``n < win_length``.
    """
    fe = front_end or _DEFAULT_FRONT_END
    x = resample(to_mono(waveform), sample_rate, fe.sample_rate)
    frames = num_frames(x.size, fe)
    if frames == 0:
        return np.zeros((0, fe.n_mels), dtype=np.float32)
    windows = np.lib.stride_tricks.sliding_window_view(x, fe.win_length)[:: fe.hop_length]
    windows = windows[:frames] * periodic_hann(fe.win_length)
    magnitude = np.abs(np.fft.rfft(windows, n=fe.n_fft, axis=-1))
    with one_blas_thread():
        mel = magnitude @ mel_matrix(fe)
    logmel: NDArray[np.float32] = np.log(mel + fe.log_offset).astype(np.float32)
    return logmel


def center_frames(centers_s: NDArray[np.float64], front_end: AudioFrontEnd | None = None) -> NDArray[np.int64]:
    """Centre frame of each step time: ``floor(tau * sample_rate / hop_length + 0.5)``; (T,) int64."""
    fe = front_end or _DEFAULT_FRONT_END
    tau = np.asarray(centers_s, dtype=np.float64).reshape(-1)
    frames: NDArray[np.int64] = np.floor(tau * fe.sample_rate / fe.hop_length + 0.5).astype(np.int64)
    return frames


def audio_patches(
    logmel: NDArray[np.float32], centers_s: NDArray[np.float64], front_end: AudioFrontEnd | None = None
) -> NDArray[np.float32]:
    """Cut the 96-frame patch around each step centre (see the module docstring).

    Args:
        logmel: ``(frames, n_mels)`` from :func:`log_mel_spectrogram` (frames may be 0).
        centers_s: ``(T,)`` step centre times in seconds, relative to sample 0.
        front_end: the geometry; defaults to VGGish.

    Returns:
        ``(T, 1, patch_frames, n_mels)`` float32; frames outside ``[0, frames)`` are
        ``log(log_offset)``.
    """
    fe = front_end or _DEFAULT_FRONT_END
    logmel = np.asarray(logmel, dtype=np.float32)
    if logmel.ndim != 2 or logmel.shape[1] != fe.n_mels:
        raise ValueError(f"logmel has shape {logmel.shape}, expected (frames, {fe.n_mels})")
    c = center_frames(centers_s, fe)
    half = fe.patch_frames // 2
    idx = c[:, None] + np.arange(-half, fe.patch_frames - half)[None, :]  # (T, 96)
    silence = np.float32(np.log(fe.log_offset))
    n = logmel.shape[0]
    if n == 0:
        return np.full((c.size, 1, fe.patch_frames, fe.n_mels), silence, dtype=np.float32)
    valid = (idx >= 0) & (idx < n)
    patches = logmel[np.clip(idx, 0, n - 1)]  # (T, 96, 64)
    patches[~valid] = silence
    out: NDArray[np.float32] = patches[:, None]
    return out


def patch_spans(centers_s: NDArray[np.float64], num_samples: int,
                front_end: AudioFrontEnd | None = None) -> list[tuple[int, int]]:
    """The spectrogram frames ``[a, b)`` the patches of ``centers_s`` contain, inside the
    ``num_frames(num_samples)`` frames of the waveform, merged where they overlap or touch."""
    fe = front_end or _DEFAULT_FRONT_END
    n = num_frames(num_samples, fe)
    half = fe.patch_frames // 2
    spans: list[tuple[int, int]] = []
    for c in np.sort(center_frames(centers_s, fe)).tolist():
        a, b = max(0, c - half), min(n, c - half + fe.patch_frames)
        if a >= b:
            continue
        if spans and a <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(spans[-1][1], b))
        else:
            spans.append((a, b))
    return spans


def samples_needed(centers_s: NDArray[np.float64], num_samples: int,
                   front_end: AudioFrontEnd | None = None) -> int:
    """How many samples from the start of a ``num_samples`` waveform the patches of
    ``centers_s`` read (0: none; their frames all lie outside the waveform)."""
    fe = front_end or _DEFAULT_FRONT_END
    spans = patch_spans(centers_s, num_samples, fe)
    return (spans[-1][1] - 1) * fe.hop_length + fe.win_length if spans else 0


def step_patches(waveform: NDArray[np.float64], centers_s: NDArray[np.float64],
                 front_end: AudioFrontEnd | None = None) -> NDArray[np.float32]:
    """:func:`audio_patches` of :func:`log_mel_spectrogram` of a 1-D waveform at the front
    end's rate, computing only the frames the patches contain (:func:`patch_spans`); each
    of those frames equals the whole spectrogram's."""
    fe = front_end or _DEFAULT_FRONT_END
    x = to_mono(waveform)
    logmel = np.zeros((num_frames(x.size, fe), fe.n_mels), dtype=np.float32)
    for a, b in patch_spans(centers_s, x.size, fe):
        logmel[a:b] = log_mel_spectrogram(
            x[a * fe.hop_length:(b - 1) * fe.hop_length + fe.win_length], fe.sample_rate, fe)
    return audio_patches(logmel, centers_s, fe)
