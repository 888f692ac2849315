"""The ONE implementation of HMS decisions, hierarchy and hidden-state fusion (docs/method.md §2-§3).

Used by the masked training forward (:func:`masked_step`), by the skipping PyTorch
reference and by every runtime (:func:`gated_step`, over a :class:`StepOps` that the
caller implements with torch modules, ONNX Runtime sessions or TensorRT engines).

Shapes: N videos, features (N, P_*), states (N, H_*). Decisions are int64 (N,) 0/1
("1" = run the modality) on the host in :func:`gated_step`, float (N,) in the masked
forward (so that straight-through gradients flow).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from hms_deploy.transfer import to_device

Tensor = torch.Tensor


# ------------------------------------------------------------------------------ decisions


def decide(logits: Tensor) -> Tensor:
    """Inference decision: 1 where logits[..., 1] > logits[..., 0]; ties skip. int64 (N,).

    Identical to ONNX ArgMax (first maximal index), which the exported gates contain.
    """
    return torch.argmax(logits, dim=-1)


def gumbel_decide(logits: Tensor, tau: float, generator: torch.Generator | None = None) -> Tensor:
    """Training decision: hard Gumbel-softmax with a straight-through estimator. float (N,).

    Forward value is exactly 0.0 or 1.0; the gradient is that of the soft sample.
    """
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
    gumbel = -torch.log((-torch.log(u.clamp_min(1e-10))).clamp_min(1e-10))
    soft = F.softmax((logits + gumbel) / tau, dim=-1)
    hard = F.one_hot(soft.argmax(dim=-1), 2).to(soft.dtype)
    # hard + (soft - soft) is exactly hard in value, with the soft sample's gradient
    return (hard + (soft - soft.detach()))[..., 1]


def hierarchy(g_appearance: Tensor, g_motion: Tensor) -> Tensor:
    """Motion may run only where appearance ran: G^M = G^M * G^I."""
    return g_motion * g_appearance


# --------------------------------------------------------------------------------- fusion


def fuse(h_lower: Tensor, h_prev: Tensor) -> Tensor:
    """Hidden-state fusion on a skipped step: [h_lower ; h_prev[:, H_lower:]] (c is never fused)."""
    return torch.cat([h_lower, h_prev[:, h_lower.shape[1]:]], dim=1)


def blend(g: Tensor, new: Tensor, old: Tensor) -> Tensor:
    """Masked update h = G * new + (1 - G) * old, with G float (N,). Exact for G in {0, 1}."""
    g = g.to(new.dtype).unsqueeze(1)
    return g * new + (1.0 - g) * old


# ---------------------------------------------------------------------------------- state


@dataclass
class GatedState:
    """States of the gated cells after a step (the audio cell is stepped before the loop)."""

    h_i: Tensor
    c_i: Tensor
    h_m: Tensor
    c_m: Tensor

    @classmethod
    def zeros(
        cls, n: int, hidden_appearance: int, hidden_motion: int, *,
        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
    ) -> GatedState:
        def z(h: int) -> Tensor:
            return torch.zeros(n, h, device=device, dtype=dtype)

        return cls(z(hidden_appearance), z(hidden_appearance), z(hidden_motion), z(hidden_motion))


# ----------------------------------------------------------------------- the masked step


class CellFn(Protocol):
    def __call__(self, *inputs: Tensor) -> tuple[Tensor, Tensor]: ...


class GateFn(Protocol):
    def __call__(self, *inputs: Tensor) -> tuple[Tensor, Tensor]: ...


def masked_step(
    *,
    x_a: Tensor,
    x_i: Tensor,
    x_m: Tensor,
    h_a: Tensor,
    state: GatedState,
    appearance_gate: GateFn,
    motion_gate: GateFn,
    appearance_cell: CellFn,
    motion_cell: CellFn,
    decision: DecisionFn,
) -> tuple[GatedState, Tensor, Tensor, Tensor, Tensor]:
    """One step of the training forward: every branch computed, then masked by the decisions.

    ``x_*`` are projected features (N, P_*), ``h_a`` the audio hidden state of this step.
    Returns (state, G^I float (N,), G^M float (N,), appearance logits, motion logits).
    """
    _, logits_i = appearance_gate(x_a, state.h_i, state.c_i)
    g_i = decision(logits_i)
    h_cell, c_cell = appearance_cell(x_a, x_i, state.h_i, state.c_i)
    h_i = blend(g_i, h_cell, fuse(h_a, state.h_i))
    c_i = blend(g_i, c_cell, state.c_i)

    _, logits_m = motion_gate(x_a, x_i, state.h_m, state.c_m)
    g_m = hierarchy(g_i, decision(logits_m))
    h_cell, c_cell = motion_cell(x_a, x_i, x_m, state.h_m, state.c_m)
    h_m = blend(g_m, h_cell, fuse(h_i, state.h_m))
    c_m = blend(g_m, c_cell, state.c_m)
    return GatedState(h_i, c_i, h_m, c_m), g_i, g_m, logits_i, logits_m


class DecisionFn(Protocol):
    def __call__(self, logits: Tensor) -> Tensor: ...


def argmax_decision(logits: Tensor) -> Tensor:
    """:func:`decide` as float, for the masked forward at evaluation time."""
    return decide(logits).to(logits.dtype)


# --------------------------------------------------------------------- the skipping step


class StepOps(Protocol):
    """What :func:`gated_step` needs from a backend. ``rows`` are int64 host indices into N.

    ``decide_*`` return the decisions for ``rows`` as an int64 host tensor (this is the
    one host read per gate evaluated); a forced policy or a budget may answer without
    calling the gate. ``*_feature`` return projected features for ``rows`` (decoding and
    running the backbone only for them).
    """

    def decide_appearance(self, t: int, rows: Tensor, x_a: Tensor, h: Tensor, c: Tensor) -> Tensor: ...

    def appearance_feature(self, t: int, rows: Tensor) -> Tensor: ...

    def appearance_cell(self, x_a: Tensor, x_i: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]: ...

    def decide_motion(
        self, t: int, rows: Tensor, x_a: Tensor, x_i: Tensor, h: Tensor, c: Tensor
    ) -> Tensor: ...

    def motion_feature(self, t: int, rows: Tensor) -> Tensor: ...

    def motion_cell(
        self, x_a: Tensor, x_i: Tensor, x_m: Tensor, h: Tensor, c: Tensor
    ) -> tuple[Tensor, Tensor]: ...


def _take(x: Tensor, rows: Tensor | None) -> Tensor:
    """Rows ``rows`` (device indices) of ``x``; all of ``x`` when ``rows`` is None."""
    return x if rows is None else x.index_select(0, rows)


def _put(dst: Tensor, rows: Tensor | None, src: Tensor) -> Tensor:
    """``dst`` with rows ``rows`` (device indices) replaced by ``src``; ``src`` if None."""
    return src if rows is None else dst.index_copy(0, rows, src)


def _device_rows(rows: Tensor, n: int, device: torch.device) -> Tensor | None:
    """Host indices ``rows`` (of ``n``) on ``device``, uploaded once without waiting; None = all."""
    return None if rows.numel() == n else to_device(rows, device)


def gated_step(
    ops: StepOps, t: int, x_a: Tensor, h_a: Tensor, state: GatedState
) -> tuple[GatedState, Tensor, Tensor]:
    """One step that really skips (docs/method.md §2, steps 2-5) for N videos in lockstep.

    Only the rows whose gate fired are gathered into a sub-batch for a backbone and a
    cell; the others get the fusion copy. The motion gate is evaluated only on rows where
    appearance ran. Returns (state, G^I int64 (N,) host, G^M int64 (N,) host).

    The host waits on the device only inside ``ops.decide_*`` (the decision reads). The
    sub-batch indices are built on the host from those decisions and uploaded once per
    sub-batch (appearance rows, motion rows, motion rows within the appearance rows)
    with a copy that does not wait (:func:`hms_deploy.transfer.to_device`).
    """
    n = x_a.shape[0]
    dev = x_a.device
    all_rows = torch.arange(n)
    g_i = ops.decide_appearance(t, all_rows, x_a, state.h_i, state.c_i).to("cpu", torch.int64)
    g_m = torch.zeros(n, dtype=torch.int64)

    h_i, c_i = fuse(h_a, state.h_i), state.c_i
    rows_i = g_i.nonzero().flatten()
    x_i = d_i = None
    if rows_i.numel():
        d_i = _device_rows(rows_i, n, dev)
        xa_i = _take(x_a, d_i)
        x_i = ops.appearance_feature(t, rows_i)
        h_sub, c_sub = ops.appearance_cell(xa_i, x_i, _take(state.h_i, d_i), _take(state.c_i, d_i))
        h_i, c_i = _put(h_i, d_i, h_sub), _put(c_i, d_i, c_sub)
        gm_sub = ops.decide_motion(
            t, rows_i, xa_i, x_i, _take(state.h_m, d_i), _take(state.c_m, d_i)
        ).to("cpu", torch.int64)
        g_m[rows_i] = gm_sub
    g_m = hierarchy(g_i, g_m)

    h_m, c_m = fuse(h_i, state.h_m), state.c_m
    rows_m = g_m.nonzero().flatten()
    if rows_m.numel():
        assert x_i is not None  # hierarchy: motion rows are a subset of appearance rows
        same = rows_m.numel() == rows_i.numel()  # motion on every appearance row
        d_m = d_i if same else _device_rows(rows_m, n, dev)
        # positions of rows_m inside rows_i, to pick their appearance features
        d_pos = (d_m if d_i is None
                 else _device_rows(torch.searchsorted(rows_i, rows_m), rows_i.numel(), dev))
        x_m = ops.motion_feature(t, rows_m)
        h_sub, c_sub = ops.motion_cell(
            _take(x_a, d_m), _take(x_i, d_pos), x_m, _take(state.h_m, d_m), _take(state.c_m, d_m)
        )
        h_m, c_m = _put(h_m, d_m, h_sub), _put(c_m, d_m, c_sub)
    return GatedState(h_i, c_i, h_m, c_m), g_i, g_m
