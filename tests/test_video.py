"""Probing, aligned audio and decode-on-demand, on media encoded here with PyAV."""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from hms_deploy.config import MotionClip, tiny_config
from hms_deploy.data.frame_source import FrameSource
from hms_deploy.data.resize import resize_center_crop, resize_center_crop_batch
from hms_deploy.data.sampling import StepSampler, clip_times, nearest_frames, step_centers
from hms_deploy.data.synthetic import write_video
from hms_deploy.data.video import decode_audio, probe
from hms_deploy.errors import ConfigError, VideoError

W, H, BITS = 160, 64, 10  # frames carry their index as 10 black/white blocks of 16 px
SR = 16000


def index_frame(i: int, t: float = 0.0) -> np.ndarray:
    bits = (i >> np.arange(BITS)) & 1
    row = np.repeat(bits * 255, W // BITS).astype(np.uint8)
    return np.repeat(np.broadcast_to(row[None, :, None], (1, W, 3)), H, axis=0).copy()


def read_index(rgb: np.ndarray) -> int:
    h, w = rgb.shape[:2]
    bw = w // BITS
    means = [rgb[8 : h - 8, b * bw + 4 : (b + 1) * bw - 4].mean() for b in range(BITS)]
    return int(sum(1 << b for b, m in enumerate(means) if m > 128))


def tone_from(onset_s: float, freq: float = 1000.0) -> Callable[[np.ndarray], np.ndarray]:
    def audio_fn(t: np.ndarray) -> np.ndarray:
        return np.where(t >= onset_s, 0.5 * np.sin(2 * np.pi * freq * t), 0.0)

    return audio_fn


def onset(wave: np.ndarray, level: float = 0.1) -> float:
    return float(np.flatnonzero(np.abs(wave) > level)[0] / SR)


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("media")
    files = {
        # 5 s at 30 fps, keyframe every 10 frames, B-frames, a tone from 1.0 s
        "short_gop": write_video(
            d / "short_gop.mp4",
            duration_s=5.0,
            fps=30,
            size=(W, H),
            frame_fn=index_frame,
            audio_fn=tone_from(1.0),
            gop=10,
        ),
        # 10 s at 30 fps, keyframes at frames 0 and 150 only
        "long_gop": write_video(
            d / "long_gop.mp4",
            duration_s=10.0,
            fps=30,
            size=(W, H),
            frame_fn=index_frame,
            gop=150,
        ),
    }
    return files


def test_probe_constant_rate(media: dict[str, Path]) -> None:
    info = probe(media["short_gop"])
    assert info.num_frames == 150
    np.testing.assert_allclose(info.frame_times, np.arange(150) / 30, atol=1e-4)
    assert info.duration_s == pytest.approx(5.0, abs=1e-4)
    assert info.fps == pytest.approx(30.0, abs=1e-3)
    np.testing.assert_allclose(info.keyframe_times, np.arange(0, 150, 10) / 30, atol=1e-4)
    assert (info.width, info.height, info.rotation) == (W, H, 0)
    assert info.has_audio
    assert abs(info.audio_start_s) < 0.07  # within one AAC frame of the video start


def test_fixture_really_has_b_frames(media: dict[str, Path]) -> None:
    with av.open(str(media["short_gop"])) as c:
        pts = [p.pts for p in c.demux(c.streams.video[0]) if p.pts is not None]
    assert pts != sorted(pts)  # decode order differs from presentation order


@pytest.mark.parametrize("name", ["short_gop", "long_gop"])
@pytest.mark.parametrize("seek_threshold", [4, 10**9], ids=["seek", "forward"])
def test_read_returns_exactly_the_requested_frames(
    media: dict[str, Path], name: str, seek_threshold: int
) -> None:
    info = probe(media[name])
    rng = np.random.default_rng(1)
    wanted = [0, 3, 4, 37, 38, 90, 91, info.num_frames - 1, *rng.integers(0, info.num_frames, 8)]
    with FrameSource(info, seek_threshold=seek_threshold, cache_frames=0) as src:
        frames = src.read(list(reversed(wanted)) + [37])  # any order, repeats allowed
        stats = src.stats
    assert sorted(frames) == sorted(set(wanted))
    for i, rgb in frames.items():
        assert rgb.shape == (H, W, 3) and rgb.dtype == np.uint8
        assert read_index(rgb) == i
    assert stats.frames_converted == len(set(wanted))
    assert stats.substituted == 0
    if seek_threshold > 1000:
        assert stats.seeks == 0
        assert stats.frames_decoded == info.num_frames  # one pass to the last frame
    elif name == "short_gop":
        assert stats.seeks > 0
        assert stats.frames_decoded < info.num_frames


def test_seeking_and_forward_decoding_give_identical_pixels(media: dict[str, Path]) -> None:
    info = probe(media["short_gop"])
    wanted = [5, 77, 78, 143]
    with FrameSource(info, seek_threshold=0, cache_frames=0) as a:
        fa = a.read(wanted)
    with FrameSource(info, seek_threshold=10**9, cache_frames=0) as b:
        fb = b.read(wanted)
    assert a.stats.seeks >= 2 and b.stats.seeks == 0
    for i in wanted:
        np.testing.assert_array_equal(fa[i], fb[i])


def test_seek_policy_long_gop(media: dict[str, Path]) -> None:
    info = probe(media["long_gop"])
    np.testing.assert_allclose(info.keyframe_times, [0.0, 5.0], atol=1e-4)
    with FrameSource(info, seek_threshold=16) as src:
        frames = src.read([10, 120])  # 120 is before the next keyframe (150): decode forward
        assert src.stats.seeks == 0 and src.stats.frames_decoded == 121
        frames.update(src.read([200]))  # beyond keyframe 150, 29 frames skipped > 16: seek
        assert src.stats.seeks == 1
        assert src.stats.frames_decoded == 121 + (200 - 150 + 1)
    assert {i: read_index(f) for i, f in frames.items()} == {10: 10, 120: 120, 200: 200}


def test_backward_reads_seek_and_cache_serves_repeats(media: dict[str, Path]) -> None:
    info = probe(media["short_gop"])
    with FrameSource(info, cache_frames=4) as src:
        assert read_index(src.read([100])[100]) == 100
        assert read_index(src.read([12])[12]) == 12
        assert src.stats.seeks >= 1
        decoded = src.stats.frames_decoded
        again = src.read([100, 12])
        assert src.stats.cache_hits == 2 and src.stats.frames_decoded == decoded
        assert read_index(again[100]) == 100 and read_index(again[12]) == 12


def test_read_rejects_out_of_range(media: dict[str, Path]) -> None:
    with FrameSource(media["short_gop"]) as src:
        with pytest.raises(IndexError, match=r"frame index 150 is outside \[0, 150\)"):
            src.read([3, 150])
        assert src.read([]) == {}


def test_decode_audio_length_and_alignment(media: dict[str, Path]) -> None:
    wave, has_audio = decode_audio(media["short_gop"])
    assert has_audio and wave.dtype == np.float32
    assert wave.shape == (5 * SR,)
    assert onset(wave) == pytest.approx(1.0, abs=0.002)
    assert np.abs(wave[: int(0.99 * SR)]).max() < 0.02


def _write_offset_file(path: Path, video_start_s: float, audio_start_s: float) -> Path:
    """2 s of 10 fps video and 1.5 s of audio (a tone from the audio's 0.8 s) with offsets."""
    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=10)
        vs.width, vs.height, vs.pix_fmt = 64, 48, "yuv420p"
        aus = c.add_stream("aac", rate=SR)
        aus.layout = "mono"
        for i in range(20):
            f = av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24")
            f.pts, f.time_base = i + round(video_start_s * 10), Fraction(1, 10)
            c.mux(vs.encode(f))
        c.mux(vs.encode(None))
        t = np.arange(int(1.5 * SR)) / SR
        wave = tone_from(0.8)(t).astype(np.float32)
        for k in range(0, wave.size, 1024):
            af = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(wave[None, k : k + 1024]), format="fltp", layout="mono"
            )
            af.sample_rate, af.time_base = SR, Fraction(1, SR)
            af.pts = k + round(audio_start_s * SR)
            c.mux(aus.encode(af))
        c.mux(aus.encode(None))
    return path


