"""The parity check every export runs; its report is stored in the manifest (``"parity"``).

Reference and candidate are two runtime :class:`~hms_deploy.runtime.engines.EngineSet`
s: the checkpoint's modules on the ``torch`` backend and the exported ONNX files on the
``onnx`` backend (ONNX Runtime, CPU), i.e. the engines ``hms-run`` serves with. Per-part
outputs are collected by Polygraphy's ``Comparator.run`` over the engines wrapped as
runners (:mod:`hms_deploy.export.runners`); the figures and tolerances are
:mod:`hms_deploy.export.figures`.

Checks run by :func:`validate_export`:

1. ``random``: every part on random inputs at N = 1 and N = 3 (the file was exported at
   N = 2, so this also proves the dynamic batch axis);
2. ``realistic``: every part on inputs from a decoded video (the one per-video input type,
   :class:`~hms_deploy.data.inputs.VideoInputs`): real log-mel patches, frames and
   clips for the backbones; for cells, gates and head the states along a dense run of
   the reference engines over that video;
3. ``gates``: decision agreement on ``gate_samples`` (>= 1000) random states per gate;
   ties (|logit[1] - logit[0]| <= ``tie_margin``) may flip and are counted apart;
4. ``end_to_end``: both engine sets classify the video with the runtime's own gated
   loop at T = ``steps`` (:mod:`hms_deploy.export.end_to_end`).

fp16 exports: ONNX Runtime's CPU provider has few float16 kernels and runs the rest in
float32 behind inserted casts, so CPU figures say nothing about a GPU's fp16 numerics.
They are computed (for information) but reported as ``"not validated"`` and never fail
the export; validate fp16 on the GPU that will run it.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hms_deploy import gating
from hms_deploy.config import HMSConfig
from hms_deploy.errors import ExportError, HMSError
from hms_deploy.export.end_to_end import end_to_end
from hms_deploy.export.figures import NOT_VALIDATED, Tolerance, compare, mark, status, worst
from hms_deploy.export.modules import ExportPart
from hms_deploy.export.runners import Runner, compare_part, engine_set_runner, split
from hms_deploy.parts import PART_NAMES, PartSpec, part_specs, random_inputs
from hms_deploy.runtime.engines import EngineSet

Tensor = torch.Tensor

__all__ = ["NOT_VALIDATED", "Tolerance", "ValidationOptions", "compare", "validate_export"]


@dataclass(frozen=True)
class ValidationOptions:
    """What :func:`validate_export` runs. ``video=None`` generates a 4 s synthetic clip."""

    random_batches: tuple[int, ...] = (1, 3)
    heavy_random_batches: tuple[int, ...] = (1,)  # parts over heavy_gmac (paper SlowFast)
    heavy_gmac: float = 5.0
    gate_samples: int = 1000
    steps: int = 10
    video: Path | None = None
    seed: int = 0
    backbone_chunk: int = 2  # batch for backbones on realistic inputs (memory)
    realistic_motion_steps: int | None = None  # None: all steps, or 2 if motion is heavy
    tolerance: Tolerance = field(default_factory=Tolerance)


# ---------------------------------------------------------------------- engine sets


def torch_engine_set(parts: dict[str, ExportPart], cfg: HMSConfig) -> EngineSet:
    """The reference: the checkpoint's part modules on the runtime's torch backend (CPU)."""
    from hms_deploy.runtime.backends.torch import TorchEngine

    cpu = torch.device("cpu")
    return EngineSet(
        backend="torch", device=cpu, config=cfg, labels=[str(i) for i in range(cfg.num_classes)],
        costs={n: p.gmac for n, p in parts.items()},
        engines={n: TorchEngine(p.spec, p.module, cpu) for n, p in parts.items()},
        source="checkpoint",
    )


def onnx_engine_set(paths: dict[str, Path], cfg: HMSConfig, costs: dict[str, float]) -> EngineSet:
    """The candidate: ONNX files on the runtime's ONNX Runtime backend (CPU provider)."""
    from hms_deploy.runtime.backends.onnx import OnnxEngine

    cpu = torch.device("cpu")
    specs = part_specs(cfg)
    return EngineSet(
        backend="onnx", device=cpu, config=cfg, labels=[str(i) for i in range(cfg.num_classes)],
        costs=dict(costs), engines={n: OnnxEngine(specs[n], paths[n], cpu) for n in PART_NAMES},
        source=str(next(iter(paths.values())).parent),
    )


