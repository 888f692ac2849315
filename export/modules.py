"""The exportable parts of a model, bound to their specs (the table is :mod:`hms_deploy.parts`).

This module does not define parts: it pairs each ``nn.Module`` that ``HMS.part(name)``
returns with its :class:`~hms_deploy.parts.PartSpec` and its cost. Random inputs per spec are
:func:`hms_deploy.parts.random_inputs`; dtype tables are :mod:`hms_deploy.dtypes`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from hms_deploy.errors import ExportError
from hms_deploy.model.hms import HMS
from hms_deploy.parts import PART_NAMES, PartSpec, part_specs


@dataclass(frozen=True)
class ExportPart:
    """One of the nine parts: its spec, its module (called positionally in spec order), cost."""

    name: str
    spec: PartSpec
    module: nn.Module
    gmac: float  # per sample


def export_parts(model: HMS, costs: dict[str, float]) -> dict[str, ExportPart]:
    """The nine parts of ``model`` (an HMS in eval mode), in :data:`PART_NAMES` order.

    ``costs`` are the checkpoint's GMAC per sample per part (docs/method.md §5).
    """
    specs = part_specs(model.cfg)
    missing = [n for n in PART_NAMES if n not in costs]
    if missing:
        raise ExportError(f"checkpoint has no cost for parts {missing}; re-create it with hms-init")
    return {
        name: ExportPart(name, specs[name], model.part(name).eval(), float(costs[name]))
        for name in PART_NAMES
    }