@pytest.mark.parametrize(
    ("video_start", "audio_start"), [(0.0, 0.5), (0.3, 0.0)], ids=["audio-late", "video-late"]
)
def test_decode_audio_aligns_by_timestamps(
    tmp_path: Path, video_start: float, audio_start: float
) -> None:
    path = _write_offset_file(tmp_path / "offset.mp4", video_start, audio_start)
    info = probe(path)
    assert info.start_s == pytest.approx(video_start, abs=1e-3)
    wave, has_audio = decode_audio(path, info=info)
    assert has_audio and wave.shape == (2 * SR,)
    # the tone starts 0.8 s into the audio, i.e. at audio_start + 0.8 on the shared clock
    assert onset(wave) == pytest.approx(audio_start + 0.8 - video_start, abs=0.002)


def test_no_audio_track(tmp_path: Path) -> None:
    path = write_video(
        tmp_path / "mute.mp4",
        duration_s=1.0,
        fps=10,
        size=(64, 48),
        frame_fn=lambda i, t: np.zeros((48, 64, 3), np.uint8),
    )
    info = probe(path)
    assert not info.has_audio and info.audio_start_s == 0.0
    wave, has_audio = decode_audio(path, info=info)
    assert not has_audio
    assert wave.shape == (SR,) and wave.dtype == np.float32 and not wave.any()


