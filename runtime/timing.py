"""``timing_ms`` of a record (docs/record.md): wall-clock per category of work.

``decode`` = probe + audio decode + frame decode, RGB conversion, resize/crop and the
frames' host-to-device copies; ``audio`` = log-mel front end (and its copy to the
device) + audio backbone + aLSTM; ``appearance``/``motion`` = that backbone engine;
``cells_gates`` = iLSTM, mLSTM, gates and head (including the decision reads);
``other`` = total minus the rest. On CUDA the engine categories are measured with CUDA
events on the stream (resolved once at the end), so ``other`` may be negative where the
host decoded while the device computed.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from hms_deploy.transfer import sync_allowed

Tensor = torch.Tensor

TIMING_KEYS = ("total", "decode", "audio", "appearance", "motion", "cells_gates", "other")


class Timer:
    """Wall-clock per category; on CUDA, engine sections are timed with events on the stream."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.host: dict[str, float] = defaultdict(float)
        self._events: list[tuple[str, Any, Any]] = []
        self.t0 = time.perf_counter()

    @contextmanager
    def host_section(self, key: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.host[key] += time.perf_counter() - t

    @contextmanager
    def device_section(self, key: str) -> Iterator[None]:
        if not self.cuda:
            with self.host_section(key):
                yield
            return
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        try:
            yield
        finally:
            end.record()
            self._events.append((key, start, end))

    def result(self) -> dict[str, float]:
        """ms per category; call after the final host read (the device is then idle)."""
        ms = {k: 1e3 * v for k, v in self.host.items()}
        for key, start, end in self._events:
            with sync_allowed(torch.device("cuda")):
                end.synchronize()  # already complete: the last host read waited for it
            ms[key] = ms.get(key, 0.0) + start.elapsed_time(end)
        total = 1e3 * (time.perf_counter() - self.t0)
        out = {"total": total}
        for k in TIMING_KEYS[1:-1]:
            out[k] = ms.get(k, 0.0)
        out["other"] = total - sum(out[k] for k in TIMING_KEYS[1:-1])
        return {k: round(v, 3) for k, v in out.items()}