# ------------------------------------------------------------------- the part checks


def random_parity(
    ref: EngineSet, cand: EngineSet, spec: PartSpec, batches: Sequence[int], tol: Tolerance,
    seed: int = 0,
) -> dict[str, Any]:
    """Worst figures per output over random inputs at each batch size in ``batches``."""
    figs: dict[str, dict[str, Any]] = {}
    for i, n in enumerate(batches):
        f, _, _ = compare_part(ref[spec.name], cand[spec.name], random_inputs(spec, n, seed=seed + i), tol)
        for k, v in f.items():
            figs[k] = worst(figs.get(k), v)
    return {"batches": list(batches), "outputs": figs}


def gate_agreement(
    ref: Runner, cand: Runner, spec: PartSpec, samples: int, tol: Tolerance, *, seed: int = 0,
    chunk: int | None = None,
) -> dict[str, Any]:
    """Decisions of ``cand`` vs ``ref`` on ``samples`` random states (ties reported apart)."""
    feeds = split(random_inputs(spec, samples, seed=seed), chunk or samples)

    def run(runner: Runner) -> dict[str, Tensor]:
        outs = [runner(spec.name, f) for f in feeds]
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}

    r, c = run(ref), run(cand)
    margin = (r["logits"][:, 1] - r["logits"][:, 0]).abs()
    ties = margin <= tol.tie_margin
    differ = r["decision"] != c["decision"].to(r["decision"].dtype)
    own = gating.decide(c["logits"].float()) != c["decision"].to(torch.int64)
    outside = int((differ & ~ties).sum())
    return {
        "ok": outside == 0 and int(own.sum()) == 0,
        "samples": samples,
        "fired": int(r["decision"].sum()),
        "ties": int(ties.sum()),
        "agree": int((~differ).sum()),
        "disagree_at_ties": int((differ & ties).sum()),
        "disagree_outside_ties": outside,
        "decision_not_argmax_of_logits": int(own.sum()),
        "logits": compare(r["logits"], c["logits"], tol),
    }


# ------------------------------------------------------------------ realistic inputs


def decoded_inputs(path: str | Path, cfg: HMSConfig, steps: int, motion_steps: int | None = None
                   ) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any]]:
    """Backbone inputs of a video, decoded by the runtime (:class:`VideoInputs`):
    ``{"audio_backbone": {"mel": (T,1,96,64)}, "appearance_backbone": {"frame": (T,3,S,S)},
    "motion_backbone": {"clip": (M,3,32,S,S)}}`` (M = ``motion_steps``, default T), and
    facts about the video (``duration_s``, ``has_audio``)."""
    from hms_deploy.data.inputs import VideoInputs

    ms = steps if motion_steps is None else max(1, min(motion_steps, steps))
    video = VideoInputs(path, cfg, steps)
    try:
        mel = video.audio_patches(video.decode_audio())
        frames, clips = [], []
        for t in range(steps):
            frames.append(video.appearance(t))
            if t < ms:
                clips.append(video.motion(t))
    finally:
        video.close()
    ins = {
        "audio_backbone": {"mel": torch.from_numpy(np.ascontiguousarray(mel))},
        "appearance_backbone": {"frame": torch.from_numpy(np.stack(frames))},
        "motion_backbone": {"clip": torch.from_numpy(np.stack(clips))},
    }
    return ins, {"duration_s": float(video.info.duration_s), "has_audio": bool(video.has_audio)}


