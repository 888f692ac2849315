"""Host <-> device transfers of the step loop: uploads that never wait, reads that are counted.

The lockstep loop (:func:`hms_deploy.gating.gated_step` under the runtime's scheduler)
may wait on the device only to read what the host must decide on: a gate's decisions
(and the head's probabilities). Every such read goes through :meth:`HostReads.read`,
which counts it; everything the host sends to the device (sub-batch row indices, decoded
frames) goes through :func:`to_device`, a copy from pinned memory that does not wait.

Under ``torch.cuda.set_sync_debug_mode("error")`` any other synchronising transfer in
the loop raises; :meth:`HostReads.read` lifts the mode for the one copy it makes, so
exactly the counted reads are allowed (``scripts/gpu_check.py`` runs the loop that way).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

Tensor = torch.Tensor


def to_device(x: Tensor | np.ndarray[Any, Any], device: torch.device | str) -> Tensor:
    """``x`` on ``device`` without making the host wait.

    On CUDA the host tensor is staged in pinned memory and copied with
    ``non_blocking=True`` (torch's pinned-memory allocator keeps the staging block until
    the copy has run, so it may be dropped at once). Elsewhere it is a plain copy (or
    ``x`` itself when it is already there).
    """
    t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    dev = torch.device(device)
    if t.device == dev or (dev.type == "cpu" and t.device.type == "cpu"):
        return t
    if dev.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(dev, non_blocking=True)
    return t.to(dev)


@contextmanager
def sync_allowed(device: torch.device) -> Iterator[None]:
    """Lift ``torch.cuda``'s sync debug mode (if set) for one deliberate synchronisation."""
    if device.type != "cuda" or torch.cuda.get_sync_debug_mode() == 0:
        yield
        return
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(mode)


class HostReads:
    """The one way a run reads device results on the host; counts per kind.

    ``decision`` reads are a gate's decisions (``stats.host_reads``: one per gate
    evaluated); ``prediction`` reads are the head's probabilities
    (``stats.prediction_reads``).
    """

    KINDS = ("decision", "prediction")

    def __init__(self) -> None:
        self.counts = dict.fromkeys(self.KINDS, 0)

    def read(self, x: Tensor, kind: str, dtype: torch.dtype | None = None) -> Tensor:
        """A host copy of ``x`` (cast to ``dtype``), waiting for the work that writes it."""
        if kind not in self.counts:
            raise ValueError(f"unknown host read kind {kind!r}, expected one of {self.KINDS}")
        with sync_allowed(x.device):
            out = x.to("cpu", dtype or x.dtype, copy=True)
        self.counts[kind] += 1
        return out
