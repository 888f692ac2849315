"""``hms-bench``: measured latency and throughput (the scripts in ``benchmarks/``).

``hms-bench`` runs the end-to-end benchmark (HMS policies vs dense stepped, dense
batched and compute-then-mask on the reference video); ``--suite parts`` the per-part
latency per backend; ``--suite all`` both; ``--suite decode`` the decode work of an HMS
run vs decoding every frame (a generated 2-minute 720p long-GOP file); ``--suite
throughput`` videos/s over a set of videos one by one, in lockstep and on a Ray Data actor
pool (``benchmarks/bench_throughput.py``). ``--smoke`` is the seconds-long CI mode
(tiny variant, 8 steps, a 6 s video). The benchmark scripts live in the source tree's
``benchmarks/`` folder (results are committed there), so this command runs from a
source checkout (an editable install), like ``python -m benchmarks.bench_e2e``.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import click

from hms_deploy.cli.common import debug_option, given, handle_errors
from hms_deploy.errors import ConfigError


def _bench_module(name: str) -> ModuleType:
    """``benchmarks.<name>`` from the source tree this hms_deploy was installed from."""
    root = Path(__file__).resolve().parents[2]  # <root>/hms_deploy/cli/bench.py
    if not (root / "benchmarks" / f"{name}.py").is_file():
        raise ConfigError(
            f"hms-bench needs the source tree's benchmarks/ folder (looked in {root}); run it "
            "from an editable install of a checkout (pip install -e .)"
        )
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(f"benchmarks.{name}")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--suite",
              type=click.Choice(["e2e", "parts", "throughput", "all", "serve", "decode"]),
              default="e2e", show_default=True,
              help="End-to-end, per-part, or both (all); serve: hms-serve vs hms-run; "
                   "throughput: sequential vs lockstep vs Ray Data over --throughput-videos "
                   "copies; decode: HMS decode vs full decode (720p).")
@click.option("--variant", type=click.Choice(["paper", "tiny"]), default=None,
              help="Model variant (default paper; tiny with --smoke).")
@click.option("--engine", type=click.Choice(["onnx", "torch", "trt"]), default=None,
              help="e2e: the engines every run uses (default onnx).")
@click.option("--backends", default=None,
              help="parts: comma-separated backends (default torch,onnx,trt where available).")
@click.option("--device", default=None, help="cpu (default), cuda or cuda:N.")
@click.option("--steps", type=int, default=None, help="e2e: steps T (default 128; 8 with --smoke).")
@click.option("--repeats", type=int, default=None,
              help="Repeats of the cheap runs (e2e default 5) / per part case (default 10).")
@click.option("--heavy-repeats", type=int, default=None,
              help="e2e: repeats of runs costing > 25% of dense GMAC (default 3).")
@click.option("--batch", type=int, default=None,
              help="e2e: steps per backbone call of the batched baselines (default 4).")
@click.option("--throughput-videos", type=int, default=None,
              help="e2e: copies of the video for the throughput figures (default 4).")
@click.option("--throughput-repeats", type=int, default=None,
              help="e2e: repeats of each throughput figure (default 1).")
@click.option("--video", type=click.Path(dir_okay=False), default=None,
              help="e2e: the video (default: the reference video, generated once).")
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
              help="Checkpoint (default: an untrained one of the variant, made once).")
@click.option("--engines", "engines_dir", type=click.Path(file_okay=False), default=None,
              help="Export dir (default: the checkpoint exported once).")
@click.option("--work-dir", type=click.Path(file_okay=False), default=None,
              help="Cache for generated media and models (default benchmarks/media).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Results dir (default benchmarks/results; benchmarks/media/smoke with --smoke).")
@click.option("--name", default=None, help="Results file stem.")
@click.option("--smoke", is_flag=True, default=False,
              help="Seconds-long: tiny variant, few steps, one repeat (what CI runs).")
@click.option("--no-plot", is_flag=True, default=False, help="e2e: skip the PNG.")
@click.option("--threads", type=int, default=None,
              help="Intra-op threads per ORT session and for torch (default: all usable cores).")
@click.option("--ort-spinning", type=click.Choice(["on", "off"]), default=None,
              help="e2e experiment: force ONNX Runtime intra-op spinning (default: the backend's).")
@click.option("--soak", type=int, default=None,
              help="serve: a soak of N requests (10% bad) from 8 clients instead, with RSS "
                   "at each 25% (benchmarks/bench_soak.py).")
@click.option("--soak-max-s", type=float, default=None,
              help="serve --soak: send no new request after this many seconds (default 3600).")
@debug_option
@handle_errors("hms-bench")
def main(
    suite: str,
    variant: str | None,
    engine: str | None,
    backends: str | None,
    device: str | None,
    steps: int | None,
    repeats: int | None,
    heavy_repeats: int | None,
    batch: int | None,
    throughput_videos: int | None,
    throughput_repeats: int | None,
    video: str | None,
    checkpoint: str | None,
    engines_dir: str | None,
    work_dir: str | None,
    out: str | None,
    name: str | None,
    smoke: bool,
    no_plot: bool,
    threads: int | None,
    ort_spinning: str | None,
    soak: int | None,
    soak_max_s: float | None,
    debug: bool,
) -> None:
    """Measure HMS against dense and compute-then-mask baselines; write JSON, Markdown, PNG."""
    common: dict[str, Any] = {
        "variant": variant, "device": device, "checkpoint": checkpoint, "threads": threads,
        "engines_dir": engines_dir, "work_dir": work_dir, "out": out, "name": name,
    }
    common = given(**common)
    for opt, value in (("--steps", steps), ("--repeats", repeats), ("--batch", batch),
                       ("--heavy-repeats", heavy_repeats),
                       ("--throughput-videos", throughput_videos),
                       ("--throughput-repeats", throughput_repeats), ("--threads", threads)):
        if value is not None and value < (0 if opt == "--throughput-videos" else 1):
            raise ConfigError(f"{opt} must be >= 1, got {value}")
    if soak is not None and (suite != "serve" or soak < 1):
        raise ConfigError(f"--soak N needs --suite serve and N >= 1, got --suite {suite} --soak {soak}")
    if suite == "decode":
        dec = _bench_module("bench_decode")
        dec.run(dec.DecodeSettings(**given(video=video, steps=steps, repeats=repeats, out=out,
                                           name=name)), log=click.echo)
        return
    if suite in ("e2e", "all"):
        e2e = _bench_module("bench_e2e")
        kw = {**common, **given(engine=engine, steps=steps, repeats=repeats,
                                heavy_repeats=heavy_repeats, batch=batch,
                                throughput_videos=throughput_videos,
                                throughput_repeats=throughput_repeats, video=video)}
        if no_plot:
            kw["plot"] = False
        if ort_spinning is not None:
            kw["ort_spinning"] = ort_spinning == "on"
        if suite == "all" and name:
            kw["name"] = f"{name}_e2e"
        if smoke:
            kw.setdefault("out", str(Path(e2e.MEDIA_DIR) / "smoke"))
            settings = e2e.smoke_settings(**kw)
        else:
            settings = e2e.E2ESettings(**kw)
        e2e.run(settings, log=click.echo)
    if suite == "serve" and soak is not None:
        sk = _bench_module("bench_soak")
        kw = {k: v for k, v in common.items() if k in ("threads", "work_dir", "out", "name")}
        kw.update(given(steps=steps, video=video, variant=variant, max_s=soak_max_s))
        sk.run(sk.SoakSettings(requests=soak, **kw), log=click.echo)
    elif suite == "serve":
        _serve_suite(variant, steps, smoke, common, video)
    if suite == "throughput":
        tp = _bench_module("bench_throughput")
        kw = {k: v for k, v in common.items() if k not in ("threads",)}
        kw.update(given(engine=engine, steps=steps, videos=throughput_videos,
                        hms_repeats=throughput_repeats, video=video))
        if smoke:
            kw.setdefault("out", str(Path(tp.MEDIA_DIR) / "smoke"))
        tp.run(tp.smoke_settings(**kw) if smoke else tp.ThroughputSettings(**kw),
               log=click.echo)
    if suite in ("parts", "all"):
        parts = _bench_module("bench_parts")
        kw = {**common, **given(repeats=repeats)}
        if backends:
            kw["backends"] = tuple(b.strip() for b in backends.split(",") if b.strip())
        if suite == "all" and name:
            kw["name"] = f"{name}_parts"
        if smoke:
            kw.setdefault("out", str(Path(parts.MEDIA_DIR) / "smoke"))
            settings = parts.smoke_settings(**kw)
        else:
            settings = parts.PartsSettings(**kw)
        parts.run(settings, log=click.echo)
    if smoke:
        click.echo(f"hms-bench: {_bench_module('common').SMOKE_NOTE}")


def _serve_suite(variant: str | None, steps: int | None, smoke: bool, common: dict[str, Any],
                 video: str | None) -> None:
    """``--suite serve``: benchmarks/bench_serve.py (tiny and paper unless --variant)."""
    serve = _bench_module("bench_serve")
    kw = {k: v for k, v in common.items() if k in ("threads", "work_dir", "out", "name")}
    if variant:
        kw["variants"] = (variant,)
    if steps:
        kw["steps"] = {"tiny": steps, "paper": steps}
    if video:
        kw["video"] = video
    settings = serve.smoke_settings(**kw) if smoke else serve.ServeSettings(**kw)
    serve.run(settings, log=click.echo)