@torch.no_grad()
def dense_trajectory(ref: Runner, feats: dict[str, Tensor], cfg: HMSConfig) -> dict[str, dict[str, Tensor]]:
    """Inputs of cells, gates and head along a run of ``ref`` where every cell steps on
    every step; ``feats``: the backbone features per modality, (T, P) (motion: (M, P))."""
    p_a, p_i, p_m = feats["audio"], feats["appearance"], feats["motion"]
    steps, ms = p_a.shape[0], p_m.shape[0]

    def roll(part: str, xs: dict[str, Tensor], hidden: int, upto: int) -> dict[str, Tensor]:
        h = torch.zeros(1, hidden)
        c = torch.zeros_like(h)
        rec: dict[str, list[Tensor]] = {k: [] for k in (*xs, "h", "c")}
        for t in range(upto):
            step = {k: v[t:t + 1] for k, v in xs.items()}
            for k, v in step.items():
                rec[k].append(v)
            rec["h"].append(h)
            rec["c"].append(c)
            o = ref(part, {**step, "h": h, "c": c})
            h, c = o["h_next"], o["c_next"]
        return {k: torch.cat(v) for k, v in rec.items()}

    ins = {
        "audio_cell": roll("audio_cell", {"x_a": p_a}, cfg.hidden_audio, steps),
        "appearance_cell": roll("appearance_cell", {"x_a": p_a, "x_i": p_i}, cfg.hidden_appearance, steps),
        "motion_cell": roll("motion_cell", {"x_a": p_a[:ms], "x_i": p_i[:ms], "x_m": p_m},
                            cfg.hidden_motion, ms),
    }
    ic, mc = ins["appearance_cell"], ins["motion_cell"]
    ins["appearance_gate"] = {"x_a": ic["x_a"], "h": ic["h"], "c": ic["c"]}
    ins["motion_gate"] = {"x_a": mc["x_a"], "x_i": mc["x_i"], "h": mc["h"], "c": mc["c"]}
    h_last = ref("motion_cell", {k: v[-1:] for k, v in mc.items()})["h_next"]
    ins["head"] = {"h": torch.cat([mc["h"][1:], h_last])}
    return ins


def sample_video(dirpath: Path, seed: int = 0) -> tuple[Path, str]:
    """A generated sample clip (H.264 + AAC) in ``dirpath``; returns (path, description)."""
    from hms_deploy.data.synthetic import make_sample_video

    path = dirpath / "sample.mp4"
    label = make_sample_video(path, seed=seed)
    return path, f"synthetic sample (hms_deploy.data.synthetic, seed {seed}, class {label})"


# ------------------------------------------------------------------------- the report


def _first_failure(report: dict[str, Any]) -> str | None:
    for part, r in report["parts"].items():
        for kind in ("random", "realistic"):
            for out, f in r.get(kind, {}).get("outputs", {}).items():
                if not f.get("ok"):
                    detail = f.get("error") or (
                        f"max_abs {f.get('max_abs')}, max_rel {f.get('max_rel')}, cosine {f.get('cosine')}")
                    return f"{part}: {kind} inputs: output '{out}' out of tolerance ({detail})"
    for part, g in report["gates"].items():
        if not g["ok"]:
            return (f"{part}: decisions differ on {g['disagree_outside_ties']} of {g['samples']} "
                    f"random states outside ties ({g['decision_not_argmax_of_logits']} not argmax)")
    e2e = report.get("end_to_end") or {}
    if e2e and not e2e.get("ok"):
        return (f"end-to-end: decisions equal {e2e['decisions_equal']}, top-1 torch "
                f"{e2e.get('top1_torch')} vs onnx {e2e.get('top1_onnx')}, probs max_abs "
                f"{e2e['probs'].get('max_abs')}")
    return None


def _checks(
    report: dict[str, Any], ref: EngineSet, cand: EngineSet, heavy: set[str],
    opts: ValidationOptions, say: Callable[[str], None],
) -> None:
    """The four checks of the module docstring; fills ``report`` (figures keep ``ok``)."""
    tol, cfg = opts.tolerance, ref.config
    specs = part_specs(cfg)
    say(f"validate: random inputs at N = {list(opts.random_batches)}"
        + (f" ({', '.join(sorted(heavy))}: N = {list(opts.heavy_random_batches)})" if heavy else ""))
    for i, name in enumerate(PART_NAMES):
        batches = opts.heavy_random_batches if name in heavy else opts.random_batches
        report["parts"][name]["random"] = random_parity(ref, cand, specs[name], batches, tol,
                                                        seed=opts.seed + 100 * i)

    say(f"validate: gate decisions on {opts.gate_samples} random states")
    r_run, c_run = engine_set_runner(ref), engine_set_runner(cand)
    for i, name in enumerate(("appearance_gate", "motion_gate")):
        report["gates"][name] = gate_agreement(r_run, c_run, specs[name], opts.gate_samples, tol,
                                               seed=opts.seed + 7 + i)

    with tempfile.TemporaryDirectory(prefix="hms-validate-") as tmp:
        if opts.video is None:
            path, what = sample_video(Path(tmp), seed=opts.seed)
        else:
            path, what = Path(opts.video), str(opts.video)
        motion_steps = opts.realistic_motion_steps
        if motion_steps is None and "motion_backbone" in heavy:
            motion_steps = 2
        say(f"validate: decoding {what} at T = {opts.steps}")
        ins, facts = decoded_inputs(path, cfg, opts.steps, motion_steps)
        say("validate: realistic inputs")
        feats = {}
        for name in ("audio_backbone", "appearance_backbone", "motion_backbone"):
            feats[name.removesuffix("_backbone")] = _realistic(report, ref, cand, name, ins[name], opts)
        for name, inputs in dense_trajectory(r_run, feats, cfg).items():
            _realistic(report, ref, cand, name, inputs, opts)
        say("validate: end to end (the runtime's gated loop on torch vs ONNX Runtime engines)")
        e2e = end_to_end(ref, cand, path, opts.steps, tol)
    report["end_to_end"] = {**e2e, "video": what, "duration_s": round(facts["duration_s"], 3),
                            "has_audio": facts["has_audio"]}


