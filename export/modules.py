"""The exportable parts of a model, bound to their specs (the table is :mod:`hms_deploy.parts`).

This module does not define parts: it pairs each ``nn.Module`` that ``HMS.part(name)``
returns with its :class:`~hms_deploy.parts.PartSpec` and its cost, and gives the helpers
every exporter needs (named calls). Random inputs per spec are
:func:`hms_deploy.parts.random_inputs`; dtype tables are :mod:`hms_deploy.dtypes`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hms_deploy.errors import ExportError
from hms_deploy.model.hms import HMS
from hms_deploy.parts import PART_NAMES, PartSpec, part_specs

Tensor = torch.Tensor


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
