"""Parity checks that every export runs and stores in the manifest (``"parity"``).

Figures, per part and output (torch = reference, the other backend = candidate):

- ``max_abs``: max |candidate - reference|;
- ``max_rel``: ``max_abs / max |reference|`` (relative to the output's scale, because
  random-init features can be ~1e-5 where element-wise relative error is meaningless);
- ``cosine``: the smallest per-sample cosine similarity (rows flattened).

An output passes when ``max_abs <= atol + rtol * max|reference|`` and ``cosine >=
cosine_min`` (cosine is skipped for rows whose reference is ~0). Decisions (int64)
must agree exactly, except at ties (|logit[1] - logit[0]| <= ``tie_margin``, where
float rounding may legally flip the argmax); ties are counted and reported.

Checks run by :func:`validate_export`:

1. ``random``: every part on random inputs at N = 1 and N = 3 (the file was exported at
   N = 2, so this also proves the dynamic batch axis);
2. ``realistic``: every part on inputs from a generated video (:mod:`hms_deploy.data`):
   real log-mel patches, frames and clips for the backbones; for cells, gates and head
   the states along a dense run of the torch model over that video;
3. ``gates``: decision agreement on ``gate_samples`` (>= 1000) random states per gate;
4. ``end_to_end``: the torch parts and the ONNX parts each stepped with
   :func:`hms_deploy.spec.gated_step` over the same decoded inputs at T = ``steps``
   (each backend's own backbone features; motion clips not covered by check 2 run on
   demand, only where the motion gate fired): same decisions at every step and the same
   top-1 class. A decision may differ only at a tie, after which the runs are not compared.

fp16 exports: ONNX Runtime's CPU provider has few float16 kernels and runs the rest in
float32 behind inserted casts, so CPU figures say nothing about a GPU's fp16 numerics.
They are computed (for information) but reported as ``"not validated"`` and never fail
the export; validate fp16 on the GPU that will run it.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hms_deploy import spec as hms_spec
from hms_deploy.config import HMSConfig
from hms_deploy.dtypes import NUMPY_DTYPES, TORCH_DTYPES
from hms_deploy.errors import ExportError
from hms_deploy.export.modules import ExportPart, call_part
from hms_deploy.parts import PART_NAMES, PartSpec, random_inputs

Tensor = torch.Tensor
Runner = Callable[[str, dict[str, Tensor]], dict[str, Tensor]]

NOT_VALIDATED = "not validated"


@dataclass(frozen=True)
class Tolerance:
    rtol: float = 1e-4
    atol: float = 1e-6
    cosine_min: float = 0.9999
    tie_margin: float = 1e-4  # |logit diff| at or below this is a tie
    probs_atol: float = 1e-4  # end-to-end class probabilities


TOLERANCES = {"fp32": Tolerance()}


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


# ------------------------------------------------------------------------------- runners


class TorchRunner:
    """Runs the torch parts by name: ``runner(part, {input: tensor}) -> {output: tensor}``."""

    name = "torch"

    def __init__(self, parts: dict[str, ExportPart]):
        self.parts = parts

    def __call__(self, part: str, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        p = self.parts[part]
        return call_part(p.module, p.spec, inputs)


class OrtRunner:
    """ONNX Runtime sessions over ONNX files, created on first use; torch tensors in and out."""

    name = "onnxruntime"

    def __init__(
        self, paths: dict[str, Path], specs: dict[str, PartSpec], *,
        provider: str = "CPUExecutionProvider", threads: int = 0,
    ):
        self.paths = paths
        self.specs = specs
        self.provider = provider
        self.threads = threads
        self._sessions: dict[str, Any] = {}

    def session(self, part: str) -> Any:
        if part not in self._sessions:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            if self.threads:
                opts.intra_op_num_threads = self.threads
            try:
                self._sessions[part] = ort.InferenceSession(
                    str(self.paths[part]), sess_options=opts, providers=[self.provider]
                )
            except Exception as e:
                raise ExportError(f"{part}: ONNX Runtime cannot load {self.paths[part].name} "
                                  f"({' '.join(str(e).split())[:300]})") from e
        return self._sessions[part]

    def __call__(self, part: str, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        s = self.specs[part]
        feed = {
            t.name: np.ascontiguousarray(inputs[t.name].detach().cpu().numpy(), dtype=NUMPY_DTYPES[TORCH_DTYPES[t.dtype]])
            for t in s.inputs
        }
        outs = self.session(part).run(s.output_names, feed)
        return {n: torch.from_numpy(np.asarray(o)) for n, o in zip(s.output_names, outs)}

    def close(self) -> None:
        self._sessions.clear()


def run_chunked(runner: Runner, part: str, inputs: dict[str, Tensor], chunk: int) -> dict[str, Tensor]:
    """``runner`` over the batch in slices of ``chunk``; outputs concatenated."""
    n = next(iter(inputs.values())).shape[0]
    if n <= chunk:
        return runner(part, inputs)
    pieces = [runner(part, {k: v[i:i + chunk] for k, v in inputs.items()}) for i in range(0, n, chunk)]
    return {k: torch.cat([p[k] for p in pieces]) for k in pieces[0]}


# ------------------------------------------------------------------------------- figures


def _num(x: float) -> float | str:
    """JSON-safe number (the manifest is strict JSON)."""
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf"
    return float(f"{x:.6g}")


def compare(ref: Tensor, got: Tensor, tol: Tolerance) -> dict[str, Any]:
    """Figures of one output (see the module docstring); ``ok`` says whether it passes."""
    if tuple(ref.shape) != tuple(got.shape):
        return {"ok": False, "error": f"shape {tuple(got.shape)}, expected {tuple(ref.shape)}"}
    if not ref.dtype.is_floating_point:
        mismatches = int((ref != got.to(ref.dtype)).sum())
        return {"ok": mismatches == 0, "mismatches": mismatches, "n": int(ref.numel())}
    r = ref.detach().double().cpu()
    g = got.detach().double().cpu()
    if not torch.isfinite(g).all():
        return {"ok": False, "error": "non-finite values", "max_abs": "nan"}
    diff = (g - r).abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    scale = float(r.abs().max()) if r.numel() else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    rows_r, rows_g = r.reshape(r.shape[0], -1), g.reshape(g.shape[0], -1)
    nr, ng = rows_r.norm(dim=1), rows_g.norm(dim=1)
    live = nr > max(scale, 1e-30) * 1e-6
    if live.any():
        cos = (rows_r[live] * rows_g[live]).sum(1) / (nr[live] * ng[live]).clamp_min(1e-300)
        cosine = float(cos.min())
    else:
        cosine = 1.0
    ok = max_abs <= tol.atol + tol.rtol * scale and cosine >= tol.cosine_min
    return {"ok": bool(ok), "max_abs": _num(max_abs), "max_rel": _num(max_rel),
            "cosine": _num(cosine), "scale": _num(scale)}


def _worst(a: dict[str, Any] | None, b: dict[str, Any]) -> dict[str, Any]:
    if a is None:
        return b
    out = dict(b)
    out["ok"] = bool(a.get("ok")) and bool(b.get("ok"))
    for k in ("max_abs", "max_rel", "mismatches"):
        if k in a and k in b:
            out[k] = max(a[k], b[k], key=lambda v: math.inf if isinstance(v, str) else v)
    if "cosine" in a and "cosine" in b:
        out["cosine"] = min(a["cosine"], b["cosine"], key=lambda v: -math.inf if isinstance(v, str) else v)
    return out


def part_parity(
    ref: Runner, cand: Runner, spec: PartSpec, inputs: dict[str, Tensor], tol: Tolerance,
    *, chunk: int | None = None, ref_outputs: dict[str, Tensor] | None = None,
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Compare ``cand`` with ``ref`` on ``inputs``; returns (figures per output, cand outputs)."""
    big = chunk or 1 << 30
    r = ref_outputs if ref_outputs is not None else run_chunked(ref, spec.name, inputs, big)
    c = run_chunked(cand, spec.name, inputs, big)
    return {name: compare(r[name], c[name], tol) for name in spec.output_names}, c