def test_rotation_metadata_is_applied(tmp_path: Path) -> None:
    def marked(i: int, t: float) -> np.ndarray:
        a = np.zeros((48, 64, 3), np.uint8)
        a[:16, :16] = 255  # top-left marker
        return a

    try:
        path = write_video(
            tmp_path / "rot.mp4",
            duration_s=0.5,
            fps=10,
            size=(64, 48),
            frame_fn=marked,
            rotation=90,
        )
    except (AttributeError, av.FFmpegError) as e:  # pragma: no cover - old PyAV
        pytest.skip(f"PyAV cannot write a display matrix: {e}")
    info = probe(path)
    assert info.rotation == 90
    assert (info.width, info.height) == (48, 64)
    with FrameSource(info) as src:
        rgb = src.read([0])[0]
    assert rgb.shape == (64, 48, 3)
    # 90 degrees counter-clockwise: the top-left corner goes to the bottom-left
    assert rgb[-12:, :12].mean() > 200
    assert max(rgb[:12, :12].mean(), rgb[:12, -12:].mean(), rgb[-12:, -12:].mean()) < 50


def test_variable_frame_rate(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    times = np.round(np.cumsum(np.r_[0.2, rng.uniform(0.02, 0.15, 59)]), 3)  # ms, from 0.2 s
    path = write_video(
        tmp_path / "vfr.mp4",
        duration_s=0.0,
        fps=30,
        size=(W, H),
        frame_fn=index_frame,
        frame_times_s=times,
    )
    info = probe(path)
    assert info.num_frames == 60
    np.testing.assert_allclose(info.frame_times, times - times[0], atol=1e-4)
    span = times[-1] - times[0]  # plus the last frame's duration, which the file stores
    assert span < info.duration_s <= span + 0.15 + 1e-6
    queries = step_centers(info.duration_s, 12)
    idx = nearest_frames(info.frame_times, queries)
    brute = np.abs(queries[:, None] - (times - times[0])[None]).argmin(axis=1)
    np.testing.assert_array_equal(idx, brute)
    with FrameSource(info) as src:
        frames = src.read(idx)
    assert all(read_index(frames[i]) == i for i in idx.tolist())


def test_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(VideoError, match=r"missing\.mp4: no such file"):
        probe(tmp_path / "missing.mp4")
    with pytest.raises(VideoError, match=r": not a regular file"):
        probe(tmp_path)
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 50)
    with pytest.raises(VideoError, match=r"notes\.mp4: not a readable media file"):
        probe(text)
    with pytest.raises(VideoError, match=r"notes\.mp4: not a readable media file"):
        decode_audio(text)