def _realistic(report: dict[str, Any], ref: EngineSet, cand: EngineSet, name: str,
               inputs: dict[str, Tensor], opts: ValidationOptions) -> Tensor:
    """Figures of part ``name`` on ``inputs`` into ``report``; returns the reference's
    first output (a backbone's features)."""
    figs, r, _ = compare_part(ref[name], cand[name], inputs, opts.tolerance, chunk=opts.backbone_chunk)
    report["parts"][name]["realistic"] = {"batch": int(next(iter(inputs.values())).shape[0]),
                                          "outputs": figs}
    return r[ref[name].output_names[0]]


def validate_export(
    parts: dict[str, ExportPart],
    onnx_paths: dict[str, Path],
    cfg: HMSConfig,
    *,
    precision: str = "fp32",
    options: ValidationOptions | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every check of the module docstring; returns the parity report (JSON types).

    Raises :class:`ExportError` naming the part and the figure when an fp32 figure is out
    of tolerance. fp16 figures are reported as ``"not validated"`` and never raise.
    """
    opts = options or ValidationOptions()
    tol = opts.tolerance
    say = log or (lambda s: None)
    enforce = precision == "fp32"
    t0 = time.perf_counter()
    report: dict[str, Any] = {
        "reference": "torch (CPU, fp32)",
        "candidate": "onnxruntime CPUExecutionProvider",
        "precision": precision,
        "tolerances": {"rtol": tol.rtol, "atol": tol.atol, "cosine_min": tol.cosine_min,
                       "tie_margin": tol.tie_margin, "probs_atol": tol.probs_atol},
        "parts": {n: {} for n in PART_NAMES},
        "gates": {},
    }
    if not enforce:
        report["note"] = ("fp16: ONNX Runtime's CPU provider runs most float16 nodes in float32 "
                          "behind inserted casts; these figures are informational only. Validate "
                          "on the GPU that runs the export.")
    heavy = {n for n, p in parts.items() if p.gmac > opts.heavy_gmac}
    try:
        with torch_engine_set(parts, cfg) as ref, \
                onnx_engine_set(onnx_paths, cfg, ref.costs) as cand:
            _checks(report, ref, cand, heavy, opts, say)
    except HMSError as e:
        if enforce:
            raise e if isinstance(e, ExportError) else ExportError(str(e)) from e
        # fp16 on a CPU: ONNX Runtime may lack a kernel even behind its casts
        report["status"] = NOT_VALIDATED
        report["error"] = str(e)
        report["seconds"] = round(time.perf_counter() - t0, 2)
        report.setdefault("end_to_end", {})
        _mark(report, enforce)
        return report

    failure = _first_failure(report)
    report["status"] = status(failure is None, enforce)
    if failure and enforce:
        report["failure"] = failure
    report["seconds"] = round(time.perf_counter() - t0, 2)
    _mark(report, enforce)
    if failure and enforce:
        raise ExportError(f"parity check failed: {failure}")
    return report


def _mark(report: dict[str, Any], enforce: bool) -> None:
    for key in ("parts", "gates", "end_to_end"):
        mark(report[key], enforce)
