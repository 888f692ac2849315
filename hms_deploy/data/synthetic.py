"""Synthetic H.264/AAC videos: a multimodal toy dataset, a benchmark reference, a demo sample.

The dataset's classes come in three groups, each separable by one modality only:

=============  ==========================  =============================================
group          classes                     what differs (everything else is shared)
=============  ==========================  =============================================
audio          ``tone_low``, ``tone_high``  the sound: a steady ~300 Hz tone vs a ~2 kHz
                                            tone pulsed at 3 Hz
appearance     ``red_disc``,                the look: a red disc vs a green square
               ``green_square``
motion         ``move_left``,               the movement: the grey disc drifts left vs
               ``move_right``               right (~0.25 frame widths per second,
                                            wrapping around just outside the centre
                                            crop); any single frame looks like a
                                            stationary class
=============  ==========================  =============================================

Shared "neutral" parts: a grey background with a slight per-video tint and sensor-like
noise; a grey disc that wobbles by ~1 px in place; a quiet ~800 Hz hum in noise. Every
video draws its own tint, object size, position, colour jitter, wobble, tone frequency
(+-5 %), phase and loudness from ``np.random.default_rng([seed, class_index, k])``, so
the content of video ``k`` of a class does not depend on which other classes or how
many videos are generated.
"""

from __future__ import annotations

import csv
import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from hms_deploy.data.media_writer import AudioFn, FrameFn, write_video
from hms_deploy.errors import ConfigError, require_at_least

CLASS_GROUPS: dict[str, str] = {
    "tone_low": "audio",
    "tone_high": "audio",
    "red_disc": "appearance",
    "green_square": "appearance",
    "move_left": "motion",
    "move_right": "motion",
}
DEFAULT_CLASSES: tuple[str, ...] = tuple(CLASS_GROUPS)
CLIP_DURATION_S = 4.0  # a dataset video's length
CLIP_FPS = 15.0
REFERENCE_DURATION_S = 60.0  # the benchmark video's length
RENDER_WORKERS = 1  # processes that render a dataset (1: this one)



# -- the toy dataset ---------------------------------------------------------------------
@dataclass(frozen=True)
class _Params:
    """Per-video random draws (see the module docstring)."""

    tint: NDArray[np.float64]  # (3,) added to the background, 0-255 units
    radius: float  # object radius in pixels
    cx: float
    cy: float
    colour: NDArray[np.float64]  # (3,) object colour, 0-255
    wobble_hz: float
    wobble_phase: float
    speed: float  # px/s, signed
    freq_scale: float
    phase: float
    loudness: float
    noise_seed: int


_NEUTRAL_GREY = np.array([150.0, 150.0, 150.0])
_COLOURS = {
    "red_disc": np.array([205.0, 45.0, 45.0]),
    "green_square": np.array([45.0, 185.0, 65.0]),
}


def _draw_params(label: str, rng: np.random.Generator, width: int, height: int) -> _Params:
    colour = _COLOURS.get(label, _NEUTRAL_GREY) + rng.uniform(-15, 15, 3)
    direction = {"move_left": -1.0, "move_right": 1.0}.get(label, 0.0)
    return _Params(
        tint=rng.uniform(-12, 12, 3),
        radius=height * 0.14 * rng.uniform(0.85, 1.15),
        cx=rng.uniform(0.0, width) if direction else width * rng.uniform(0.35, 0.65),
        cy=height * rng.uniform(0.35, 0.65),
        colour=colour,
        wobble_hz=rng.uniform(0.3, 0.8),
        wobble_phase=rng.uniform(0, 2 * np.pi),
        speed=direction * width * 0.25 * rng.uniform(0.85, 1.15),
        freq_scale=rng.uniform(0.95, 1.05),
        phase=rng.uniform(0, 2 * np.pi),
        loudness=rng.uniform(0.7, 1.0),
        noise_seed=int(rng.integers(2**31)),
    )