def random_parity(
    ref: Runner, cand: Runner, spec: PartSpec, batches: Sequence[int], tol: Tolerance, seed: int = 0
) -> dict[str, Any]:
    """Worst figures per output over random inputs at each batch size in ``batches``."""
    worst: dict[str, dict[str, Any]] = {}
    for i, n in enumerate(batches):
        figs, _ = part_parity(ref, cand, spec, random_inputs(spec, n, seed=seed + i), tol)
        for k, v in figs.items():
            worst[k] = _worst(worst.get(k), v)
    return {"batches": list(batches), "outputs": worst}


def gate_agreement(
    ref: Runner, cand: Runner, spec: PartSpec, samples: int, tol: Tolerance, *, seed: int = 0,
    chunk: int | None = None,
) -> dict[str, Any]:
    """Decisions of ``cand`` vs ``ref`` on ``samples`` random states (ties reported apart)."""
    inputs = random_inputs(spec, samples, seed=seed)
    r = run_chunked(ref, spec.name, inputs, chunk or samples)
    c = run_chunked(cand, spec.name, inputs, chunk or samples)
    margin = (r["logits"][:, 1] - r["logits"][:, 0]).abs()
    ties = margin <= tol.tie_margin
    differ = r["decision"] != c["decision"].to(r["decision"].dtype)
    own = hms_spec.decide(c["logits"].float()) != c["decision"].to(torch.int64)
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


