"""``hms-demo``: the first command to run. Trains a tiny HMS model on a small synthetic
set, exports it, and classifies one new sample per class with the exported engines.

Every stage calls the library function behind the command it names (printed as it
goes), so the demo is the README workflow at a small size:

    hms-synth dataset OUT/data --per-class N --split
    hms-init --variant tiny --steps 8 ...            (T = 8, as the synthetic study)
    hms-extract (train, val) ; hms-train --preset small
    hms-export --checkpoint trained.pt --out OUT/engines
    hms-run sample.mp4 --engines OUT/engines --engine onnx   (one new sample per class)
    hms-run <test split> --engines OUT/engines --engine onnx

and ends with two lines: the share of steps that ran motion on those videos per class
group (``motion used: motion classes X %, audio classes Y %, appearance classes Z %``;
HMS should run motion on the motion classes, whose videos need it), and
``demo: K/M correct`` (the new samples).

The workflow's backbone fine-tune (``hms-finetune``) is left out: the tiny model's
encoders already tell the six classes apart (the motion encoder's structured start,
:class:`~hms_deploy.model.backbones.TinySlowFast`), and what HMS needs from the data is
enough training videos per class that it cannot tell them apart by their look alone
(36 training videos per class here; why, and the runs over seeds and thread counts:
``benchmarks/results/demo_diagnosis.md``, ``benchmarks/results/demo_seeds.md``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import click

from hms_deploy.cli.common import debug_option, handle_errors, set_threads

# The demo's size: 36 train / 12 val / 12 test videos per class.
DEMO_PER_CLASS = 60
DEMO_DURATION_S = 4.0
# torch threads of the extraction and the runs (the HMS training runs on 1): features move
# with the thread count (reduction order) and with the CPU's kernels; what the demo gets
# over seeds and thread counts, and on which CPU, is in benchmarks/results/demo_seeds.md
# (benchmarks/demo_seeds.py).
DEMO_THREADS = 2
DEMO_STEPS = 8
# processes that render the synthetic set (each video depends only on its seed and index);
# 1 (in this process) with --workers 0
DEMO_SYNTH_WORKERS = 2


def run_demo(out: Path, *, per_class: int = DEMO_PER_CLASS, duration_s: float = DEMO_DURATION_S,
             seed: int = 0, workers: int = 1, engine: str = "onnx", quiet: bool = False,
             echo: Callable[..., None] = click.echo) -> DemoResult:
    """The demo's stages (see the module docstring): the samples right, and the motion usage
    per class group over the samples and the test split."""
    import torch

    from hms_deploy.checkpoint import init_checkpoint, save_checkpoint
    from hms_deploy.config import tiny_config
    from hms_deploy.data.datasets import read_list
    from hms_deploy.data.extraction import extract
    from hms_deploy.data.features import open_store
    from hms_deploy.data.synthetic import DEFAULT_CLASSES, make_dataset, make_sample_video
    from hms_deploy.export.pipeline import ExportOptions, export_checkpoint
    from hms_deploy.runtime import Session
    from hms_deploy.train.config import TrainConfig
    from hms_deploy.train.loop import train
    from hms_deploy.train.presets import preset_values

    progress = not quiet
    t0 = time.perf_counter()

    def stage(cmd: str) -> None:
        echo(f"== [{time.perf_counter() - t0:5.0f} s] {cmd}")

    labels = list(DEFAULT_CLASSES)
    data = out / "data"
    stage(f"hms-synth dataset {data} --per-class {per_class} --split --seed {seed}")
    make_dataset(data, per_class=per_class, seed=seed, duration_s=duration_s, split=True,
                 workers=max(workers, DEMO_SYNTH_WORKERS) if workers else 1)
    splits = {name: read_list(data / f"{name}.csv") for name in ("train", "val")}

    stage(f"hms-init --variant tiny --steps {DEMO_STEPS} --num-classes {len(labels)} "
          f"--labels {data / 'labels.txt'} --out {out / 'init.pt'}")
    ckpt = init_checkpoint(tiny_config(len(labels), steps=DEMO_STEPS), labels=labels, seed=seed)
    save_checkpoint(ckpt, out / "init.pt")

    stores = {}
    for name, lst in splits.items():
        stage(f"hms-extract --checkpoint {out / 'init.pt'} --list {data / name}.csv "
              f"--out {out / ('store_' + name)}")
        extract(ckpt, lst, out / f"store_{name}", workers=workers, progress=progress)
        stores[name] = open_store(out / f"store_{name}")

    stage(f"hms-train --store {out / 'store_train'} --val-store {out / 'store_val'} "
          f"--checkpoint {out / 'init.pt'} --preset small --out {out / 'trained.pt'}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small models: one thread is faster than two contending
    result = train(ckpt, stores["train"], TrainConfig(seed=seed, **preset_values("small", "hms")),
                   val_store=stores["val"], out=out / "trained.pt", progress=progress)
    torch.set_num_threads(threads)
    best = result.log[result.best_epoch - 1]
    echo(f"   best epoch {result.best_epoch}: val mAP {best['val_map']:.3f}, "
         f"{best['val_gmacs_per_video']:.3g} GMAC/video")

    stage(f"hms-export --checkpoint {out / 'trained.pt'} --out {out / 'engines'} --force")
    export_checkpoint(out / "trained.pt", out / "engines", ExportOptions(force=True),
                      log=None if quiet else (lambda m: echo(f"   {m}")))

    samples = out / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    correct = 0
    usage = GroupUsage()
    with Session(engines_dir=out / "engines", engine=engine) as session:
        for i, label in enumerate(labels):
            path = samples / f"{label}.mp4"
            make_sample_video(path, seed=seed * 100 + i, label=label)
            stage(f"hms-run {path} --engines {out / 'engines'} --engine {engine}")
            rec = session.classify(path)
            ok = rec["label"] == label
            correct += ok
            usage.add(label, rec)
            used = rec.get("usage", {})
            echo(f"   {label:>12} -> {rec['label']:<12} {rec['score']:.3f} "
                 f"{'ok' if ok else 'WRONG'}  (steps run: appearance "
                 f"{used.get('appearance', '?')}, motion {used.get('motion', '?')})")
        test = read_list(data / "test.csv").entries
        stage(f"hms-run <the {len(test)} videos of {data / 'test.csv'}> --engines "
              f"{out / 'engines'} --engine {engine}")
        test_ok = 0
        for e, rec in zip(test, session.classify_many([e.path for e in test])):
            test_ok += rec.get("label") == e.label
            usage.add(e.label, rec)
        echo(f"   test videos: {test_ok}/{len(test)} correct")
    echo(f"   total {time.perf_counter() - t0:.0f} s")
    return DemoResult(correct, len(labels), usage.shares())


class GroupUsage:
    """Steps that ran motion, per class group (synthetic.CLASS_GROUPS), over records."""

    def __init__(self) -> None:
        self.motion = {g: 0 for g in GROUP_ORDER}
        self.steps = {g: 0 for g in GROUP_ORDER}

    def add(self, label: str, rec: dict[str, Any]) -> None:
        from hms_deploy.data.synthetic import CLASS_GROUPS

        if "error" in rec:
            return
        group = CLASS_GROUPS[label]
        self.motion[group] += int(rec["usage"]["motion"])
        self.steps[group] += int(rec["steps"])

    def shares(self) -> dict[str, float]:
        """Group -> fraction of its videos' steps that ran motion."""
        return {g: self.motion[g] / self.steps[g] if self.steps[g] else 0.0 for g in GROUP_ORDER}


