"""``hms-run VIDEO --explain FILE.png``: a contact sheet of one run (paper Fig. 5/6).

The sheet shows, for each of the T steps, a thumbnail of the step's frame (the frame
nearest the step centre, the one the appearance backbone sees) with a three-cell strip
under it: **A** audio (green: the audio path ran; grey without an audio track),
**I** appearance (blue when its backbone ran) and **M** motion (red when it ran); a cell
is light grey when that modality was skipped, and a step a budget never started is
greyed out. Thumbnails wrap after :data:`COLUMNS` per row, so T = 16 is one row and
T = 128 is eight. Below, a plot of the running prediction over the steps (the online
head after every step): the running top-1 probability, the final label's probability
where it was among the running top-k, and the GMAC spent so far (right axis).

The sheet is drawn into one RGB canvas (numpy) and shown with matplotlib, which keeps
T = 128 fast. :func:`write_contact_sheet` returns what it drew (:class:`ContactSheet`),
so a test can read the strip's pixels back and compare them with the record.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from hms_deploy.config import HMSConfig
from hms_deploy.data.frame_source import FrameSource
from hms_deploy.data.sampling import StepSampler
from hms_deploy.data.video import probe

COLUMNS = 16
THUMB_H = 72  # pixels; the width follows the video's aspect ratio (capped)
STRIP_H = 12
GAP = 6
TIERS = ("audio", "appearance", "motion")
ON = {"audio": (46, 139, 87), "appearance": (31, 119, 180), "motion": (214, 39, 40)}
OFF = (222, 222, 222)
NOT_RUN = (150, 150, 150)  # a step the run never reached (budget)


@dataclass
class ContactSheet:
    """What :func:`write_contact_sheet` drew.

    ``canvas``: (H, W, 3) uint8, the thumbnail grid; ``strip_pixels[tier][t]`` = (y, x),
    the centre of step t's cell for ``tier`` in ``canvas``; ``running_top1`` (steps,)
    and ``final_label_prob`` (steps,) float (NaN where not among the running top-k);
    ``gmac`` (steps,) cumulative GMAC; ``size_px`` = (width, height) of the PNG.
    """

    canvas: NDArray[np.uint8]
    strip_pixels: dict[str, list[tuple[int, int]]]
    running_top1: NDArray[np.float64]
    final_label_prob: NDArray[np.float64]
    gmac: NDArray[np.float64]
    size_px: tuple[int, int] = (0, 0)
    columns: int = COLUMNS
    rows: int = 0
    meta: dict[str, Any] = field(default_factory=dict)


def _thumbnails(video: str, config: HMSConfig, steps: int, width: int) -> list[NDArray[np.uint8]]:
    from PIL import Image

    with FrameSource(video) as src:  # probes the video and reads the probe's container
        sampler = StepSampler.from_config(src.info, config, steps=steps)
        idx = sampler.appearance_indices
        frames = src.read(idx)
    out = []
    for i in idx.tolist():
        img = Image.fromarray(frames[i]).resize((width, THUMB_H), Image.Resampling.BILINEAR)
        out.append(np.asarray(img, dtype=np.uint8))
    return out


def _thumb_width(video: str) -> int:
    info = probe(video)
    return int(min(2 * THUMB_H, max(THUMB_H // 2, round(THUMB_H * info.width / info.height))))


def build_canvas(
    thumbs: list[NDArray[np.uint8]], decisions: dict[str, list[int]], has_audio: bool, T: int
) -> tuple[NDArray[np.uint8], dict[str, list[tuple[int, int]]], int, int]:
    """The thumbnail grid with each step's A/I/M strip; (canvas, strip pixels, cols, rows)."""
    cols = min(T, COLUMNS)
    rows = math.ceil(T / cols)
    tw = thumbs[0].shape[1]
    cell_w, cell_h = tw + GAP, THUMB_H + STRIP_H + GAP
    canvas = np.full((rows * cell_h + GAP, cols * cell_w + GAP, 3), 255, np.uint8)
    done = len(decisions["appearance"])
    pixels: dict[str, list[tuple[int, int]]] = {k: [] for k in TIERS}
    third = tw // 3
    for t in range(T):
        r, c = divmod(t, cols)
        y0, x0 = GAP + r * cell_h, GAP + c * cell_w
        thumb = thumbs[t]
        if t >= done:  # never reached: washed out
            thumb = (0.35 * thumb + 0.65 * 255).astype(np.uint8)
        canvas[y0:y0 + THUMB_H, x0:x0 + tw] = thumb
        ys = y0 + THUMB_H + 1
        ran = {
            "audio": t < done and has_audio,
            "appearance": t < done and bool(decisions["appearance"][t]),
            "motion": t < done and bool(decisions["motion"][t]),
        }
        for k, tier in enumerate(TIERS):
            xs = x0 + k * third
            xe = x0 + tw if k == 2 else xs + third - 1
            colour = ON[tier] if ran[tier] else (NOT_RUN if t >= done else OFF)
            canvas[ys:ys + STRIP_H - 2, xs:xe] = colour
            pixels[tier].append((ys + (STRIP_H - 2) // 2, (xs + xe) // 2))
    return canvas, pixels, cols, rows


def _series(record: dict[str, Any], partials: list[dict[str, Any]]) -> tuple[NDArray[np.float64], ...]:
    label = record["label"]
    top1 = np.array([p["score"] for p in partials], dtype=np.float64)
    final = np.array(
        [next((s for lbl, s in p["topk"] if lbl == label), np.nan) for p in partials],
        dtype=np.float64,
    )
    gmac = np.array([p["gflops"]["used"] for p in partials], dtype=np.float64)
    return top1, final, gmac


def write_contact_sheet(
    out: str | Path, record: dict[str, Any], partials: list[dict[str, Any]], config: HMSConfig,
    *, dpi: int = 100,
) -> ContactSheet:
    """Draw the sheet of one run to ``out`` (PNG).

    ``record``: the final record; ``partials``: its online partial records, one per
    processed step, in order (``hms-run --explain`` runs the head after every step).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = int(record["T"])
    video = record["video"]
    thumbs = _thumbnails(video, config, T, _thumb_width(video))
    canvas, pixels, cols, rows = build_canvas(
        thumbs, record["decisions"], bool(record["has_audio"]), T
    )
    top1, final, gmac = _series(record, partials)
    h_grid, w_grid = canvas.shape[0] / dpi, canvas.shape[1] / dpi
    plot_h = 3.2  # inches: legend line + plot + axis labels
    fig = plt.figure(figsize=(max(w_grid, 8.0), h_grid + plot_h + 0.5), dpi=dpi)
    gs = fig.add_gridspec(2, 1, height_ratios=[h_grid, plot_h], hspace=0.12,
                          left=0.06, right=0.92, top=1 - 0.5 / (h_grid + plot_h + 0.5),
                          bottom=0.5 / (h_grid + plot_h + 0.5))
    ax = fig.add_subplot(gs[0])
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    tw = thumbs[0].shape[1]
    for t in range(T):
        r, c = divmod(t, cols)
        ax.text(GAP + c * (tw + GAP) + 2, GAP + r * (THUMB_H + STRIP_H + GAP) + 2, str(t),
                fontsize=6, color="white", va="top",
                bbox={"facecolor": "black", "alpha": 0.5, "pad": 0.5, "linewidth": 0})
    g = record["gflops"]
    title = (f"{Path(video).name}: {record['label']} ({record['score']:.3f})   policy "
             f"{record['policy']}   steps {record['steps']}/{T}   appearance "
             f"{record['usage']['appearance']}, motion {record['usage']['motion']}   "
             f"{g['used']:.4g}/{g['dense']:.4g} {g['unit']}")
    notes = ([f"fallback: {record['fallback']}"] if record.get("fallback") else []) + list(
        record.get("warnings", []))
    ax.set_title(title + ("\n" + "; ".join(notes) if notes else ""), fontsize=9)
    pax = fig.add_subplot(gs[1])
    pax.set_title("strip under each frame: A audio (green), I appearance (blue), M motion "
                  "(red); light grey = skipped, dark grey = step not reached", fontsize=7)
    steps = np.arange(len(top1))
    pax.plot(steps, top1, color="black", lw=1.2, label="running top-1 probability")
    pax.plot(steps, final, color="tab:purple", lw=1.2, ls="--",
             label=f"p({record['label']}) (final label)")
    pax.set_xlim(-0.5, T - 0.5)
    pax.set_ylim(0, 1)
    pax.set_xlabel("step")
    pax.set_ylabel("probability")
    gax = pax.twinx()
    gax.plot(steps, gmac, color="tab:orange", lw=1.2, label="GMAC spent")
    gax.set_ylabel("GMAC spent (cumulative)")
    gax.set_ylim(0, max(float(gmac.max()) if gmac.size else 0.0, 1e-9) * 1.05)
    lines = pax.get_lines() + gax.get_lines()
    pax.legend(lines, [str(ln.get_label()) for ln in lines], fontsize=7, loc="upper left")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    size = fig.canvas.get_width_height()
    plt.close(fig)
    return ContactSheet(canvas, pixels, top1, final, gmac, (int(size[0]), int(size[1])),
                        cols, rows, {"video": video, "T": T})
