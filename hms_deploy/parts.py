"""The one table of HMS parts: names, inputs and outputs (docs/export.md).

Every part has a dynamic batch axis N first. Shapes here are per-sample (without N).
The export, the manifest, the runtime's input checks and the cost model all read this.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hms_deploy.config import HMSConfig


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # per sample, without the batch axis N
    dtype: str  # "float32", "uint8", "int64"

    def with_batch(self, n: int) -> tuple[int, ...]:
        return (n, *self.shape)

    def describe(self) -> str:
        return f"(N, {', '.join(map(str, self.shape))}) {self.dtype}"


@dataclass(frozen=True)
class PartSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


PART_NAMES = (
    "audio_backbone",
    "appearance_backbone",
    "motion_backbone",
    "audio_cell",
    "appearance_cell",
    "motion_cell",
    "appearance_gate",
    "motion_gate",
    "head",
)

BACKBONE_PART = {
    "audio": "audio_backbone",
    "appearance": "appearance_backbone",
    "motion": "motion_backbone",
}


def part_specs(cfg: HMSConfig) -> dict[str, PartSpec]:
    """The nine parts of a model with this config, in a fixed order."""
    f32, u8, i64 = "float32", "uint8", "int64"
    fe = cfg.front_end
    pa, pi, pm = cfg.audio.proj_dim, cfg.appearance.proj_dim, cfg.motion.proj_dim
    ha, hi, hm = cfg.hidden_audio, cfg.hidden_appearance, cfg.hidden_motion
    si, sm = cfg.appearance.crop, cfg.motion.crop
    T = TensorSpec

    def cell(name: str, xs: list[tuple[str, int]], h: int) -> PartSpec:
        ins = tuple(T(n, (d,), f32) for n, d in xs) + (T("h", (h,), f32), T("c", (h,), f32))
        return PartSpec(name, ins, (T("h_next", (h,), f32), T("c_next", (h,), f32)))

    def gate(name: str, xs: list[tuple[str, int]], h: int) -> PartSpec:
        ins = tuple(T(n, (d,), f32) for n, d in xs) + (T("h", (h,), f32), T("c", (h,), f32))
        return PartSpec(name, ins, (T("decision", (), i64), T("logits", (2,), f32)))

    specs = [
        PartSpec("audio_backbone", (T("mel", (1, fe.patch_frames, fe.n_mels), f32),),
                 (T("feat", (pa,), f32),)),
        PartSpec("appearance_backbone", (T("frame", (3, si, si), u8),), (T("feat", (pi,), f32),)),
        PartSpec("motion_backbone", (T("clip", (3, cfg.clip.frames, sm, sm), u8),),
                 (T("feat", (pm,), f32),)),
        cell("audio_cell", [("x_a", pa)], ha),
        cell("appearance_cell", [("x_a", pa), ("x_i", pi)], hi),
        cell("motion_cell", [("x_a", pa), ("x_i", pi), ("x_m", pm)], hm),
        gate("appearance_gate", [("x_a", pa)], hi),
        gate("motion_gate", [("x_a", pa), ("x_i", pi)], hm),
        PartSpec("head", (T("h", (hm,), f32),), (T("probs", (cfg.num_classes,), f32),)),
    ]
    return {s.name: s for s in specs}


def random_inputs(spec: PartSpec, n: int, *, seed: int = 0, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Random inputs of batch ``n`` for one part (export, parity checks, cost model, tests).

    uint8 frames/clips take the full 0..255 range; ``mel`` is N(-2, 2^2) (log-mel-like);
    features and states are N(0, scale^2).
    """
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for t in spec.inputs:
        shape = t.with_batch(n)
        if t.dtype == "uint8":
            out[t.name] = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
        elif t.name == "mel":
            out[t.name] = torch.randn(shape, generator=g) * 2.0 - 2.0
        else:
            out[t.name] = torch.randn(shape, generator=g) * scale
    return out

