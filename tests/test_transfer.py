"""The step loop waits on the device only for the decision reads (hms_deploy/transfer.py).

- ``gated_step`` on the ``meta`` device (tensors without data: any read back to the host
  raises) with a dispatch mode that sees every copy: no device-to-host copy at all, and
  one non-waiting upload per sub-batch (at most three per step), where the old code made
  up to thirteen blocking ones.
- The scheduler with N = 4 videos whose decisions diverge: ``stats.host_reads`` equals
  the number of gate evaluations (one read per gate call for the whole sub-batch).
- :class:`HostReads` counts by kind and returns host copies.
"""

from __future__ import annotations

import pytest
import torch
from runtime_helpers import assets, one_torch_thread  # noqa: F401 - autouse fixture
from torch.utils._python_dispatch import TorchDispatchMode

from hms_deploy import gating
from hms_deploy.transfer import HostReads, to_device

META = torch.device("meta")
P, H = 4, 6  # feature and hidden sizes of the fake step below


class _Copies(TorchDispatchMode):
    """Records (source device, destination device) of every copy op."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in ("_to_copy", "copy_", "_copy_from", "copy"):
            src = args[1] if name == "copy_" else args[0]
            dst = out if isinstance(out, torch.Tensor) else args[0]
            if src.device != dst.device:
                self.copies.append((src.device.type, dst.device.type))
        return out


class _MetaOps:
    """A StepOps whose device tensors live on ``meta``; decisions are given per step."""

    def __init__(self, appearance: list[list[int]], motion: list[list[int]]):
        self.appearance, self.motion = appearance, motion
        self.calls: list[tuple[str, int]] = []

    def decide_appearance(self, t, rows, x_a, h, c):
        assert x_a.device == META and h.shape[0] == rows.numel()
        self.calls.append(("gate_i", rows.numel()))
        return torch.tensor([self.appearance[t][r] for r in rows.tolist()])

    def decide_motion(self, t, rows, x_a, x_i, h, c):
        assert x_a.shape[0] == x_i.shape[0] == h.shape[0] == rows.numel()
        self.calls.append(("gate_m", rows.numel()))
        return torch.tensor([self.motion[t][r] for r in rows.tolist()])

    def appearance_feature(self, t, rows):
        return torch.empty(rows.numel(), P, device=META)

    def motion_feature(self, t, rows):
        return torch.empty(rows.numel(), P, device=META)

    def appearance_cell(self, x_a, x_i, h, c):
        assert x_a.shape[0] == x_i.shape[0] == h.shape[0] == c.shape[0]
        return torch.empty_like(h), torch.empty_like(c)

    def motion_cell(self, x_a, x_i, x_m, h, c):
        assert x_a.shape[0] == x_i.shape[0] == x_m.shape[0] == h.shape[0]
        return torch.empty_like(h), torch.empty_like(c)


def test_gated_step_reads_nothing_back_and_uploads_once_per_sub_batch():
    # N = 4: full, partial appearance + partial motion, partial appearance + all its rows
    # on motion, nothing, everything
    appearance = [[1, 1, 1, 1], [1, 0, 1, 1], [0, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]]
    motion = [[0, 1, 0, 1], [1, 0, 0, 1], [0, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]]
    expected_uploads = [1, 3, 1, 0, 0]  # rows_m in step 0; rows_i, rows_m, pos in step 1; ...
    ops = _MetaOps(appearance, motion)
    state = gating.GatedState.zeros(4, H, H, device=META)
    x_a = torch.empty(4, P, device=META)
    h_a = torch.empty(4, 2, device=META)
    for t, want in enumerate(expected_uploads):
        with _Copies() as seen:
            state, g_i, g_m = gating.gated_step(ops, t, x_a, h_a, state)
        assert g_i.tolist() == appearance[t]
        assert g_m.tolist() == [a * m for a, m in zip(appearance[t], motion[t])]
        assert ("meta", "cpu") not in seen.copies  # nothing read back besides the decisions
        assert seen.copies == [("cpu", "meta")] * want, f"step {t}: {seen.copies}"
        assert all(z.device == META for z in (state.h_i, state.c_i, state.h_m, state.c_m))
    # the motion gate ran only on rows where appearance ran
    assert ops.calls[:4] == [("gate_i", 4), ("gate_m", 4), ("gate_i", 4), ("gate_m", 3)]


def test_lockstep_host_reads_equal_gate_evaluations(tmp_path):
    from hms_deploy.data.synthetic import render_class_video
    from hms_deploy.runtime import Session

    a = assets()
    # with the tests' tuned gates these two skip where the sample video runs motion
    others = [render_class_video(tmp_path / f"m{s}.mp4", "move_left", seed=s, index=s) for s in (4, 11)]
    videos = [a.video, others[0], a.long, others[1]]
    with Session(engines_dir=a.engines) as session:
        recs = list(session.classify_many(videos, batch_size=4))
    dec = [r["decisions"] for r in recs]
    columns = [[d["appearance"][t] for d in dec] for t in range(recs[0]["steps"])]
    motion = [[d["motion"][t] for d in dec] for t in range(recs[0]["steps"])]
    partial = [0 < sum(c) < 4 for c in columns]
    assert any(partial), "decisions do not diverge across the batch"
    assert any(p and 0 < sum(m) < sum(c) for p, c, m in zip(partial, columns, motion)), \
        "no step with partial appearance and partial motion"
    st = recs[0]["stats"]
    calls = st["engine_calls"]
    assert st["batch"] == 4
    assert st["host_reads"] == calls["appearance_gate"] + calls["motion_gate"]
    # one read per gate evaluation of the whole sub-batch, not one per video
    assert calls["appearance_gate"] == recs[0]["steps"]
    assert calls["motion_gate"] == sum(any(c) for c in columns)
    assert st["prediction_reads"] == 1


def test_host_reads_count_by_kind():
    reads = HostReads()
    x = torch.tensor([1, 0, 1], dtype=torch.int32)
    y = reads.read(x, "decision", torch.int64)
    assert y.dtype == torch.int64 and y.tolist() == [1, 0, 1]
    y[0] = 7
    assert x[0] == 1  # a copy: the budget veto may edit it
    reads.read(torch.ones(2), "prediction")
    assert reads.counts == {"decision": 1, "prediction": 1}
    with pytest.raises(ValueError, match="unknown host read kind 'other'"):
        reads.read(x, "other")


def test_to_device_on_cpu_is_the_tensor_itself():
    import numpy as np

    t = torch.arange(3)
    assert to_device(t, "cpu") is t
    assert to_device(np.arange(3), "cpu").tolist() == [0, 1, 2]
    assert to_device(t, "meta").device == META
