"""The audio a run reads: the decoder stops after the samples the step patches read, and the
patches are computed from their own spectrogram frames only; both equal the whole-track way."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hostile_media import video

from hms_deploy.config import tiny_config
from hms_deploy.data.audio import (
    audio_patches,
    log_mel_spectrogram,
    patch_spans,
    samples_needed,
    step_patches,
)
from hms_deploy.data.inputs import VideoInputs
from hms_deploy.data.sampling import step_centers
from hms_deploy.data.video import decode_audio, probe


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return video(tmp_path_factory.mktemp("audio_needed") / "tone.mp4", duration_s=6.0)


def test_spans_cover_every_patch_frame_inside_the_waveform() -> None:
    fe = tiny_config(4).front_end
    n_samples = 6 * fe.sample_rate
    centers = step_centers(6.0, 5)
    spans = patch_spans(centers, n_samples, fe)
    covered = np.zeros(1 + (n_samples - fe.win_length) // fe.hop_length, bool)
    for a, b in spans:
        covered[a:b] = True
    c = np.floor(centers * fe.sample_rate / fe.hop_length + 0.5).astype(int)
    for x in c:
        idx = np.arange(x - 48, x + 48)
        idx = idx[(idx >= 0) & (idx < covered.size)]
        assert covered[idx].all()
    assert not covered.all()  # 5 patches of 0.96 s leave most of 6 s unread
    assert samples_needed(centers, n_samples, fe) == (spans[-1][1] - 1) * fe.hop_length + 400


@pytest.mark.parametrize("steps", [1, 2, 5, 40])
def test_step_patches_equal_the_whole_spectrograms(steps: int) -> None:
    fe = tiny_config(4).front_end
    rng = np.random.default_rng(steps)
    wave = (0.3 * rng.standard_normal(5 * fe.sample_rate)).astype(np.float32)
    centers = step_centers(5.0, steps)
    whole = audio_patches(log_mel_spectrogram(wave, fe.sample_rate, fe), centers, fe)
    # each spectrogram frame is its own 400 samples' (equal here bit for bit; a BLAS
    # whose rows depend on the matrix height could differ in the last bit)
    np.testing.assert_allclose(step_patches(wave, centers, fe), whole, rtol=0, atol=1e-5)


@pytest.mark.parametrize("steps", [1, 3, 12])
def test_the_decoder_stops_after_the_samples_the_patches_read(clip: Path, steps: int) -> None:
    cfg = tiny_config(4)
    info = probe(clip)
    whole, has_audio = decode_audio(clip, cfg.front_end.sample_rate, info=info)
    vi = VideoInputs(clip, cfg, steps, info=info)
    try:
        need = vi.sampler.audio_samples_needed()
        wave = vi.decode_audio()
        assert vi.has_audio == has_audio and wave.shape == whole.shape
        np.testing.assert_array_equal(wave[:need], whole[:need])  # the same decode
        if steps == 1:
            assert need < whole.size * 0.7 and not wave[int(whole.size * 0.8):].any()
        np.testing.assert_allclose(
            vi.audio_patches(wave),
            audio_patches(log_mel_spectrogram(whole, cfg.front_end.sample_rate, cfg.front_end),
                          vi.sampler.centers, cfg.front_end), rtol=0, atol=1e-5)
    finally:
        vi.close()
