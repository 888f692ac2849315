"""PNG figures of an ``hms-eval`` result (matplotlib, Agg backend; no display needed).

- ``cost_vs_map.png`` (paper Fig. 3): the test-time budget curve (mean GMAC/video used
  vs mAP) with the unbudgeted HMS point and any compared results (e.g. early fusion);
- ``motion_usage_per_class.png`` (Fig. 4): fraction of steps that ran motion, per class;
- ``usage_heatmap.png`` (Fig. 6): per-step decisions of sample videos (audio only /
  + appearance / + motion).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

GROUP_COLOURS = {"audio": "tab:green", "appearance": "tab:orange", "motion": "tab:blue"}


def _plt() -> ModuleType:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def cost_vs_map(result: dict[str, Any], path: Path, compare: Sequence[dict[str, Any]] = ()) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    curve = result.get("budget_curve") or []
    if curve:
        xs = [c["gmacs_per_video"] for c in curve]
        ys = [100 * c["map"] for c in curve]
        ax.plot(xs, ys, "o-", color="tab:red", label="HMS, test-time budget")
    ax.plot([result["gmacs_per_video"]], [100 * result["map"]], "*", ms=14, color="tab:red",
            label=f"{result.get('name', 'HMS')} (no budget)")
    markers = "sD^vP"
    for k, other in enumerate(compare):
        ax.plot([other["gmacs_per_video"]], [100 * other["map"]], markers[k % len(markers)],
                ms=9, label=other.get("name", other.get("policy", f"compare {k}")))
    ax.set_xscale("log")
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("GMAC per video (log scale)")
    ax.set_ylabel("mAP (%)")
    ax.set_title("Computational cost vs mAP")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def percent_ylim(values: Sequence[float]) -> tuple[float, float]:
    """y range of a percentage bar chart: 0 to 10 % above the tallest bar, at least 0..5 %
    (matplotlib's automatic range is -0.04..0.04 when every bar is 0)."""
    top = max((float(v) for v in values), default=0.0)
    return 0.0, min(100.0, max(5.0, 1.1 * top))


def motion_usage_per_class(result: dict[str, Any], path: Path,
                           groups: dict[str, str] | None = None) -> Path:
    """Fig. 4; when no class used motion, the chart says so instead of showing no bars."""
    plt = _plt()
    per = result["usage_per_class"]
    names = sorted(per, key=lambda n: per[n]["motion"], reverse=True)
    fig, ax = plt.subplots(figsize=(max(5, 0.45 * len(names) + 2), 4))
    colours = [GROUP_COLOURS.get((groups or {}).get(n, ""), "tab:blue") for n in names]
    values = [100 * per[n]["motion"] for n in names]
    ax.bar(range(len(names)), values, color=colours)
    ax.set_ylim(*percent_ylim(values))
    if not any(values):
        ax.text(0.5, 0.5, "motion never ran on these videos", transform=ax.transAxes,
                ha="center", va="center", fontsize=10, color="0.3")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("steps running motion (%)")
    ax.set_title("Motion usage per class")
    if groups:
        from matplotlib.patches import Patch

        present = sorted({groups[n] for n in names if n in groups})
        ax.legend(handles=[Patch(color=GROUP_COLOURS.get(g, "grey"), label=f"{g} group")
                           for g in present], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def usage_heatmap(result: dict[str, Any], path: Path) -> Path:
    import numpy as np
    from matplotlib.colors import ListedColormap

    plt = _plt()
    samples = result["samples"]
    grid = np.array([[a + m for a, m in zip(s["appearance"], s["motion"])] for s in samples])
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(samples) + 1.5))
    cmap = ListedColormap(["#e8e8e8", "tab:orange", "tab:blue"])
    ax.imshow(grid, aspect="auto", cmap=cmap, vmin=0, vmax=2, interpolation="nearest")
    ax.set_yticks(range(len(samples)))
    ax.set_yticklabels([f"{s['label']} -> {s['predicted']}" for s in samples], fontsize=7)
    ax.set_xlabel("step")
    ax.set_title("Per-step modality use (grey: audio, orange: +appearance, blue: +motion)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_plots(result: dict[str, Any], out_dir: Path, compare: Sequence[dict[str, Any]] = (),
                groups: dict[str, str] | None = None) -> list[Path]:
    """All figures that apply to ``result`` (baselines get only the cost plot)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [cost_vs_map(result, out_dir / "cost_vs_map.png", compare)]
    if result.get("usage_per_class"):
        paths.append(motion_usage_per_class(result, out_dir / "motion_usage_per_class.png", groups))
    if result.get("samples"):
        paths.append(usage_heatmap(result, out_dir / "usage_heatmap.png"))
    return paths
