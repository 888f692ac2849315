"""``hms-run``: classify videos with an export (ONNX Runtime / TensorRT) or a checkpoint.

A thin layer over :class:`hms_deploy.runtime.session.Session`: it expands the inputs,
validates the options (one-line errors before any video runs), prints a record per video
(``--json``: the JSON line; otherwise a short summary) and appends to ``--output``.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import click

from hms_deploy.cli.common import debug_option, handle_errors, ray_layout, ray_options
from hms_deploy.errors import ConfigError

VIDEO_EXTENSIONS = frozenset(
    [".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".mts", ".m2ts", ".flv", ".wmv", ".3gp", ".ogv"]
)
PROGRESS_MIN_INPUTS = 20  # show progress on a non-TTY stderr only for this many videos


def expand_inputs(items: tuple[str, ...]) -> list[str]:
    """Files as given; directories recursively (video extensions, sorted); ``@list.txt``.

    A list file has one path a line (blank lines and lines starting with ``#`` are
    skipped); relative paths are relative to the current directory. A named file that
    does not exist stays in the list (it becomes that video's error line).
    """
    out: list[str] = []
    for item in items:
        if item.startswith("@"):
            lst = Path(item[1:])
            if not lst.is_file():
                raise ConfigError(f"list file '{lst}' not found")
            for line in lst.read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    out.extend(expand_inputs((line,)) if Path(line).is_dir() else [line])
        elif Path(item).is_dir():
            found = sorted(
                str(p) for p in Path(item).rglob("*")
                if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file()
            )
            if not found:
                raise ConfigError(
                    f"directory '{item}' holds no video files ({' '.join(sorted(VIDEO_EXTENSIONS))})"
                )
            out.extend(found)
        else:
            out.append(item)
    return out


def strip(decisions: dict[str, list[int]]) -> str:
    """One character per step: '.' audio only, 'i' appearance, 'M' motion (+ appearance)."""
    return "".join(
        "M" if m else ("i" if a else ".")
        for a, m in zip(decisions["appearance"], decisions["motion"])
    )


def summary(rec: dict) -> str:
    """A short human summary of one record (three lines; one for a partial record)."""
    if rec.get("partial"):
        return (f"{rec['video']} [{rec['steps']}/{rec['T']}]: {rec['label']} ({rec['score']:.3f}) "
                f"{strip(rec['decisions'])}")
    g = rec["gflops"]
    t = rec["timing_ms"]
    head = (
        f"{rec['video']}: {rec['label']} ({rec['score']:.3f})  steps {rec['steps']}/{rec['T']}, "
        f"appearance {rec['usage']['appearance']}, motion {rec['usage']['motion']}, "
        f"{g['used']:.4g}/{g['dense']:.4g} {g['unit']}, {t['total']:.0f} ms"
        + ("" if rec["has_audio"] else ", no audio")
    )
    top = "  top: " + ", ".join(f"{label} {p:.3f}" for label, p in rec["topk"])
    return f"{head}\n{top}\n  A/I/M: {strip(rec['decisions'])}"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("videos", nargs=-1, required=True)
@click.option("--engines", "engines_dir", type=click.Path(path_type=Path), default=None,
              help="Export directory from hms-export (default: engines/).")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Run a checkpoint with the torch engine instead of an export.")
@click.option("--engine", type=click.Choice(["torch", "onnx", "trt"]), default=None,
              help="Backend (default: onnx, or torch with --checkpoint).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--steps", type=int, default=None, help="Steps T (default: the model's).")
@click.option("--budget-gflops", "--budget-gmacs", "budget", type=float, default=None,
              help="Per-video budget in GMAC (the paper's 'GFLOPs').")
@click.option("--policy", default="learned", show_default=True,
              help="learned | dense | audio-only | every:KI[,KM] | rates:PI,PM[,SEED].")
@click.option("--online", is_flag=True, help="Run the head after every step; print partial results.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line on stdout.")
@click.option("--output", type=click.Path(path_type=Path), default=None,
              help="Append one JSON line per video here; on rerun, finished videos are skipped.")
@click.option("--topk", type=int, default=5, show_default=True, help="How many classes to report.")
@click.option("--batch-size", type=int, default=1, show_default=True,
              help="Videos stepped in lockstep (each skips on its own).")
@click.option("--progress/--no-progress", default=None,
              help=f"Progress bar on stderr (default: if stderr is a terminal or >= "
                   f"{PROGRESS_MIN_INPUTS} videos).")
@ray_options
@debug_option
@handle_errors("hms-run")
def main(videos, engines_dir, checkpoint, engine, device, steps, budget, policy, online,
         as_json, output, topk, batch_size, progress, ray, ray_address, workers,
         threads_per_worker, debug):
    """Classify VIDEO files (or directories, or @list.txt) with HMS, skipping for real."""
    from hms_deploy.runtime.results import ResultsFile
    from hms_deploy.runtime.session import Session

    names = expand_inputs(videos)
    if not names:
        raise ConfigError("no videos given")
    if engine == "torch" and checkpoint is None:
        raise ConfigError("--engine torch needs --checkpoint ckpt.pt")
    if checkpoint is not None and engine in ("onnx", "trt"):
        raise ConfigError(
            f"--engine {engine} runs an export dir (--engines DIR); export the checkpoint "
            "first with `hms-export --checkpoint CK`, or use --engine torch"
        )
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    layout = ray_layout(ray, ray_address, workers, threads_per_worker)
    if layout is not None and (online or batch_size > 1):
        raise ConfigError("--ray runs whole videos on each worker: drop --online / --batch-size")
    session = Session(engines_dir=engines_dir, checkpoint=checkpoint, engine=engine, device=device)
    opts = session.options(steps=steps, policy=policy, budget=budget, online=online, topk=topk)

    results = ResultsFile(output) if output is not None else None
    todo = [v for v in names if results is None or not results.done(v)]
    skipped = len(names) - len(todo)
    if skipped:
        click.echo(f"hms-run: {skipped} video(s) already in {output}, skipped", err=True)
    if progress is None:
        progress = sys.stderr.isatty() or len(todo) >= PROGRESS_MIN_INPUTS
    failed = 0
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="video", file=sys.stderr, dynamic_ncols=True)
    if layout is not None:  # Ray Data actor pool: records as they finish, same loop below
        from hms_deploy.runtime.ray_batch import classify_ray

        records = classify_ray(todo, engines_dir=engines_dir, checkpoint=checkpoint,
                               engine=engine, device=device, steps=steps, policy=policy,
                               budget=budget, topk=topk, layout=layout)
    else:
        records = session.classify_many(todo, options=opts, batch_size=batch_size)
    try:
        with session if layout is None else contextlib.nullcontext():
            for rec in records:
                partial = rec.get("partial", False)
                if "error" in rec:
                    failed += 1
                if as_json:
                    line = json.dumps(rec, separators=(", ", ": "))
                    (bar.write(line, file=sys.stdout) if bar else click.echo(line))
                elif "error" in rec:
                    msg = f"hms-run: error: {rec['video']}: {rec['error']}"
                    (bar.write(msg, file=sys.stderr) if bar else click.echo(msg, err=True))
                else:
                    text = summary(rec)
                    (bar.write(text, file=sys.stdout) if bar else click.echo(text))
                if not partial:
                    if results is not None:
                        results.append(rec)
                    if bar is not None:
                        bar.set_postfix(failed=failed, refresh=False)
                        bar.update(1)
                sys.stdout.flush()
    finally:
        if bar is not None:
            bar.close()
        if results is not None:
            results.close()
    if failed:
        click.echo(f"hms-run: {failed} of {len(todo)} video(s) failed", err=True)
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
