"""The audio path (docs/method.md §2): audio backbone on log-mel patches, then the aLSTM.

It never depends on a gate, so the scheduler and the dense baselines run it ahead of the
gated steps, for many steps and videos at once, with this one function.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import NDArray

from hms_deploy.runtime.engines import EngineSet
from hms_deploy.runtime.timing import Timer
from hms_deploy.transfer import to_device

Tensor = torch.Tensor


def run_audio_path(
    es: EngineSet, mel: NDArray[np.float32], state: tuple[Tensor, Tensor], *, audio_batch: int, timer: Timer,
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor], int]:
    """``k`` steps of ``n`` videos from aLSTM state ``state`` = (h, c), each (n, H_a).

    ``mel``: (k, n, 1, 96, 64) float32 host patches. Returns (p_a (k, n, P_a), h_a
    (k, n, H_a), the final (h, c), audio backbone calls), all tensors the caller's own
    (engine outputs are copied: they live only until the engine's next call).
    """
    dev = es.device
    k, n = mel.shape[:2]
    with timer.host_section("audio"):
        x = to_device(mel.reshape(-1, *mel.shape[2:]), dev)
    p = torch.empty(k * n, es.config.audio.proj_dim, device=dev)
    hs = torch.empty(k, n, es.config.hidden_audio, device=dev)
    calls = 0
    with timer.device_section("audio"):
        for s in range(0, k * n, audio_batch):
            p[s:s + audio_batch].copy_(es.engines["audio_backbone"]({"mel": x[s:s + audio_batch]})["feat"])
            calls += 1
        p = p.reshape(k, n, -1)
        h, c = state
        cell = es.engines["audio_cell"]
        for j in range(k):
            out = cell({"x_a": p[j], "h": h, "c": c})
            h, c = out["h_next"], out["c_next"]
            hs[j].copy_(h)
        final = (h.clone(), c.clone())
    return p, hs, final, calls
