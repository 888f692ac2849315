"""The waveform decode_audio gives is the one of docs/method.md §1, the resampler fed every
decoded frame in order and flushed, for the routes MonoAt takes: frames read as they are
(float mono at the rate), batches joined into one frame (other formats), and the early stop
at the samples the patches read. The oracle is written here with PyAV alone."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from hms_deploy.data.audio_frames import MonoAt
from hms_deploy.data.video import decode_audio, probe
from hms_deploy.errors import VideoError

RATE = 16000


def _write(path: Path, rate: int, layout: str, codec: str, *, audio_start_s: float = 0.0,
           duration_s: float = 3.0) -> Path:
    """A 25 fps video with a tone plus noise, the audio starting ``audio_start_s`` late."""
    fmt = {"aac": "fltp", "pcm_s16le": "s16"}[codec]
    channels = av.AudioLayout(layout).nb_channels
    rng = np.random.default_rng(rate + channels)
    t = np.arange(round(duration_s * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)
    with av.open(str(path), "w") as c:
        vs = c.add_stream("mpeg4", rate=25)
        vs.width, vs.height, vs.pix_fmt = 64, 48, "yuv420p"
        a = c.add_stream(codec, rate=rate)
        a.layout = layout
        for i in range(round(duration_s * 25)):
            f = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 9 * i % 255, np.uint8), format="rgb24")
            f.pts = i
            c.mux(vs.encode(f))
        for k in range(round(audio_start_s * rate), t.size, 1024):
            x = np.tile(wave[k:k + 1024], (channels, 1))
            x = (x * 32767).astype(np.int16).T.reshape(1, -1) if fmt == "s16" else x.astype(np.float32)
            af = av.AudioFrame.from_ndarray(x, format=fmt, layout=layout)
            af.sample_rate, af.pts, af.time_base = rate, k, Fraction(1, rate)
            c.mux(a.encode(af))
        c.mux(vs.encode(None))
        c.mux(a.encode(None))
    return path


def _oracle(path: Path) -> np.ndarray:
    """Every decoded frame through one resampler, flushed, aligned to the first video frame
    by the first audio frame's time, cut or zero-padded to the video's duration."""
    info = probe(path)
    r = av.AudioResampler(format="flt", layout="mono", rate=RATE)
    out, first = [], None
    with av.open(str(path)) as c:
        for f in c.decode(c.streams.audio[0]):
            first = float(f.pts * f.time_base) if first is None else first
            out += [o.to_ndarray().reshape(-1) for o in r.resample(f)]
        out += [o.to_ndarray().reshape(-1) for o in r.resample(None)]
    assert first is not None
    wave = np.concatenate(out)
    shift = round((first - info.start_s) * RATE)
    wave = np.concatenate([np.zeros(shift, np.float32), wave]) if shift >= 0 else wave[-shift:]
    n = round(info.duration_s * RATE)
    return np.concatenate([wave, np.zeros(max(0, n - wave.size), np.float32)])[:n]


MEDIA = {  # name: (rate, layout, codec, audio start, the route MonoAt takes)
    "aac 16k mono": (16000, "mono", "aac", 0.0, "as is"),
    "aac 48k stereo": (48000, "stereo", "aac", 0.0, "joined"),
    "aac 44.1k stereo, late": (44100, "stereo", "aac", 0.37, "joined"),
    "pcm 16k stereo": (16000, "stereo", "pcm_s16le", 0.0, "joined"),
}


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("audio_frames")
    return {name: _write(d / f"{i}.{'mov' if m[2].startswith('pcm') else 'mp4'}", *m[:3], audio_start_s=m[3])
            for i, (name, m) in enumerate(MEDIA.items())}


@pytest.mark.parametrize("name", list(MEDIA))
@pytest.mark.parametrize("batch", [1, 5, 64])
def test_decode_audio_equals_the_resampler_fed_every_frame(
    media: dict[str, Path], name: str, batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(MonoAt, "batch", batch)
    path = media[name]
    oracle = _oracle(path)
    wave, has_audio = decode_audio(path, RATE)
    assert has_audio and wave.dtype == np.float32
    np.testing.assert_array_equal(wave, oracle)  # bit for bit
    for needed in (1, 12345, 2 * RATE):
        part, _ = decode_audio(path, RATE, needed=needed)
        assert part.shape == oracle.shape
        np.testing.assert_array_equal(part[:needed], oracle[:needed])
    if name.endswith("late"):
        # (the encoder primes 1024 samples before the first one given to it)
        assert not wave[:int(0.34 * RATE)].any() and wave[int(0.38 * RATE):].any()


@pytest.mark.parametrize("name", list(MEDIA))
def test_the_route_follows_the_first_frame(media: dict[str, Path], name: str) -> None:
    mono = MonoAt(RATE, "x.mp4")
    with av.open(str(media[name])) as c:
        mono.add(next(c.decode(c.streams.audio[0])))
    route = "as is" if mono.resampler is None else "joined" if mono.joined else "frame by frame"
    assert route == MEDIA[name][4]


def test_a_frame_of_another_format_is_a_video_error() -> None:
    def frame(fmt: str, rate: int) -> av.AudioFrame:
        f = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32 if fmt == "fltp" else np.int16),
                                       format=fmt, layout="mono")
        f.sample_rate = rate
        return f

    for first, second in ((("fltp", RATE), ("fltp", 48000)), (("s16p", 48000), ("fltp", 48000))):
        mono = MonoAt(RATE, "clip.mp4")
        mono.add(frame(*first))
        with pytest.raises(VideoError, match="clip.mp4: the audio changes format mid-stream"):
            mono.add(frame(*second))
