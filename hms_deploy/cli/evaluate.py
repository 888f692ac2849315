"""``hms-eval``: mAP, top-1, GMAC/video, usage per class and the budget curve; JSON + PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import click

from hms_deploy.cli.common import debug_option, given, handle_errors, set_threads


def _budgets(text: str | None) -> list[float] | None:
    if text is None:
        return None
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            b = float(part)
        except ValueError:
            raise click.BadParameter(f"{part!r} is not a number", param_hint="--budgets") from None
        if not b > 0:
            raise click.BadParameter(f"budgets must be > 0 GMAC, got {part}",
                                     param_hint="--budgets")
        out.append(b)
    return out


def _read_json(path: Path, what: str) -> dict[str, Any]:
    from hms_deploy.errors import DatasetError

    try:
        data: dict[str, Any] = json.loads(Path(path).read_text())
        return data
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: cannot read {what} ({e})") from None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--store", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Feature store (extracted with the checkpoint's backbones).")
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Trained HMS or early-fusion checkpoint.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory for eval.json and the PNG plots (default: print the JSON on "
                   "stdout, the summary on stderr).")
@click.option("--budgets", default=None,
              help="Comma-separated GMAC budgets per video for the budget curve "
                   "(default: 8 from 5% of the mean unbudgeted cost to the largest per-video cost; "
                   "'inf' is always added).")
@click.option("--interpolated", is_flag=True,
              help="ActivityNet interpolated AP instead of scikit-learn's non-interpolated AP.")
@click.option("--compare", type=click.Path(dir_okay=False, path_type=Path), multiple=True,
              help="eval.json of another model (e.g. early fusion) to add to the cost plot.")
@click.option("--groups", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSON {class: group} (e.g. the synthetic groups.json): usage per group.")
@click.option("--samples", "sample_videos", type=int, default=None,
              help="Videos in the per-step usage heat map. [default: 12]")
@click.option("--threads", type=int, default=None,
              help="torch intra-op threads (default: torch's choice).")
@debug_option
@handle_errors("hms-eval")
def main(
    store: Path,
    checkpoint: Path,
    out: Path | None,
    budgets: str | None,
    interpolated: bool,
    compare: tuple[Path, ...],
    groups: Path | None,
    sample_videos: int | None,
    threads: int | None,
    debug: bool,
) -> None:
    """Evaluate a checkpoint on a feature store (GMAC = multiply-accumulates, the paper's GFLOPs)."""
    from hms_deploy.checkpoint import load_checkpoint
    from hms_deploy.data.features import open_store
    from hms_deploy.eval.evaluate import check_evaluate_settings, evaluate

    check_evaluate_settings(**given(sample_videos=sample_videos))
    set_threads(threads)
    budget_list = _budgets(budgets)  # option errors (exit 2) before anything is loaded
    group_map = _read_json(groups, "groups") if groups else None
    others = [_read_json(p, "--compare result") for p in compare]
    result = evaluate(load_checkpoint(checkpoint), open_store(store), budgets=budget_list,
                      interpolated=interpolated, groups=group_map,
                      **given(sample_videos=sample_videos))
    result["checkpoint"] = str(checkpoint)
    text = json.dumps(result, indent=2)
    if out is not None:
        from hms_deploy.eval.plots import write_plots

        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(text)
        write_plots(result, out, others, group_map)
    kind = "AP (interpolated)" if interpolated else "AP"
    to_stderr = out is None  # stdout is the JSON alone, as --help says
    click.echo(
        f"{result['name']}: m{kind} {100 * result['map']:.2f}% over "
        f"{len(result['labels']) - result['n_classes_excluded']} classes "
        f"({result['n_classes_excluded']} without positives excluded), top-1 "
        f"{100 * result['top1']:.2f}%, {result['gmacs_per_video']:.4g} GMAC/video "
        f"(dense {result['dense_gmacs_per_video']:.4g}), {result['videos']} videos",
        err=to_stderr,
    )
    for point in result.get("budget_curve", []):
        b = point["budget"]
        click.echo(f"  budget {'inf' if b is None or math.isinf(b) else f'{b:.4g}'} GMAC: "
                   f"mAP {100 * point['map']:.2f}%, used {point['gmacs_per_video']:.4g} GMAC/video, "
                   f"{point['mean_steps']:.1f} steps", err=to_stderr)
    if out is None:
        click.echo(text)
    else:
        click.echo(f"wrote {out / 'eval.json'} and plots")
