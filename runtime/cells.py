"""The two LSTM cells of :class:`hms_deploy.gating.StepOps` over an EngineSet, timed as
``cells_gates``: shared by the scheduler's ops and the dense baselines' ops."""

from __future__ import annotations

import torch

from hms_deploy.runtime.engines import EngineSet
from hms_deploy.runtime.timing import Timer

Tensor = torch.Tensor


class EngineCells:
    """``appearance_cell`` / ``motion_cell`` calling the engines of ``es`` under ``timer``."""

    es: EngineSet
    timer: Timer

    def appearance_cell(self, x_a: Tensor, x_i: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        with self.timer.device_section("cells_gates"):
            out = self.es.engines["appearance_cell"]({"x_a": x_a, "x_i": x_i, "h": h, "c": c})
        return out["h_next"], out["c_next"]

    def motion_cell(
        self, x_a: Tensor, x_i: Tensor, x_m: Tensor, h: Tensor, c: Tensor
    ) -> tuple[Tensor, Tensor]:
        with self.timer.device_section("cells_gates"):
            out = self.es.engines["motion_cell"](
                {"x_a": x_a, "x_i": x_i, "x_m": x_m, "h": h, "c": c})
        return out["h_next"], out["c_next"]