# ------------------------------------------------------------------------ video inputs


@dataclass
class DecodedVideo:
    """Per-step part inputs of one video: mel (T,1,96,64) f32, frames (T,3,S,S) u8,
    clips (T,3,32,S,S) u8."""

    path: str
    duration_s: float
    has_audio: bool
    mel: Tensor
    frames: Tensor
    clips: Tensor

    @property
    def steps(self) -> int:
        return int(self.mel.shape[0])


def video_inputs(path: str | Path, cfg: HMSConfig, steps: int) -> DecodedVideo:
    """Decode what ``steps`` steps of ``path`` need (HMS_SPEC.md 1) with :mod:`hms_deploy.data`
    (the runtime's decoding and preprocessing: ``StepSampler`` over ``FrameSource``)."""
    from hms_deploy.data.video import FrameSource, StepSampler, decode_audio, probe

    info = probe(path)
    sampler = StepSampler.from_config(info, cfg, steps=steps)
    wave, has_audio = decode_audio(path, cfg.front_end.sample_rate, info=info)
    with FrameSource(info) as src:
        frames = sampler.appearance_inputs(src)
        clips = sampler.motion_inputs(src)
    return DecodedVideo(
        str(path), float(info.duration_s), bool(has_audio),
        torch.from_numpy(np.ascontiguousarray(sampler.audio_patches(wave))),
        torch.from_numpy(np.ascontiguousarray(frames)), torch.from_numpy(clips),
    )


def sample_video(dirpath: Path, seed: int = 0) -> tuple[Path, str]:
    """A generated sample clip (H.264 + AAC) in ``dirpath``; returns (path, description)."""
    from hms_deploy.data.synthetic import make_sample_video

    path = dirpath / "sample.mp4"
    label = make_sample_video(path, seed=seed)
    return path, f"synthetic sample (hms_deploy.data.synthetic, seed {seed}, class {label})"


# ----------------------------------------------------------------- stepping the parts


