"""The torch backend: a checkpoint's own modules, on CPU or CUDA."""

from __future__ import annotations

import torch
from torch import nn

from hms_deploy.parts import PartSpec
from hms_deploy.runtime.engine import Engine, Tensor


class TorchEngine(Engine):
    """Runs one part's ``nn.Module`` under ``torch.inference_mode`` on ``device``."""

    backend = "torch"

    def __init__(self, spec: PartSpec, module: nn.Module, device: torch.device):
        super().__init__(spec, device)
        self._cpu_module = module
        self.module: nn.Module | None = None

    def open(self) -> None:
        self.module = self._cpu_module.to(self.device).eval()

    def close(self) -> None:
        self.module = None

    def run(self, inputs: dict[str, Tensor], n: int) -> dict[str, Tensor]:
        assert self.module is not None  # guaranteed by Engine.__call__
        with torch.inference_mode():
            out = self.module(*(inputs[k] for k in self.input_names))
        if isinstance(out, torch.Tensor):
            out = (out,)
        return dict(zip(self.output_names, out))
