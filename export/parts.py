"""The exportable parts of a model, bound to their specs (the table is :mod:`hms_deploy.parts`).

This module does not define parts: it pairs each ``nn.Module`` that ``HMS.part(name)``
returns with its :class:`~hms_deploy.parts.PartSpec` and its cost, and gives the helpers
every exporter and checker needs (named calls, dtype maps, random inputs per spec).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from hms_deploy.errors import ExportError
from hms_deploy.model.hms import HMS
from hms_deploy.parts import PART_NAMES, PartSpec, TensorSpec, part_specs

Tensor = torch.Tensor

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "uint8": torch.uint8,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}
NUMPY_DTYPES: dict[str, type] = {
    "float32": np.float32,
    "float16": np.float16,
    "uint8": np.uint8,
    "int64": np.int64,
    "int32": np.int32,
    "bool": np.bool_,
}
# ONNX TensorProto element types of the dtypes parts use
ONNX_ELEM_TYPES: dict[str, int] = {"float32": 1, "uint8": 2, "int32": 6, "int64": 7, "bool": 9,
                                   "float16": 10}


@dataclass(frozen=True)
class ExportPart:
    """One of the nine parts: its spec, its module (called positionally in spec order), cost."""

    name: str
    spec: PartSpec
    module: nn.Module
    gmac: float  # per sample


def export_parts(model: HMS, costs: dict[str, float]) -> dict[str, ExportPart]:
    """The nine parts of ``model`` (an HMS in eval mode), in :data:`PART_NAMES` order.

    ``costs`` are the checkpoint's GMAC per sample per part (HMS_SPEC.md 5).
    """
    specs = part_specs(model.cfg)
    missing = [n for n in PART_NAMES if n not in costs]
    if missing:
        raise ExportError(f"checkpoint has no cost for parts {missing}; re-create it with hms-init")
    return {
        name: ExportPart(name, specs[name], model.part(name).eval(), float(costs[name]))
        for name in PART_NAMES
    }


def batch_shape(t: TensorSpec) -> list[str | int]:
    """The manifest's shape of a tensor: ``["N", *per-sample shape]``."""
    return ["N", *t.shape]


@torch.no_grad()
def call_part(module: nn.Module, spec: PartSpec, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """Run a torch part on named inputs; returns its outputs by name (spec order)."""
    args = [inputs[t.name] for t in spec.inputs]
    out = module(*args)
    outs = out if isinstance(out, tuple) else (out,)
    if len(outs) != len(spec.outputs):
        raise ExportError(
            f"{spec.name}: module returned {len(outs)} outputs, expected {spec.output_names}"
        )
    return {t.name: o for t, o in zip(spec.outputs, outs)}


def random_inputs(spec: PartSpec, n: int, *, seed: int = 0, scale: float = 1.0) -> dict[str, Tensor]:
    """Random inputs of batch ``n`` for one part (also behind ``costs.example_inputs``).

    uint8 frames/clips take the full 0..255 range; ``mel`` is N(-2, 2^2) (log-mel-like);
    features and states are N(0, scale^2).
    """
    g = torch.Generator().manual_seed(seed)
    out: dict[str, Tensor] = {}
    for t in spec.inputs:
        shape = t.with_batch(n)
        if t.dtype == "uint8":
            out[t.name] = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
        elif t.name == "mel":
            out[t.name] = torch.randn(shape, generator=g) * 2.0 - 2.0
        else:
            out[t.name] = torch.randn(shape, generator=g) * scale
    return out