def test_truncated_file(media: dict[str, Path], tmp_path: Path) -> None:
    data = media["short_gop"].read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])  # moov is at the end: the index is lost
    with pytest.raises(VideoError, match=r"cut\.mp4: "):
        probe(cut)


def test_audio_only_file_has_no_video_stream(tmp_path: Path) -> None:
    path = tmp_path / "voice.m4a"
    with av.open(str(path), "w") as c:
        aus = c.add_stream("aac", rate=SR)
        aus.layout = "mono"
        for k in range(0, SR, 1024):
            af = av.AudioFrame.from_ndarray(
                np.zeros((1, 1024), np.float32), format="fltp", layout="mono"
            )
            af.sample_rate, af.pts = SR, k
            c.mux(aus.encode(af))
        c.mux(aus.encode(None))
    with pytest.raises(VideoError, match=r"voice\.m4a: no video stream"):
        probe(path)


def test_video_stream_without_frames(tmp_path: Path) -> None:
    path = tmp_path / "empty.ts"  # MPEG-TS declares the video stream even without packets
    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=10)
        vs.width, vs.height, vs.pix_fmt = 64, 48, "yuv420p"
        aus = c.add_stream("aac", rate=SR)
        aus.layout = "mono"
        for k in range(0, SR, 1024):
            af = av.AudioFrame.from_ndarray(
                np.zeros((1, 1024), np.float32), format="fltp", layout="mono"
            )
            af.sample_rate, af.pts = SR, k
            c.mux(aus.encode(af))
        c.mux(aus.encode(None))
    with pytest.raises(VideoError, match=r"empty\.ts: the video stream has no frames"):
        probe(path)


# -- resizing ----------------------------------------------------------------------------
def test_resize_center_crop_matches_torchvision() -> None:
    tv = pytest.importorskip("torchvision.transforms.v2.functional")
    import torch

    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (90, 160, 3), dtype=np.uint8)
    frame[:, 40:60] = [250, 10, 10]  # some structure, not only noise
    got = resize_center_crop(frame, 72, 64)
    assert got.shape == (3, 64, 64) and got.dtype == np.uint8
    x = torch.from_numpy(frame).permute(2, 0, 1).float()
    ref = tv.center_crop(tv.resize(x, [72], antialias=True), [64, 64]).round().clamp(0, 255)
    diff = np.abs(got.astype(int) - ref.to(torch.uint8).numpy().astype(int))
    assert diff.max() <= 1  # float reference, rounded once at the end
    x8 = torch.from_numpy(frame).permute(2, 0, 1).contiguous()
    ref8 = tv.center_crop(tv.resize(x8, [72], antialias=True), [64, 64])
    np.testing.assert_array_equal(got, ref8.numpy())  # torchvision on uint8: identical


def test_resize_center_crop_geometry() -> None:
    frame = np.zeros((100, 200, 3), np.uint8)
    frame[:, 100:] = 200  # right half bright
    out = resize_center_crop(frame, 50, 50)  # -> 50 x 100, crop columns 25..74
    assert out.shape == (3, 50, 50)
    assert out[:, :, :20].max() == 0 and out[:, :, 30:].min() == 200
    portrait = resize_center_crop(np.full((200, 100, 3), 7, np.uint8), 64, 32)
    assert portrait.shape == (3, 32, 32) and np.all(portrait == 7)
    with pytest.raises(ConfigError, match="crop <= resize"):
        resize_center_crop(frame, 32, 64)
    with pytest.raises(ValueError, match=r"expected \(H, W, 3\) uint8"):
        resize_center_crop(frame.astype(np.float32), 32, 32)