def _frame_fn(label: str, p: _Params, width: int, height: int) -> FrameFn:
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    shade = (ys / height - 0.5) * 20.0  # a mild vertical gradient, shared by all classes
    bg = np.clip(115.0 + shade[..., None] + p.tint, 0, 255).astype(np.float32)
    noise_rng = np.random.default_rng(p.noise_seed)
    noise_bank = noise_rng.normal(0.0, 3.0, (8, height, width, 1)).astype(np.float32)
    colour = p.colour.astype(np.float32)
    square = label == "green_square"

    # A drifting object wraps around within a band that ends just outside the centre crop
    # the models see (the middle ~2/3 of a 4:3 frame: 64 of 96 px for tiny, 224 of 341
    # for paper), so it never leaves their view: wrapping at the frame's edges hid it
    # completely ~12 % of the time, and a step whose clip shows no motion cannot be
    # classified (the first-hour demo's move_left sample: hidden on steps 1-2).
    lo = width / 6.0 - p.radius if p.speed else 0.0
    band = (width - 2.0 * lo) if p.speed else float(width)

    def frame_fn(i: int, t: float) -> NDArray[np.uint8]:
        wob = np.sin(2 * np.pi * p.wobble_hz * t + p.wobble_phase)
        cx = lo + (p.cx - lo + p.speed * t + 1.0 * wob) % band
        cy = p.cy + 1.0 * np.cos(2 * np.pi * p.wobble_hz * t + p.wobble_phase)
        dx = (xs - cx + band / 2) % band - band / 2  # wraps around horizontally (in the band)
        dy = ys - cy
        if square:
            dist = np.maximum(np.abs(dx), np.abs(dy)) - p.radius * 0.9
        else:
            dist = np.sqrt(dx * dx + dy * dy) - p.radius
        alpha = np.clip(0.5 - dist, 0.0, 1.0)[..., None]  # 1-px anti-aliased edge
        img = bg + alpha * (colour - bg) + noise_bank[i % 8]
        frame: NDArray[np.uint8] = np.clip(img + 0.5, 0, 255).astype(np.uint8)
        return frame

    return frame_fn


def _audio_fn(label: str, p: _Params) -> AudioFn:
    def audio_fn(t: NDArray[np.float64]) -> NDArray[np.float64]:
        rng = np.random.default_rng(p.noise_seed + 1)
        noise = rng.normal(0.0, 0.01, t.shape)
        if label == "tone_low":
            tone = 0.3 * np.sin(2 * np.pi * 300.0 * p.freq_scale * t + p.phase)
        elif label == "tone_high":
            gate = 0.5 + 0.5 * np.sign(np.sin(2 * np.pi * 3.0 * t + p.phase))
            tone = 0.3 * gate * np.sin(2 * np.pi * 2000.0 * p.freq_scale * t + p.phase)
        else:
            tone = 0.08 * np.sin(2 * np.pi * 800.0 * p.freq_scale * t + p.phase)
        samples: NDArray[np.float64] = p.loudness * tone + noise
        return samples

    return audio_fn


def render_class_video(
    path: str | Path,
    label: str,
    *,
    seed: int,
    index: int = 0,
    duration_s: float = CLIP_DURATION_S,
    fps: float = CLIP_FPS,
    size: tuple[int, int] = (160, 120),
) -> Path:
    """Write video ``index`` of class ``label`` (one of :data:`CLASS_GROUPS`) for ``seed``."""
    if label not in CLASS_GROUPS:
        raise ConfigError(f"unknown synthetic class {label!r}, expected one of {DEFAULT_CLASSES}")
    class_index = DEFAULT_CLASSES.index(label)
    rng = np.random.default_rng([int(seed), class_index, int(index)])
    width, height = size
    p = _draw_params(label, rng, width, height)
    return write_video(
        path,
        duration_s=duration_s,
        fps=fps,
        size=size,
        frame_fn=_frame_fn(label, p, width, height),
        audio_fn=_audio_fn(label, p),
    )


def _split_rows(
    rows: list[tuple[str, str]],
    classes: Sequence[str],
    per_class: int,
    seed: int,
    fractions: tuple[float, float, float],
) -> dict[str, list[tuple[str, str]]]:
    n_val = max(1, round(per_class * fractions[1]))
    n_test = max(1, round(per_class * fractions[2]))
    if per_class - n_val - n_test < 1:
        raise ConfigError(f"split needs per_class >= 3, got {per_class}",
                          setting=("split", "per_class"), value=per_class, expected=">= 3")
    rng = np.random.default_rng([int(seed), 7919])
    out: dict[str, list[tuple[str, str]]] = {"train": [], "val": [], "test": []}
    for c, label in enumerate(classes):
        mine = rows[c * per_class : (c + 1) * per_class]
        order = rng.permutation(per_class)
        for rank, k in enumerate(order):
            part = "val" if rank < n_val else "test" if rank < n_val + n_test else "train"
            out[part].append(mine[k])
    return out


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows(rows)


