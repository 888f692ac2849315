"""The synthetic dataset: real files, right metadata, and each group separable by its modality."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from hms_deploy.cli.synth import main as synth_main
from hms_deploy.data.audio import log_mel_spectrogram
from hms_deploy.data.frame_source import FrameSource
from hms_deploy.data.synthetic import (
    CLASS_GROUPS,
    DEFAULT_CLASSES,
    make_dataset,
    make_reference_video,
    make_sample_video,
    render_class_video,
    write_video,
)
from hms_deploy.data.video import decode_audio, probe
from hms_deploy.errors import ConfigError

PER_CLASS, DURATION, FPS = 3, 2.0, 15


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    csv_path = make_dataset(out, per_class=PER_CLASS, seed=0, duration_s=DURATION, split=True)
    assert csv_path == out / "videos.csv"
    return out


def rows(path: Path) -> list[tuple[str, str]]:
    with path.open() as f:
        r = csv.reader(f)
        assert next(r) == ["path", "label"]
        return [(p, label) for p, label in r]


def by_label(root: Path) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for p, label in rows(root / "videos.csv"):
        out.setdefault(label, []).append(root / p)
    return out


def test_lists_and_layout(dataset: Path) -> None:
    all_rows = rows(dataset / "videos.csv")
    assert len(all_rows) == PER_CLASS * len(DEFAULT_CLASSES)
    assert (dataset / "labels.txt").read_text().splitlines() == list(DEFAULT_CLASSES)
    assert json.loads((dataset / "groups.json").read_text()) == CLASS_GROUPS
    assert {g for g in CLASS_GROUPS.values()} == {"audio", "appearance", "motion"}
    parts = {name: rows(dataset / f"{name}.csv") for name in ("train", "val", "test")}
    union = [row for part in parts.values() for row in part]
    assert sorted(union) == sorted(all_rows)  # a partition
    for part in parts.values():
        assert {label for _, label in part} == set(DEFAULT_CLASSES)  # stratified
    for p, _ in all_rows:
        assert not Path(p).is_absolute() and (dataset / p).is_file()


def test_videos_decode_with_the_right_metadata(dataset: Path) -> None:
    for label, paths in by_label(dataset).items():
        info = probe(paths[0])
        assert info.duration_s == pytest.approx(DURATION, abs=1.0 / FPS)
        assert info.fps == pytest.approx(FPS, rel=1e-3)
        assert (info.width, info.height) == (160, 120)
        assert info.has_audio, label
        wave, has_audio = decode_audio(paths[0], info=info)
        assert has_audio and wave.shape == (round(info.duration_s * 16000),)
        assert 0.01 < np.abs(wave).max() <= 1.0
        with FrameSource(info) as src:
            frames = src.read([0, info.num_frames - 1])
        assert frames[0].shape == (120, 160, 3)


def dominant_band(path: Path) -> int:
    logmel = log_mel_spectrogram(decode_audio(path)[0])
    return int(np.bincount(logmel.argmax(axis=1)).argmax())


def colour_excess(path: Path) -> tuple[float, float]:
    """99.5th percentile of R - G and of G - R over the first frame."""
    with FrameSource(path) as src:
        f = src.read([0])[0].astype(np.int32)
    return (
        float(np.percentile(f[..., 0] - f[..., 1], 99.5)),
        float(np.percentile(f[..., 1] - f[..., 0], 99.5)),
    )


def horizontal_shift(path: Path, frames_apart: int = 8) -> int:
    """Pixels the scene content moved right between frames 3 and 3 + frames_apart (circular)."""
    with FrameSource(path) as src:
        fr = src.read([3, 3 + frames_apart])

    def profile(f: np.ndarray) -> np.ndarray:
        f = f.astype(np.float64)
        p = np.abs(f - np.median(f, axis=(0, 1))).mean(axis=(0, 2))
        return p - p.mean()

    a, b = profile(fr[3]), profile(fr[3 + frames_apart])
    xc = np.fft.irfft(np.fft.rfft(b) * np.conj(np.fft.rfft(a)), n=a.size)
    s = int(np.argmax(xc))
    return s if s <= a.size // 2 else s - a.size


def test_audio_group_differs_in_sound_only(dataset: Path) -> None:
    videos = by_label(dataset)
    bands = {c: [dominant_band(p) for p in videos[c]] for c in DEFAULT_CLASSES}
    low, high = set(bands["tone_low"]), set(bands["tone_high"])
    neutral = {b for c in DEFAULT_CLASSES if CLASS_GROUPS[c] != "audio" for b in bands[c]}
    assert max(low) < min(neutral) <= max(neutral) < min(high)
    assert max(high) - min(low) > 15
    for c in ("tone_low", "tone_high"):  # but they look neutral and stand still
        for p in videos[c]:
            assert max(colour_excess(p)) < 60
            assert abs(horizontal_shift(p)) <= 3


def test_appearance_group_differs_in_look_only(dataset: Path) -> None:
    videos = by_label(dataset)
    for p in videos["red_disc"]:
        rg, gr = colour_excess(p)
        assert rg > 100 and gr < 60
        assert abs(horizontal_shift(p)) <= 3
    for p in videos["green_square"]:
        rg, gr = colour_excess(p)
        assert gr > 100 and rg < 60
        assert abs(horizontal_shift(p)) <= 3
    neutral_bands = {dominant_band(p) for c in ("red_disc", "green_square") for p in videos[c]}
    assert max(neutral_bands) - min(neutral_bands) <= 2  # the same sound


def test_motion_group_differs_in_movement_only(dataset: Path) -> None:
    videos = by_label(dataset)
    speed = 0.25 * 160 * 8 / FPS  # ~21 px in 8 frames, +-15 %
    for p in videos["move_left"]:
        assert -1.4 * speed < horizontal_shift(p) < -0.6 * speed
        assert max(colour_excess(p)) < 60
    for p in videos["move_right"]:
        assert 0.6 * speed < horizontal_shift(p) < 1.4 * speed
        assert max(colour_excess(p)) < 60


def test_videos_vary_but_are_reproducible(tmp_path: Path) -> None:
    a = render_class_video(tmp_path / "a.mp4", "red_disc", seed=5, index=0, duration_s=0.5)
    b = render_class_video(tmp_path / "b.mp4", "red_disc", seed=5, index=0, duration_s=0.5)
    c = render_class_video(tmp_path / "c.mp4", "red_disc", seed=5, index=1, duration_s=0.5)
    assert a.read_bytes() == b.read_bytes()  # same seed, class and index: same file
    with FrameSource(a) as sa, FrameSource(c) as sc:
        fa, fc = sa.read([2])[2], sc.read([2])[2]
    assert np.abs(fa.astype(int) - fc.astype(int)).mean() > 2.0


def test_dataset_rendered_by_two_processes_is_the_same(tmp_path: Path) -> None:
    kw = {"per_class": 2, "seed": 3, "classes": ["tone_low", "move_left"], "duration_s": 0.4}
    one = make_dataset(tmp_path / "one", workers=1, **kw).parent
    two = make_dataset(tmp_path / "two", workers=2, **kw).parent
    files = sorted(f.relative_to(one) for f in one.rglob("*") if f.is_file())
    assert len(files) == 4 + 3  # four videos, videos.csv, labels.txt, groups.json
    assert files == sorted(f.relative_to(two) for f in two.rglob("*") if f.is_file())
    for f in files:
        assert (one / f).read_bytes() == (two / f).read_bytes(), f
    with pytest.raises(ConfigError, match="workers must be >= 1"):
        make_dataset(tmp_path / "three", workers=0, **kw)


def test_write_video_options(tmp_path: Path) -> None:
    path = write_video(
        tmp_path / "g.mp4",
        duration_s=2.0,
        fps=30,
        size=(64, 48),
        gop=15,
        frame_fn=lambda i, t: np.full((48, 64, 3), (i * 8) % 256, np.uint8),
    )
    info = probe(path)
    assert info.num_frames == 60 and not info.has_audio
    np.testing.assert_allclose(info.keyframe_times, [0.0, 0.5, 1.0, 1.5], atol=1e-4)
    with pytest.raises(ConfigError, match="positive and even"):
        write_video(
            tmp_path / "odd.mp4",
            duration_s=1,
            fps=10,
            size=(63, 48),
            frame_fn=lambda i, t: np.zeros((48, 63, 3), np.uint8),
        )
    with pytest.raises(ConfigError, match=r"expected \(48, 64, 3\) uint8"):
        write_video(
            tmp_path / "bad.mp4",
            duration_s=1,
            fps=10,
            size=(64, 48),
            frame_fn=lambda i, t: np.zeros((48, 64), np.uint8),
        )


def test_dataset_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="classes must be distinct names"):
        make_dataset(tmp_path, per_class=1, seed=0, classes=["tone_low", "purple_cube"])
    with pytest.raises(ConfigError, match="per_class must be >= 1"):
        make_dataset(tmp_path, per_class=0, seed=0)
    with pytest.raises(ConfigError, match="split needs per_class >= 3"):
        make_dataset(
            tmp_path, per_class=2, seed=0, classes=["tone_low"], duration_s=0.4, split=True
        )
    assert list(tmp_path.iterdir()) == []  # refused before writing anything


def test_dataset_without_split_removes_stale_lists(tmp_path: Path) -> None:
    kw = {"seed": 0, "classes": ["tone_low"], "duration_s": 0.4, "fps": 5}
    make_dataset(tmp_path, per_class=3, split=True, **kw)
    assert (tmp_path / "train.csv").is_file() and (tmp_path / "test.csv").is_file()
    make_dataset(tmp_path, per_class=1, **kw)
    assert not any((tmp_path / f"{p}.csv").exists() for p in ("train", "val", "test"))
    rows = list(csv.DictReader((tmp_path / "videos.csv").open()))
    assert [r["path"] for r in rows] == ["videos/tone_low/tone_low_0000.mp4"]


def test_reference_video_geometry(tmp_path: Path) -> None:
    path = make_reference_video(tmp_path / "ref.mp4", duration_s=4.2)  # 60 s by default
    info = probe(path)
    assert (info.width, info.height) == (640, 360)
    assert info.fps == pytest.approx(30.0, rel=1e-3)
    assert info.num_frames == 126
    np.testing.assert_allclose(info.keyframe_times, [0.0, 2.0, 4.0], atol=1e-4)
    wave, has_audio = decode_audio(path, info=info)
    assert has_audio
    # speech-like: syllables and gaps, so the short-time energy varies a lot
    energy = (wave[: 4 * 16000].reshape(-1, 800) ** 2).mean(axis=1)
    assert energy.max() > 50 * np.percentile(energy, 10)
    with FrameSource(info) as src:
        f = src.read([0, 45])
    assert np.abs(f[0].astype(int) - f[45].astype(int)).mean() > 1.0  # things move


def test_sample_video(tmp_path: Path) -> None:
    label = make_sample_video(tmp_path / "s.mp4", seed=1)
    assert label == DEFAULT_CLASSES[1]
    info = probe(tmp_path / "s.mp4")
    assert info.duration_s == pytest.approx(4.0, abs=0.07) and info.has_audio


def test_cli(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(synth_main, ["sample", str(tmp_path / "s.mp4"), "--label", "move_right"])
    assert res.exit_code == 0, res.output
    assert res.output.strip() == "move_right" and (tmp_path / "s.mp4").is_file()
    res = runner.invoke(synth_main, ["dataset", str(tmp_path / "ds"), "--per-class", "0"])
    assert res.exit_code == 2  # a usage error
    assert res.output.strip() == "hms-synth: error: per_class must be >= 1, got 0"
    res = runner.invoke(synth_main, ["sample", str(tmp_path / "x.mp4"), "--label", "nope"])
    assert res.exit_code == 2 and res.output.startswith("hms-synth: error: unknown synthetic")
    for args in (["-h"], ["dataset", "-h"], ["sample", "-h"], ["reference", "-h"]):
        res = runner.invoke(synth_main, args)
        assert res.exit_code == 0 and "Usage:" in res.output, args
