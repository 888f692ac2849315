"""The VGGish log-mel front end and the per-step patches against independent references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hms_deploy.config import AudioFrontEnd
from hms_deploy.data.audio import audio_patches, center_frames, log_mel_spectrogram

SR = 16000
SILENCE = math.log(0.01)
SILENCE32 = np.float32(SILENCE)  # what the float32 patches hold


def reference_log_mel(x: np.ndarray) -> np.ndarray:
    """A deliberately plain VGGish front end: loops, textbook formulas, no shared code."""
    win, hop, nfft, nmel, lo, hi = 400, 160, 512, 64, 125.0, 7500.0
    window = [0.5 - 0.5 * math.cos(2 * math.pi * n / win) for n in range(win)]  # periodic

    def mel(f: float) -> float:
        return 1127.0 * math.log(1.0 + f / 700.0)

    nbins = nfft // 2 + 1
    bin_mel = [mel(k * (SR / 2) / (nbins - 1)) for k in range(nbins)]
    edges = [mel(lo) + i * (mel(hi) - mel(lo)) / (nmel + 1) for i in range(nmel + 2)]
    weights = np.zeros((nbins, nmel))
    for m in range(nmel):
        left, centre, right = edges[m], edges[m + 1], edges[m + 2]
        for k in range(1, nbins):  # bin 0 (DC) gets no weight, as in VGGish
            b = bin_mel[k]
            if left < b <= centre:
                weights[k, m] = (b - left) / (centre - left)
            elif centre < b < right:
                weights[k, m] = (right - b) / (right - centre)
    frames = []
    start = 0
    while start + win <= len(x):
        seg = np.array([x[start + n] * window[n] for n in range(win)])
        spectrum = np.abs(np.fft.rfft(seg, nfft))
        frames.append(np.log(spectrum @ weights + 0.01))
        start += hop
    return np.array(frames).reshape(-1, nmel)


def chirp_and_noise(n: int, sr: int = SR, seed: int = 0) -> np.ndarray:
    t = np.arange(n) / sr
    f0, f1, dur = 150.0, 6000.0, n / sr
    phase = 2 * np.pi * (f0 * t + (f1 - f0) * t * t / (2 * dur))
    rng = np.random.default_rng(seed)
    return 0.4 * np.sin(phase) + 0.05 * rng.standard_normal(n)


def test_matches_independent_reference() -> None:
    x = chirp_and_noise(SR // 2 + 123)
    got = log_mel_spectrogram(x)
    want = reference_log_mel(x)
    assert got.dtype == np.float32
    assert got.shape == want.shape == (1 + (x.size - 400) // 160, 64)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert np.ptp(want) > 5.0  # the signal really spans the bands (not a trivially flat case)


def test_tone_peaks_in_the_nearest_mel_band() -> None:
    t = np.arange(SR) / SR
    logmel = log_mel_spectrogram(0.5 * np.sin(2 * np.pi * 440.0 * t))
    # band centres on the HTK mel scale, from the spec's numbers
    lo, hi = 1127 * math.log(1 + 125 / 700), 1127 * math.log(1 + 7500 / 700)
    centres_hz = [700 * (math.exp((lo + (m + 1) * (hi - lo) / 65) / 1127) - 1) for m in range(64)]
    expected = int(np.argmin([abs(c - 440.0) for c in centres_hz]))
    peaks = logmel.argmax(axis=1)
    assert np.all(np.abs(peaks - expected) <= 1)
    assert np.bincount(peaks).argmax() == expected


@pytest.mark.parametrize("rate", [44100, 48000, 8000 * 3])
def test_resampled_input_matches_native_16k(rate: int) -> None:
    def signal(sr: int) -> np.ndarray:
        t = np.arange(int(1.5 * sr)) / sr
        return 0.3 * np.sin(2 * np.pi * 523.0 * t) + 0.2 * np.sin(2 * np.pi * (300 + 900 * t) * t)

    native = log_mel_spectrogram(signal(SR))
    other = log_mel_spectrogram(signal(rate), sample_rate=rate)
    assert other.shape == native.shape
    inner = slice(3, -3)  # the resampling filter sees the signal's edges in a few frames
    a, b = other[inner], native[inner]
    diff = np.abs(a - b)
    assert np.median(diff) < 0.01
    # bands with energy agree closely; near-empty bands only see the resampler's stopband
    # leakage, small in linear units even where log(mel + 0.01) magnifies it
    strong = b > SILENCE + 3.0
    assert strong.sum() > 100
    assert diff[strong].max() < 5e-3
    assert np.abs(np.exp(a) - np.exp(b)).max() < 2e-3 * np.exp(b).max()


def test_channels_are_averaged_and_torch_input_accepted() -> None:
    x = chirp_and_noise(8000)
    y = chirp_and_noise(8000, seed=1)
    stereo = np.stack([x, y])
    mono = log_mel_spectrogram((x + y) / 2)
    np.testing.assert_allclose(log_mel_spectrogram(stereo), mono, atol=1e-5)
    np.testing.assert_allclose(log_mel_spectrogram(torch.from_numpy(stereo)), mono, atol=1e-5)
    np.testing.assert_allclose(
        log_mel_spectrogram(torch.from_numpy(x).float()), log_mel_spectrogram(x), atol=1e-4
    )


def test_frame_count_and_short_input() -> None:
    assert log_mel_spectrogram(np.zeros(0)).shape == (0, 64)
    assert log_mel_spectrogram(np.zeros(399)).shape == (0, 64)
    assert log_mel_spectrogram(np.zeros(400)).shape == (1, 64)
    assert log_mel_spectrogram(np.zeros(400 + 159)).shape == (1, 64)
    assert log_mel_spectrogram(np.zeros(400 + 160)).shape == (2, 64)
    silent = log_mel_spectrogram(np.zeros(SR))
    np.testing.assert_allclose(silent, SILENCE, atol=1e-6)


def test_bad_rank_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"expected \(samples,\) or \(channels, samples\)"):
        log_mel_spectrogram(np.zeros((1, 2, 400)))
    with pytest.raises(ValueError, match="more channels than samples"):
        log_mel_spectrogram(np.zeros((16000, 2)))  # (samples, channels) by mistake


def test_centre_frame_convention() -> None:
    # c = floor(tau * 16000 / 160 + 0.5): the frame whose first sample is nearest tau
    tau = np.array([0.0, 0.004, 0.005, 0.0149, 1.0, 2.337])
    np.testing.assert_array_equal(center_frames(tau), [0, 0, 1, 1, 100, 234])


def test_patches_cut_the_right_frames_and_pad_with_silence() -> None:
    frames = 300  # 3 s of spectrogram
    logmel = np.arange(frames * 64, dtype=np.float32).reshape(frames, 64) / 1000.0
    centers = np.array([0.0, 1.5, 2.99, 10.0])
    p = audio_patches(logmel, centers, AudioFrontEnd())
    assert p.shape == (4, 1, 96, 64) and p.dtype == np.float32
    # tau = 0: c = 0 -> frames [-48, 48): 48 silent rows then rows 0..47
    np.testing.assert_array_equal(p[0, 0, :48], SILENCE32)
    np.testing.assert_array_equal(p[0, 0, 48:], logmel[:48])
    # tau = 1.5: c = 150 -> rows 102..197, all inside
    np.testing.assert_array_equal(p[1, 0], logmel[102:198])
    # tau = 2.99: c = 299 -> rows 251..299 then 47 silent rows
    np.testing.assert_array_equal(p[2, 0, :49], logmel[251:300])
    np.testing.assert_array_equal(p[2, 0, 49:], SILENCE32)
    # far past the end: all silence
    np.testing.assert_array_equal(p[3], SILENCE32)


def test_patches_of_empty_audio_are_silence() -> None:
    logmel = log_mel_spectrogram(np.zeros(100))
    p = audio_patches(logmel, np.array([0.5, 1.5]))
    assert p.shape == (2, 1, 96, 64)
    np.testing.assert_array_equal(p, SILENCE32)


def test_patches_reject_wrong_width() -> None:
    with pytest.raises(ValueError, match=r"expected \(frames, 64\)"):
        audio_patches(np.zeros((10, 40), np.float32), np.array([0.1]))


def test_sixty_seconds_give_every_frame() -> None:
    x = chirp_and_noise(60 * SR)
    logmel = log_mel_spectrogram(x)
    assert logmel.shape == (5998, 64) and np.isfinite(logmel).all()
    # the vectorised frames equal the plain reference's (checked on a slice: it loops)
    np.testing.assert_allclose(logmel[3000:3010], reference_log_mel(x[3000 * 160:3009 * 160 + 400]),
                               rtol=1e-4, atol=1e-4)


def _blas_threads() -> int:
    from threadpoolctl import threadpool_info

    return min(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")


def test_the_projection_runs_on_one_blas_thread_and_the_pool_is_restored() -> None:
    import threading

    from hms_deploy.data.audio import one_blas_thread

    before = _blas_threads()
    with one_blas_thread():
        with one_blas_thread():  # nested
            assert _blas_threads() == 1
        assert _blas_threads() == 1
    assert _blas_threads() == before
    # from several threads at once: each call limits and restores in turn, and the pool
    # the main thread sees afterwards is the one it had
    x = chirp_and_noise(SR, seed=5)
    want = log_mel_spectrogram(x)
    got: list[np.ndarray] = []
    threads = [threading.Thread(target=lambda: got.extend(log_mel_spectrogram(x) for _ in range(20)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for _ in range(20):
        got.append(log_mel_spectrogram(x))
    for t in threads:
        t.join(60)
    assert len(got) == 80 and all(np.array_equal(g, want) for g in got)
    assert _blas_threads() == before


def test_the_one_thread_projection_equals_the_pools_bit_for_bit() -> None:
    from hms_deploy.data.audio import mel_matrix, periodic_hann

    x = chirp_and_noise(3 * SR + 77, seed=3)
    frames = 1 + (x.size - 400) // 160
    windows = np.lib.stride_tricks.sliding_window_view(x, 400)[::160][:frames] * periodic_hann(400)
    mel = np.abs(np.fft.rfft(windows, n=512, axis=-1)) @ mel_matrix()  # the BLAS pool as it is
    np.testing.assert_array_equal(log_mel_spectrogram(x), np.log(mel + 0.01).astype(np.float32))