def _render_job(job: tuple[str, str, int], *, root: Path, seed: int, duration_s: float,
                fps: float, size: tuple[int, int]) -> Path:
    rel, label, index = job
    return render_class_video(root / rel, label, seed=seed, index=index, duration_s=duration_s,
                              fps=fps, size=size)


def make_dataset(
    out_dir: str | Path,
    *,
    per_class: int,
    seed: int,
    classes: Sequence[str] | None = None,
    duration_s: float = CLIP_DURATION_S,
    fps: float = CLIP_FPS,
    size: tuple[int, int] = (160, 120),
    split: bool = False,
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
    workers: int = RENDER_WORKERS,
) -> Path:
    """Write the synthetic dataset and its lists (``workers`` processes render the videos,
    1: this process; each video's content depends only on its seed, class and index, so
    not on ``workers``).

    Layout of ``out_dir``::

        videos/<label>/<label>_<k:04d>.mp4
        videos.csv        header "path,label"; paths relative to out_dir (the CSV's folder)
        labels.txt        one class name a line; line i is class index i
        groups.json       {class: "audio" | "appearance" | "motion"}
        train.csv, val.csv, test.csv   with split=True: a per-class split of videos.csv
                                       (val and test get round(fraction * per_class) >= 1 each);
                                       without it, stale ones from an earlier run are removed

    Returns:
        the path of ``videos.csv``.
    """
    classes = tuple(DEFAULT_CLASSES if classes is None else classes)
    unknown = [c for c in classes if c not in CLASS_GROUPS]
    if unknown or not classes or len(set(classes)) != len(classes):
        raise ConfigError(
            f"classes must be distinct names from {DEFAULT_CLASSES}, got {list(classes)}"
        )
    if per_class < 1:
        raise ConfigError(f"per_class must be >= 1, got {per_class}")
    if split:
        _split_rows([("", c) for c in classes for _ in range(per_class)], classes, per_class,
                    seed, split_fractions)  # refuse an impossible split before writing
    require_at_least("workers", workers, 1)
    out = Path(out_dir)
    jobs = [(f"videos/{label}/{label}_{k:04d}.mp4", label, k)
            for label in classes for k in range(per_class)]
    rows = [(rel, label) for rel, label, _ in jobs]
    render = functools.partial(_render_job, root=out, seed=seed, duration_s=duration_s, fps=fps,
                               size=size)
    if workers == 1:
        for job in jobs:
            render(job)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for _ in pool.map(render, jobs, chunksize=max(1, len(jobs) // (4 * workers))):
                pass
    _write_csv(out / "videos.csv", rows)
    (out / "labels.txt").write_text("".join(f"{c}\n" for c in classes))
    (out / "groups.json").write_text(json.dumps({c: CLASS_GROUPS[c] for c in classes}, indent=2))
    for part, part_rows in (
        _split_rows(rows, classes, per_class, seed, split_fractions) if split else {}
    ).items():
        _write_csv(out / f"{part}.csv", part_rows)
    if not split:  # lists of an earlier dataset in out_dir would name videos of another draw
        for part in ("train", "val", "test"):
            (out / f"{part}.csv").unlink(missing_ok=True)
    return out / "videos.csv"


def make_sample_video(path: str | Path, seed: int = 0, *, label: str | None = None) -> str:
    """A 4 s, 160x120, 15 fps sample drawn like the dataset (class ``label``, default
    ``DEFAULT_CLASSES[seed % 6]``), for the demo. Returns the class it shows."""
    label = DEFAULT_CLASSES[seed % len(DEFAULT_CLASSES)] if label is None else label
    render_class_video(path, label, seed=seed, index=10_000 + seed)
    return label


# -- the benchmark reference -------------------------------------------------------------
def _speech_like(t: NDArray[np.float64], rng: np.random.Generator) -> NDArray[np.float64]:
    """Syllables of a harmonic voice: 120-220 Hz pitch, 3 formant-ish peaks, pauses."""
    n = t.size
    sr = 1.0 / (t[1] - t[0]) if n > 1 else 16000.0
    f0 = np.zeros(n)
    env = np.zeros(n)
    pos = 0.0
    end = t[-1] if n else 0.0
    while pos < end:
        length = rng.uniform(0.12, 0.3)
        a, b = np.searchsorted(t, [pos, pos + length])
        if b > a:
            u = np.linspace(0.0, 1.0, b - a)
            f0[a:b] = rng.uniform(120, 220) * (1.0 + rng.uniform(-0.15, 0.15) * u)
            env[a:b] = np.sin(np.pi * u) ** 2 * rng.uniform(0.5, 1.0)
        pos += length + (rng.uniform(0.3, 0.8) if rng.random() < 0.2 else rng.uniform(0.02, 0.08))
    phase = 2 * np.pi * np.cumsum(f0) / sr
    voice = np.zeros(n)
    for h in range(1, 16):
        fh = h * f0
        gain = sum(np.exp(-(((fh - c) / 250.0) ** 2)) for c in (500.0, 1500.0, 2500.0))
        voice += (gain + 0.05) / h * np.sin(h * phase)
    voice *= env
    peak = np.max(np.abs(voice)) if n else 1.0
    samples: NDArray[np.float64] = 0.5 * voice / (peak or 1.0) + rng.normal(0.0, 0.005, n)
    return samples


def make_reference_video(
    path: str | Path,
    *,
    duration_s: float = REFERENCE_DURATION_S,
    fps: float = 30.0,
    size: tuple[int, int] = (640, 360),
    gop: int = 60,
) -> Path:
    """The benchmark video: 60 s, 640x360, 30 fps H.264 (a keyframe every 60 frames = 2 s)
    with speech-like mono AAC at 16 kHz. Deterministic: two discs on Lissajous paths
    and a bar sweeping across a background that changes colour every 10 s."""
    width, height = size
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    scenes = []
    for s in range(int(np.ceil(duration_s / 10.0)) + 1):
        base = np.array([60 + 25 * s % 120, 90 + 40 * s % 100, 140 - 15 * s % 90], np.float32)
        grad = (xs / width)[..., None] * np.array([40, -20, 30], np.float32)
        scenes.append(np.clip(base + grad + 10 * np.sin(ys / 17.0)[..., None], 0, 255))
    scenes_u8: list[NDArray[np.uint8]] = [s.astype(np.uint8) for s in scenes]
    r = height * 0.12

    def frame_fn(i: int, t: float) -> NDArray[np.uint8]:
        img = scenes_u8[int(t // 10.0)].copy()
        bar = int((t * width / 4.0) % width)
        img[:, bar : bar + 12] = (240, 240, 240)
        for k, (col, fx, fy) in enumerate(
            (((220, 60, 40), 0.21, 0.33), ((40, 120, 230), 0.37, 0.17))
        ):
            cx = width * (0.5 + 0.38 * np.sin(2 * np.pi * fx * t + k))
            cy = height * (0.5 + 0.35 * np.sin(2 * np.pi * fy * t + 2 * k))
            x0, x1 = max(int(cx - r - 1), 0), min(int(cx + r + 2), width)
            y0, y1 = max(int(cy - r - 1), 0), min(int(cy + r + 2), height)
            d = np.hypot(xs[y0:y1, x0:x1] - cx, ys[y0:y1, x0:x1] - cy) - r
            alpha = np.clip(0.5 - d, 0.0, 1.0)[..., None]
            patch = img[y0:y1, x0:x1].astype(np.float32)
            img[y0:y1, x0:x1] = (
                patch + alpha * (np.asarray(col, np.float32) - patch) + 0.5
            ).astype(np.uint8)
        return img

    def audio_fn(t: NDArray[np.float64]) -> NDArray[np.float64]:
        return _speech_like(t, np.random.default_rng(1234))

    return write_video(
        path,
        duration_s=duration_s,
        fps=fps,
        size=size,
        frame_fn=frame_fn,
        audio_fn=audio_fn,
        gop=gop,
    )