GROUP_ORDER = ("motion", "audio", "appearance")


class DemoResult(NamedTuple):
    correct: int
    samples: int
    motion_usage: dict[str, float]  # per class group: share of steps that ran motion

    def usage_line(self) -> str:
        u = self.motion_usage
        return ("motion used: " + ", ".join(f"{g} classes {100 * u[g]:.1f} %" for g in GROUP_ORDER))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out", type=click.Path(file_okay=False, path_type=Path), default="demo_out")
@click.option("--per-class", type=int, default=DEMO_PER_CLASS, show_default=True,
              help="Synthetic videos per class (split 60/20/20 % into train/val/test: 36/12/12 at 60).")
@click.option("--duration", type=float, default=DEMO_DURATION_S, show_default=True,
              help="Seconds per video.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the synthetic set, the initialisation and the training.")
@click.option("--workers", type=int, default=1, show_default=True,
              help="Decoding processes; the synthetic set is rendered by at least 2 (0: both "
                   "in this process).")
@click.option("--threads", type=int, default=DEMO_THREADS, show_default=True,
              help="torch intra-op threads of the extraction and the runs (fixed so that the "
                   "demo does not depend on the machine's core count; the HMS training "
                   "runs on 1).")
@click.option("--deterministic", is_flag=True,
              help="torch.use_deterministic_algorithms(True): torch's deterministic CPU "
                   "kernels instead of its default ones.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@debug_option
@handle_errors("hms-demo")
def main(
    out: Path,
    per_class: int,
    duration: float,
    seed: int,
    workers: int,
    threads: int,
    deterministic: bool,
    quiet: bool,
    debug: bool,
) -> None:
    """Train a tiny HMS model on a small synthetic set in OUT, export it to ONNX, classify
    one new sample per class with the exported engines; last line: demo: K/M correct."""
    from hms_deploy.errors import ConfigError

    if per_class < 3:
        raise ConfigError(f"--per-class must be >= 3 (train, val and test videos), got {per_class}")
    set_threads(threads)
    if deterministic:
        import torch

        torch.use_deterministic_algorithms(True)
    result = run_demo(out, per_class=per_class, duration_s=duration, seed=seed,
                      workers=workers, quiet=quiet)
    click.echo(result.usage_line())
    click.echo(f"demo: {result.correct}/{result.samples} correct")