class PartsStepOps:
    """:class:`hms_deploy.spec.StepOps` over a :data:`Runner` and per-step projected features.

    ``feats[modality]``: (N, T, P) projected features the backbones produced for every
    step (computed ahead: a step's feature does not depend on the gates), or a function
    ``(t, rows) -> (len(rows), P)`` that runs the backbone on demand. Gate logits are
    recorded for tie analysis.
    """

    def __init__(self, runner: Runner, feats: dict[str, Any], n: int):
        self.runner = runner
        self.feats = feats
        self.n = n
        self.margins: dict[str, dict[int, Tensor]] = {"appearance": {}, "motion": {}}
        self.calls = {"appearance_gate": 0, "motion_gate": 0, "appearance_cell": 0, "motion_cell": 0}

    def _gate(self, which: str, t: int, rows: Tensor, inputs: dict[str, Tensor]) -> Tensor:
        self.calls[f"{which}_gate"] += 1
        out = self.runner(f"{which}_gate", inputs)
        m = torch.full((self.n,), math.inf)
        m[rows] = (out["logits"][:, 1] - out["logits"][:, 0]).abs().float()
        self.margins[which][t] = m
        return out["decision"].to("cpu", torch.int64)

    def decide_appearance(self, t: int, rows: Tensor, x_a: Tensor, h: Tensor, c: Tensor) -> Tensor:
        return self._gate("appearance", t, rows, {"x_a": x_a, "h": h, "c": c})

    def _feature(self, modality: str, t: int, rows: Tensor) -> Tensor:
        f = self.feats[modality]
        return f(t, rows) if callable(f) else f[rows, t]

    def appearance_feature(self, t: int, rows: Tensor) -> Tensor:
        return self._feature("appearance", t, rows)

    def appearance_cell(self, x_a: Tensor, x_i: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        self.calls["appearance_cell"] += 1
        out = self.runner("appearance_cell", {"x_a": x_a, "x_i": x_i, "h": h, "c": c})
        return out["h_next"], out["c_next"]

    def decide_motion(
        self, t: int, rows: Tensor, x_a: Tensor, x_i: Tensor, h: Tensor, c: Tensor
    ) -> Tensor:
        return self._gate("motion", t, rows, {"x_a": x_a, "x_i": x_i, "h": h, "c": c})

    def motion_feature(self, t: int, rows: Tensor) -> Tensor:
        return self._feature("motion", t, rows)

    def motion_cell(
        self, x_a: Tensor, x_i: Tensor, x_m: Tensor, h: Tensor, c: Tensor
    ) -> tuple[Tensor, Tensor]:
        self.calls["motion_cell"] += 1
        out = self.runner("motion_cell", {"x_a": x_a, "x_i": x_i, "x_m": x_m, "h": h, "c": c})
        return out["h_next"], out["c_next"]


@dataclass
class GatedRun:
    """Result of :func:`run_gated` for N videos over T steps."""

    appearance: Tensor  # (N, T) int64
    motion: Tensor  # (N, T) int64
    probs: Tensor  # (N, C)
    ops: PartsStepOps


@torch.no_grad()
def run_gated(runner: Runner, feats: dict[str, Any], cfg: HMSConfig) -> GatedRun:
    """The skipping forward (aLSTM, then :func:`hms_spec.gated_step` per step, then the head)
    with every cell, gate and the head run by ``runner``; ``feats``: (N, T, P) per modality
    (``audio`` must be a tensor; the visual ones may be on-demand functions, see
    :class:`PartsStepOps`)."""
    p_a = feats["audio"]
    n, steps, _ = p_a.shape
    h = torch.zeros(n, cfg.hidden_audio)
    c = torch.zeros_like(h)
    h_a = []
    for t in range(steps):
        out = runner("audio_cell", {"x_a": p_a[:, t], "h": h, "c": c})
        h, c = out["h_next"], out["c_next"]
        h_a.append(h)
    ops = PartsStepOps(runner, feats, n)
    state = hms_spec.GatedState.zeros(n, cfg.hidden_appearance, cfg.hidden_motion)
    g_i, g_m = [], []
    for t in range(steps):
        state, gi, gm = hms_spec.gated_step(ops, t, p_a[:, t], h_a[t], state)
        g_i.append(gi)
        g_m.append(gm)
    probs = runner("head", {"h": state.h_m})["probs"]
    return GatedRun(torch.stack(g_i, 1), torch.stack(g_m, 1), probs, ops)


# ------------------------------------------------------------------- realistic inputs


@torch.no_grad()
def dense_trajectory(
    runner: Runner, vin: DecodedVideo, cfg: HMSConfig, *, chunk: int, motion_steps: int | None = None,
) -> tuple[dict[str, dict[str, Tensor]], dict[str, dict[str, Tensor]]]:
    """Realistic inputs for every part from one video, by running ``runner`` densely.

    Backbones get the video's mel patches, frames and clips (the first ``motion_steps``
    clips; all by default); cells, gates and the head get the states of a run where every
    cell steps on every step. Returns (inputs per part, ``runner``'s outputs per part),
    each batched over the steps.
    """
    steps = vin.steps
    ms = steps if motion_steps is None else max(1, min(motion_steps, steps))
    ins: dict[str, dict[str, Tensor]] = {
        "audio_backbone": {"mel": vin.mel},
        "appearance_backbone": {"frame": vin.frames},
        "motion_backbone": {"clip": vin.clips[:ms]},
    }
    outs = {k: run_chunked(runner, k, v, chunk) for k, v in ins.items()}
    p_a, p_i = outs["audio_backbone"]["feat"], outs["appearance_backbone"]["feat"]
    p_m = outs["motion_backbone"]["feat"]

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
            o = runner(part, {**step, "h": h, "c": c})
            h, c = o["h_next"], o["c_next"]
        return {k: torch.cat(v) for k, v in rec.items()}

    ins["audio_cell"] = roll("audio_cell", {"x_a": p_a}, cfg.hidden_audio, steps)
    ins["appearance_cell"] = roll("appearance_cell", {"x_a": p_a, "x_i": p_i}, cfg.hidden_appearance, steps)
    ins["motion_cell"] = roll("motion_cell", {"x_a": p_a[:ms], "x_i": p_i[:ms], "x_m": p_m}, cfg.hidden_motion, ms)
    ic, mc = ins["appearance_cell"], ins["motion_cell"]
    ins["appearance_gate"] = {"x_a": ic["x_a"], "h": ic["h"], "c": ic["c"]}
    ins["motion_gate"] = {"x_a": mc["x_a"], "x_i": mc["x_i"], "h": mc["h"], "c": mc["c"]}
    h_last = runner("motion_cell", {k: v[-1:] for k, v in mc.items()})["h_next"]
    ins["head"] = {"h": torch.cat([mc["h"][1:], h_last])}
    for part in ("audio_cell", "appearance_cell", "motion_cell", "appearance_gate", "motion_gate", "head"):
        outs[part] = runner(part, ins[part])
    return ins, outs


# ------------------------------------------------------------------------- the report


def _end_to_end(
    ref: Runner, cand: Runner, ref_feats: dict[str, Any], cand_feats: dict[str, Any],
    cfg: HMSConfig, tol: Tolerance, names: tuple[str, str] = ("torch", "onnx"),
) -> dict[str, Any]:
    a = run_gated(ref, ref_feats, cfg)
    b = run_gated(cand, cand_feats, cfg)
    steps = a.appearance.shape[1]
    same_i = bool(torch.equal(a.appearance, b.appearance))
    same_m = bool(torch.equal(a.motion, b.motion))
    top_a, top_b = int(a.probs[0].argmax()), int(b.probs[0].argmax())
    rep: dict[str, Any] = {
        "steps": steps,
        "decisions_equal": same_i and same_m,
        "appearance": a.appearance[0].tolist(),
        "motion": a.motion[0].tolist(),
        f"appearance_{names[1]}": b.appearance[0].tolist(),
        f"motion_{names[1]}": b.motion[0].tolist(),
        "usage": {"appearance": int(a.appearance.sum()), "motion": int(a.motion.sum())},
        f"top1_{names[0]}": top_a,
        f"top1_{names[1]}": top_b,
        "probs": compare(a.probs, b.probs, Tolerance(rtol=0.0, atol=tol.probs_atol, cosine_min=0.0)),
    }
    ok = rep["decisions_equal"] and top_a == top_b and rep["probs"]["ok"]
    if not rep["decisions_equal"]:
        # Allowed only if the first differing decision was a tie on the reference side.
        diff = (a.appearance != b.appearance) | (a.motion != b.motion)
        t = int(diff[0].nonzero()[0])
        margin = min(float(a.ops.margins["appearance"].get(t, torch.tensor([math.inf]))[0]),
                     float(a.ops.margins["motion"].get(t, torch.tensor([math.inf]))[0]))
        rep["first_difference"] = {"step": t, "reference_margin": _num(margin)}
        if margin <= tol.tie_margin:
            rep["diverged_at_tie"] = True
            ok = True
    rep["ok"] = bool(ok)
    return rep


def _status(ok: bool, enforce: bool) -> str:
    if not enforce:
        return NOT_VALIDATED
    return "passed" if ok else "failed"


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
    report: dict[str, Any], parts: dict[str, ExportPart], ref: Runner, cand: Runner,
    cfg: HMSConfig, opts: ValidationOptions, say: Callable[[str], None],
) -> None:
    """The four checks of the module docstring; fills ``report`` (figures keep ``ok``)."""
    tol = opts.tolerance
    specs = {n: p.spec for n, p in parts.items()}
    heavy = {n for n, p in parts.items() if p.gmac > opts.heavy_gmac}
    say(f"validate: random inputs at N = {list(opts.random_batches)}"
        + (f" ({', '.join(sorted(heavy))}: N = {list(opts.heavy_random_batches)})" if heavy else ""))
    for i, name in enumerate(PART_NAMES):
        batches = opts.heavy_random_batches if name in heavy else opts.random_batches
        report["parts"][name]["random"] = random_parity(
            ref, cand, specs[name], batches, tol, seed=opts.seed + 100 * i)

    say(f"validate: gate decisions on {opts.gate_samples} random states")
    for i, name in enumerate(("appearance_gate", "motion_gate")):
        report["gates"][name] = gate_agreement(ref, cand, specs[name], opts.gate_samples, tol,
                                               seed=opts.seed + 7 + i)

    with tempfile.TemporaryDirectory(prefix="hms-validate-") as tmp:
        if opts.video is None:
            path, what = sample_video(Path(tmp), seed=opts.seed)
        else:
            path, what = Path(opts.video), str(opts.video)
        say(f"validate: decoding {what} at T = {opts.steps}")
        vin = video_inputs(path, cfg, opts.steps)
    motion_steps = opts.realistic_motion_steps
    if motion_steps is None:
        motion_steps = 2 if "motion_backbone" in heavy else vin.steps
    say("validate: realistic inputs")
    ins, ref_outs = dense_trajectory(ref, vin, cfg, chunk=opts.backbone_chunk,
                                     motion_steps=motion_steps)
    feats: dict[str, dict[str, Any]] = {"torch": {}, "onnx": {}}
    for name in PART_NAMES:
        figs, outs = part_parity(ref, cand, specs[name], ins[name], tol, chunk=opts.backbone_chunk,
                                 ref_outputs=ref_outs[name])
        report["parts"][name]["realistic"] = {"batch": int(next(iter(ins[name].values())).shape[0]),
                                              "outputs": figs}
        if name.endswith("_backbone"):
            m = name.removesuffix("_backbone")
            feats["torch"][m] = ref_outs[name]["feat"]
            feats["onnx"][m] = outs["feat"]

    computed = {"torch": 0, "onnx": 0}

    def on_demand(which: str, runner: Runner) -> Callable[[int, Tensor], Tensor]:
        """Motion features of steps the realistic check did not cover, run when asked for."""
        cache = dict(enumerate(feats[which]["motion"]))

        def feature(t: int, rows: Tensor) -> Tensor:
            if t not in cache:
                cache[t] = runner("motion_backbone", {"clip": vin.clips[t:t + 1]})["feat"][0]
                computed[which] += 1
            return cache[t].expand(len(rows), -1)

        return feature

    say("validate: end to end (gated_step over torch parts vs ONNX parts)")
    ref_feats = {"audio": feats["torch"]["audio"][None], "appearance": feats["torch"]["appearance"][None],
                 "motion": on_demand("torch", ref)}
    cand_feats = {"audio": feats["onnx"]["audio"][None], "appearance": feats["onnx"]["appearance"][None],
                  "motion": on_demand("onnx", cand)}
    e2e = _end_to_end(ref, cand, ref_feats, cand_feats, cfg, tol)
    e2e["motion_backbone_runs_on_demand"] = computed
    e2e["video"] = what
    e2e["duration_s"] = round(vin.duration_s, 3)
    e2e["has_audio"] = vin.has_audio
    report["end_to_end"] = e2e


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
    specs = {n: p.spec for n, p in parts.items()}
    ref = TorchRunner(parts)
    cand = OrtRunner(onnx_paths, specs)
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

    try:
        _checks(report, parts, ref, cand, cfg, opts, say)
    except ExportError as e:
        if enforce:
            raise
        # fp16 on a CPU: ONNX Runtime may lack a kernel even behind its casts
        report["status"] = NOT_VALIDATED
        report["error"] = str(e)
        report["seconds"] = round(time.perf_counter() - t0, 2)
        report.setdefault("end_to_end", {})
        _mark(report, enforce)
        return report
    finally:
        cand.close()

    failure = _first_failure(report)
    report["status"] = _status(failure is None, enforce)
    if failure and enforce:
        report["failure"] = failure
    report["seconds"] = round(time.perf_counter() - t0, 2)
    _mark(report, enforce)
    if failure and enforce:
        raise ExportError(f"parity check failed: {failure}")
    return report


def _mark(report: dict[str, Any], enforce: bool) -> None:
    """Replace each figure group's ``ok`` by a status string (``not validated`` for fp16)."""
    def fix(d: Any) -> None:
        if isinstance(d, dict):
            if "ok" in d:
                d["status"] = _status(bool(d.pop("ok")), enforce)
            for v in d.values():
                fix(v)
        elif isinstance(d, list):
            for v in d:
                fix(v)
    fix(report["parts"])
    fix(report["gates"])
    fix(report["end_to_end"])
