"""``hms-run``: classify videos with an export (ONNX Runtime / TensorRT) or a checkpoint.

A thin layer over :class:`hms_deploy.runtime.session.Session`: it expands the inputs,
validates the options (one-line errors before any video runs), prints a record per video
(``--json``: the JSON line; otherwise a short summary) and appends to ``--output``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from hms_deploy.cli.batch import (
    PROGRESS_MIN_INPUTS,
    JobOptions,
    lock_output_or_exit,
    run_job,
    warn,
)
from hms_deploy.cli.common import (
    debug_option,
    given,
    handle_errors,
    ray_layout,
    ray_options,
    setting_default,
    settings_from_flags,
)
from hms_deploy.cli.inputs import expand, expand_inputs
from hms_deploy.errors import ConfigError
from hms_deploy.runtime.checks import DEFAULT_NO_AUDIO_POLICY
from hms_deploy.runtime.engines import BACKENDS, DEFAULT_DEVICE

NO_AUDIO_HELP = (
    "Policy for videos without an audio track when the gates would decide (they need "
    "audio): any --policy value, or 'error' to refuse such videos "
    f"(default {DEFAULT_NO_AUDIO_POLICY}: appearance on every step, motion by its gate)."
)

__all__ = ["expand_inputs", "main", "strip", "summary"]


def strip(decisions: dict[str, list[int]]) -> str:
    """One character per step: '.' audio only, 'i' appearance, 'M' motion (+ appearance)."""
    return "".join(
        "M" if m else ("i" if a else ".")
        for a, m in zip(decisions["appearance"], decisions["motion"])
    )


def summary(rec: dict[str, Any]) -> str:
    """A short human summary of one record (three lines, plus one per warning; one line
    for a partial record)."""
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
    warn = "".join(f"\n  warning: {w}" for w in rec.get("warnings", []))
    return f"{head}\n{top}\n  A/I/M: {strip(rec['decisions'])}{warn}"


def open_session(session_cls: type, kwargs: dict[str, Any]) -> Any:
    """The Session of the options; a file given as the export dir gets a command that works."""
    try:
        return session_cls(**kwargs)
    except ConfigError as e:
        d = e.value
        if e.setting == "engines_dir" and isinstance(d, Path) and d.is_file():
            raise ConfigError(
                f"--engines expects an export directory, but '{d}' is a file; run a checkpoint "
                f"with --checkpoint {d}, or export it first with `hms-export --checkpoint {d} "
                "--out engines/`") from e
        raise


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("videos", nargs=-1, required=True)
@click.option("--engines", "engines_dir", type=click.Path(path_type=Path), default=None,
              help="Export directory from hms-export (default: engines/).")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Run a checkpoint with the torch engine instead of an export.")
@click.option("--engine", type=click.Choice(BACKENDS), default=None,
              help="Backend (default: onnx, or torch with --checkpoint).")
@click.option("--device", default=None, help=f"cpu, cuda or cuda:N. [default: {DEFAULT_DEVICE}]")
@click.option("--steps", type=int, default=None, help="Steps T (default: the model's).")
@click.option("--budget-gflops", "--budget-gmacs", "budget", type=float, default=None,
              help="Per-video budget in GMAC (the paper's 'GFLOPs').")
@click.option("--policy", default=str(setting_default("policy")), show_default=True,
              help="learned | dense | audio-only | dense-appearance | every:KI[,KM] | "
                   "rates:PI,PM[,SEED].")
@click.option("--no-audio-policy", default=None, metavar="POLICY|error", help=NO_AUDIO_HELP)
@click.option("--allow-truncated", is_flag=True,
              help="Classify the decodable part of a truncated file (with a warning) instead "
                   "of failing it.")
@click.option("--explain", type=click.Path(dir_okay=False, path_type=Path), default=None,
              metavar="FILE.png",
              help="Write a contact sheet of the run (one video): each step's frame, which "
                   "modalities ran, the running prediction and the GMAC spent. Runs the head "
                   "after every step, as --online.")
@click.option("--online", is_flag=True, help="Run the head after every step; print partial results.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line on stdout.")
@click.option("--output", type=click.Path(path_type=Path), default=None,
              help="One JSON line per video (crash-safe, locked). A rerun skips videos whose "
                   "file and settings are unchanged and replaces the other records.")
@click.option("--output-mode", type=click.Choice(["resume", "new", "overwrite"]),
              default="resume", show_default=True,
              help="If --output holds records made with other settings, resume refuses; new "
                   "writes NAME.1.jsonl (the first free name); overwrite starts it over.")
@click.option("--topk", type=int, default=setting_default("topk"), show_default=True,
              help="How many classes to report.")
@click.option("--batch-size", type=int, default=setting_default("batch_size"), show_default=True,
              help="Videos stepped in lockstep (each skips on its own).")
@click.option("--progress/--no-progress", default=None,
              help=f"Progress bar on stderr (default: if stderr is a terminal or >= "
                   f"{PROGRESS_MIN_INPUTS} videos).")
@ray_options
@debug_option
@handle_errors("hms-run")
def main(videos: tuple[str, ...], engines_dir: Path | None, checkpoint: Path | None,
         engine: str | None, device: str | None, steps: int | None, budget: float | None, policy: str,
         no_audio_policy: str | None, allow_truncated: bool, explain: Path | None, online: bool,
         as_json: bool, output: Path | None, output_mode: str, topk: int, batch_size: int,
         progress: bool | None, ray: bool, ray_address: str | None, workers: int | None,
         threads_per_worker: int | None, debug: bool) -> None:
    """Classify VIDEO files (or directories, or @list.txt) with HMS, skipping for real.

    Directories are scanned recursively (symlinked sub-directories followed, loops
    skipped with a warning); the same file given twice is classified once.

    \b
    Exit codes:
      0    every input has a result (now, or already in --output)
      1    the run completed and some inputs failed (each has an error record)
      2    usage error
      3    the run stopped (or could not start) before attempting every input:
           --output locked by another run, not writable, made with other settings,
           disk full, an engine failure; the message says how many were not attempted
      130  interrupted (SIGINT); 143 terminated (SIGTERM). --output stays valid: rerun
           with the same arguments to resume.
    """
    from hms_deploy.runtime.session import Session

    # every run setting is checked here, by RunSettings itself, before anything is loaded
    settings = settings_from_flags(online=online or explain is not None)
    layout = ray_layout(ray, ray_address, workers, threads_per_worker)
    if layout is not None:
        if explain is not None:
            raise ConfigError("--ray runs whole videos on each worker: drop --explain")
        settings.require_whole_videos()
    inputs = expand(videos)
    if not inputs.total:
        for w in inputs.warnings:
            warn(w)
        raise ConfigError("no videos given")
    if explain is not None and inputs.total != 1:
        raise ConfigError(f"--explain draws one video's run, got {inputs.total} videos")
    options = {}
    if engine == "trt":  # plans missing from DIR are built once on first use (docs/export.md)
        from hms_deploy.export import add_trt_plans

        options["build_plans"] = add_trt_plans
    # the output's lock before the model loads: a second writer refuses at once
    lock = None if output is None else lock_output_or_exit(output, output_mode, inputs.total)
    if lock is not None:  # released at the end even if the model fails to load
        click.get_current_context().call_on_close(lock.release)
    session_kwargs = {"engines_dir": engines_dir, "checkpoint": checkpoint, "engine": engine,
                      **given(device=device), **options}
    session = open_session(Session, session_kwargs)
    opts = session.options(settings)
    explained: list[dict[str, Any]] = []  # with --explain: the partial records, then the final one
    job = JobOptions(output=output, output_mode=output_mode, as_json=as_json, progress=progress,
                     debug=debug, show_partial=online,
                     collect=explained if explain is not None else None, lock=lock)
    if layout is not None:  # Ray Data actor pool: the same job, records from the actors
        from hms_deploy.runtime.ray_batch import ray_records

        job.records = ray_records(session_kwargs, opts, layout)
    code = run_job(session, opts, inputs, job, summary)
    if explain is not None and explained and not explained[-1].get("partial"):  # filled only with --explain
        from hms_deploy.runtime.explain import write_contact_sheet

        sheet = write_contact_sheet(explain, explained[-1], explained[:-1],
                                    session.engine_set.config)
        click.echo(f"hms-run: wrote {explain} ({sheet.size_px[0]}x{sheet.size_px[1]} px)", err=True)
    if code:
        sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