def clip_tensor(frames, resize_short: int, crop: int) -> np.ndarray:
    """Reference motion clip, frame by frame: ``(3, len(frames), crop, crop)`` uint8 (C, T, H, W)."""
    return np.stack([resize_center_crop(f, resize_short, crop) for f in frames], axis=1)


def test_batched_helpers_agree_with_single_frames() -> None:
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(4)]
    batch = resize_center_crop_batch(frames, 36, 32)
    assert batch.shape == (4, 3, 32, 32)
    for k, f in enumerate(frames):
        np.testing.assert_array_equal(batch[k], resize_center_crop(f, 36, 32))
    with pytest.raises(ValueError, match="frames differ in size"):
        resize_center_crop_batch([frames[0], frames[0][:40]], 36, 32)


# -- steps -> frames -----------------------------------------------------------------------
def test_step_sampler_indices(media: dict[str, Path]) -> None:
    info = probe(media["short_gop"])
    s = StepSampler(
        info, steps=8, appearance_resize=72, appearance_crop=64, motion_resize=72, motion_crop=64
    )
    centers = (np.arange(8) + 0.5) * 5.0 / 8
    np.testing.assert_allclose(s.centers, centers, atol=1e-9)
    # 30 fps: the frame nearest tau is round(30 tau) (no exact ties at these taus)
    assert s.appearance_indices.tolist() == np.round(centers * 30).tolist()
    m = s.motion_frame_indices(0)
    assert m.shape == (32,)
    # step 0 (tau = 0.3125 s): the clip starts 1.03 s before the video -> edge repeated
    expected = np.clip(np.round((clip_times(centers[0], MotionClip())) * 30), 0, 149)
    np.testing.assert_array_equal(m, expected)
    assert (m == 0).sum() > 1
    with pytest.raises(IndexError, match=r"step 8 is outside \[0, 8\)"):
        s.motion_frame_indices(8)


def test_step_sampler_inputs(media: dict[str, Path]) -> None:
    info = probe(media["short_gop"])
    s = StepSampler.from_config(info, tiny_config(4), steps=6)
    assert (s.appearance_crop, s.motion_crop, s.steps) == (64, 64, 6)
    with FrameSource(info) as src:
        app = s.appearance_inputs(src, [1, 4])
        mot = s.motion_inputs(src, [2])
        direct = src.read([s.appearance_indices[4]])[s.appearance_indices[4]]
        clip_frames = src.read(s.motion_frame_indices(2))
    assert app.shape == (2, 3, 64, 64) and app.dtype == np.uint8
    np.testing.assert_array_equal(app[1], resize_center_crop(direct, 72, 64))
    assert mot.shape == (1, 3, 32, 64, 64)
    want = clip_tensor([clip_frames[i] for i in s.motion_frame_indices(2)], 72, 64)
    np.testing.assert_array_equal(mot[0], want)
    patches = s.audio_patches(decode_audio(media["short_gop"], info=info)[0])
    assert patches.shape == (6, 1, 96, 64)
    # step 0 (tau 0.42 s) precedes the 1.0 s tone onset; step 3 (2.9 s) is inside the tone
    assert patches[3].max() > patches[0].max() + 3.0


class _LandsLate(FrameSource):
    """A FrameSource whose demuxer seeks one keyframe too far (a broken index)."""

    def _seek(self, target: int) -> None:
        super()._seek(target)
        if self._seek_ok:
            later = self.info.keyframe_indices[self.info.keyframe_indices > target]
            if later.size:
                self._container.seek(
                    int(self.info.frame_pts[later[0]]), stream=self._stream, backward=True
                )
                self._frames = self._decode_iter()


def test_a_seek_that_lands_late_falls_back_to_decoding_from_the_start(
    media: dict[str, Path],
) -> None:
    info = probe(media["short_gop"])
    with _LandsLate(info, seek_threshold=4, cache_frames=0) as src:
        frames = src.read([2, 75, 120])
        assert {i: read_index(f) for i, f in frames.items()} == {2: 2, 75: 75, 120: 120}
        assert src.stats.substituted == 0
        assert read_index(src.read([30])[30]) == 30  # backward reads still work (reopen)
